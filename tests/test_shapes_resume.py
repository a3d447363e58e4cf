"""A stopped ``gen train-tiny`` run resumes: each transformer stage stopped after a
checkpoint and started again ends with exactly the weights and log of an uninterrupted
run; a whole run stopped in the transformer stage resumes without training the VAE or
encoding again; other settings, damaged or foreign checkpoints are refused by name."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from gen.pipelines.shapes import build
from gen.pipelines.shapes.config import CausalTrain, DitTrain, TrainConfig, VaeTrain
from gen.pipelines.shapes.data import LatentSet
from gen.pipelines.shapes.grammar import sample_caption
from gen.pipelines.shapes.resume import PartialRun, StageCheckpoint
from gen.pipelines.shapes.train import build_components, train_causal, train_t2v


class _Stop(Exception):
    pass


class _StopAfter(StageCheckpoint):
    """A checkpoint that stops the run right after saving step ``at`` (a process killed there)."""

    def __init__(self, path, at, stage):
        super().__init__(path, every=1, stage=stage)
        self.at = at

    def save(self, state):
        super().save(state)
        if state["step"] == self.at:
            raise _Stop


def _data(n: int, frames: int, seed: int) -> LatentSet:
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    latents = torch.randn(n, 16, frames, 4, 4, generator=gen)
    foreground = torch.rand(n, 1, frames, 4, 4, generator=gen) < 0.3
    return LatentSet(latents, [sample_caption(rng) for _ in range(n)], foreground)


def _weights(*models) -> dict:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(models) for k, v in m.state_dict().items()}


def _same_log(a: list, b: list) -> bool:
    strip = [[{k: v for k, v in e.items() if k != "seconds"} for e in log] for log in (a, b)]
    return strip[0] == strip[1]


CFG = TrainConfig(dit=DitTrain(clips=6, image_steps=3, image_batch=2, steps=3, batch=2, warmup=2, clip_shift=3.0,
                               foreground_weight=5.0, text_local_heads=4.0, null_padding=1.7),
                  causal=CausalTrain(window_frames=6, chunk_frames=3, rolling_chunks=2, steps=5, batch=2, warmup=2))


@pytest.mark.parametrize("stop_at", [2, 4])  # inside the first-frame phase, inside the clip phase
def test_text_to_video_training_resumed_equals_uninterrupted(tmp_path, seed, stop_at):
    data = _data(6, 2, seed)
    parts = build_components(seed, CFG.dit)
    log = train_t2v(parts["transformer"], parts["text_encoder"], parts["tokenizer"], data, CFG,
                    device=torch.device("cpu"), progress=False)
    want = _weights(parts["transformer"], parts["text_encoder"])

    path = tmp_path / "t2v.pt"
    parts = build_components(seed, CFG.dit)
    with pytest.raises(_Stop):
        train_t2v(parts["transformer"], parts["text_encoder"], parts["tokenizer"], data, CFG,
                  device=torch.device("cpu"), progress=False, checkpoint=_StopAfter(path, stop_at, "t2v"))
    assert torch.load(path, weights_only=True)["step"] == stop_at
    parts = build_components(seed, CFG.dit)  # a new process: fresh models from the seed, state from the file
    log2 = train_t2v(parts["transformer"], parts["text_encoder"], parts["tokenizer"], data, CFG,
                     device=torch.device("cpu"), progress=False, checkpoint=StageCheckpoint(path, stage="t2v"))
    got = _weights(parts["transformer"], parts["text_encoder"])
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert _same_log(log, log2) and log2[-1]["step"] == 6


def test_causal_training_resumed_equals_uninterrupted(tmp_path, seed):
    data = _data(3, 10, seed)
    parts = build_components(seed, CFG.dit)
    start = {k: v.detach().clone() for k, v in parts["transformer"].state_dict().items()}

    def run(checkpoint=None):
        parts["transformer"].load_state_dict(start)
        return train_causal(parts["transformer"], parts["text_encoder"], parts["tokenizer"], data, CFG,
                            device=torch.device("cpu"), progress=False, checkpoint=checkpoint)

    log = run()
    want = _weights(parts["transformer"])
    path = tmp_path / "causal.pt"
    with pytest.raises(_Stop):
        run(_StopAfter(path, 3, "causal"))
    log2 = run(StageCheckpoint(path, stage="causal"))
    got = _weights(parts["transformer"])
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert _same_log(log, log2)


def test_foreign_and_damaged_checkpoints_are_refused(tmp_path):
    StageCheckpoint(tmp_path / "a.pt", stage="t2v").save({"step": 1})
    with pytest.raises(ValueError, match="checkpoint of stage 't2v', not 'causal'"):
        StageCheckpoint(tmp_path / "a.pt", stage="causal").load()
    (tmp_path / "b.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read .*delete it"):
        StageCheckpoint(tmp_path / "b.pt", stage="t2v").load()
    with pytest.raises(ValueError, match="every must be >= 1"):
        StageCheckpoint(tmp_path / "c.pt", stage="t2v", every=0)
    assert StageCheckpoint(tmp_path / "missing.pt", stage="t2v").load() is None


def test_a_stopped_run_resumes_without_training_the_vae_again(tmp_path, monkeypatch):
    cfg = TrainConfig(vae=VaeTrain(image_steps=2, image_batch=2, steps=1, batch=1, frames=5, crop=32, stats_clips=2),
                      dit=DitTrain(clips=4, image_steps=2, image_batch=2, steps=2, batch=2, warmup=1,
                                   text_local_heads=4.0, null_padding=1.7))
    out = tmp_path / "shapes-wan"
    stop = {"at": 3}
    real_save = StageCheckpoint.save

    def save(self, state):
        real_save(self, state)
        if state["step"] == stop["at"]:
            raise _Stop

    monkeypatch.setattr(StageCheckpoint, "save", save)
    with pytest.raises(_Stop):
        build.train_shapes_wan(out, config=cfg, device="cpu", progress=False, checkpoint_every=1)
    partial = tmp_path / "shapes-wan.partial"
    assert (partial / "vae" / "log.json").exists() and (partial / "train.latents.pt").exists()
    assert not out.exists()

    # other settings: refused, naming the way out; the unfinished run is untouched
    other = TrainConfig(vae=cfg.vae, dit=dataclasses.replace(cfg.dit, steps=3))
    with pytest.raises(ValueError, match="unfinished run with other settings.*--restart"):
        build.train_shapes_wan(out, config=other, device="cpu", progress=False)

    # a snapshot of the unfinished run: its last checkpoint's EMA weights as a pipeline folder
    from diffusers import WanPipeline

    from gen.pipelines.shapes.folder import check_folder
    from gen.pipelines.shapes.train import padding_parameters

    with pytest.raises(ValueError, match="no unfinished"):
        build.snapshot_shapes_wan(tmp_path / "elsewhere", tmp_path / "snap")
    snap = build.snapshot_shapes_wan(out, tmp_path / "snap")
    assert check_folder(snap) == []
    pipe = WanPipeline.from_pretrained(str(snap), local_files_only=True)
    state = torch.load(partial / "t2v.pt", weights_only=True)
    padding = {id(p) for p in padding_parameters(pipe.transformer)}
    want = [p for p in pipe.transformer.parameters() if id(p) not in padding] + list(pipe.text_encoder.parameters())
    assert len(want) == len(state["ema"]["shadow"])
    assert all(torch.equal(p, v) for p, v in zip(want, state["ema"]["shadow"]))
    assert all(bool((p == 0).all()) for p in padding_parameters(pipe.transformer))
    assert json.loads((snap / "gen_model.json").read_text())["step"] == 3

    stop["at"] = -1

    def no_training(*args, **kwargs):
        raise AssertionError("the VAE was trained again")

    def no_encoding(*args, **kwargs):
        raise AssertionError("the clips were encoded again")

    monkeypatch.setattr(build, "train_vae", no_training)
    monkeypatch.setattr(build, "encode_clips", no_encoding)
    path = build.train_shapes_wan(out, config=cfg, device="cpu", progress=False, checkpoint_every=1)
    manifest = json.loads((path / "gen_model.json").read_text())
    assert [e["step"] for e in manifest["logs"]["transformer"]][-1] == 4 and manifest["logs"]["vae"]
    assert manifest["resumed"] is True
    assert not partial.exists()  # published: the checkpoints are gone


def test_restart_discards_an_unfinished_run(tmp_path):
    out = tmp_path / "x"
    assert not PartialRun(out, {"a": 0}).resumed
    # a run that stopped before it saved anything (e.g. a setting refused by a stage) is replaced
    assert not PartialRun(out, {"a": 1}).resumed
    (tmp_path / "x.partial" / "t2v.pt").write_bytes(b"old")
    with pytest.raises(ValueError, match="other settings"):
        PartialRun(out, {"a": 2})
    run = PartialRun(out, {"a": 2}, restart=True)
    assert not run.resumed and not (run.folder / "t2v.pt").exists()
    (run.folder / "t2v.pt").write_bytes(b"new")
    assert PartialRun(out, {"a": 2}).resumed
