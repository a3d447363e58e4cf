"""gen train-tiny end to end at toy step counts: the folder it publishes loads with
from_pretrained like a real checkpoint, and damaged folders fail with errors naming what
is wrong. (The shipped weights are checked in test_shapes_model.py.)"""

import json
import shutil

import pytest
import torch

from gen.pipelines import ModelNotAvailableError, load
from gen.pipelines.shapes.build import train_shapes_wan, train_shapes_wan_causal
from gen.pipelines.shapes.config import (
    CausalTrain,
    DitTrain,
    TrainConfig,
    VaeTrain,
    override_config,
    setting_names,
)
from gen.pipelines.shapes.folder import MANIFEST, check_folder

QUICK = TrainConfig(
    vae=VaeTrain(image_steps=2, image_batch=2, steps=1, batch=1, frames=5, crop=32, stats_clips=2),
    # the non-default options on, so that their paths run end to end
    dit=DitTrain(clips=4, image_steps=2, image_batch=2, steps=2, batch=2, warmup=1, clip_shift=3.0,
                 image_drop_motion=1.0, foreground_weight=5.0, frame_difference=2.0),
    causal=CausalTrain(clips=2, frames=69, steps=2, batch=2, warmup=1),
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    t2v = train_shapes_wan(root / "shapes-wan", config=QUICK, device="cpu", progress=False)
    causal = train_shapes_wan_causal(root / "shapes-wan-causal", base=t2v, config=QUICK, device="cpu", progress=False)
    return t2v, causal


def test_published_folder_is_complete_and_records_its_training(trained):
    t2v, causal = trained
    for folder, name in ((t2v, "shapes-wan"), (causal, "shapes-wan-causal")):
        assert check_folder(folder) == []
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["name"] == name and manifest["train"]["seed"] == 0 and manifest["resumed"] is False
        assert "transformer/diffusion_pytorch_model.safetensors" in manifest["files"]
        assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))  # nothing half-written left behind
    logs = json.loads((t2v / MANIFEST).read_text())["logs"]
    assert logs["vae"][-1]["latents"]["std"] and logs["transformer"][-1]["step"] == 4  # 2 frame + 2 clip steps


def test_trained_folder_loads_and_renders_through_the_registry(trained):
    t2v, causal = trained
    pipe = load("shapes-wan", model_path=t2v)
    assert type(pipe).__name__ == "WanPipeline"
    std = json.loads((t2v / "vae" / "config.json").read_text())["latents_std"]
    assert list(pipe.vae.config.latents_std) == std  # the measured statistics travel with the VAE
    out = pipe("a red circle moving right on a blue background", height=128, width=128, num_frames=5,
               num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).frames[0]
    assert out.shape == (5, 128, 128, 3)
    c = load("shapes-wan-causal", model_path=causal)
    # the causal variant shares VAE and text encoder, not the transformer
    assert torch.equal(c.vae.decoder.conv_in.weight, pipe.vae.decoder.conv_in.weight)
    assert not torch.equal(c.transformer.proj_out.weight, pipe.transformer.proj_out.weight)


def test_diagnose_reads_a_saved_folder(trained):
    from gen.pipelines.shapes.diagnose import diagnose, word_sensitivity

    res = diagnose(trained[0], clips=2, levels=(0.5, 1.0), steps=2, batch=2, device="cpu", progress=False)
    assert list(res.rows) == ["truth", "vae", "onestep@0.5", "onestep@1.0", "denoise@0.5", "denoise@1.0"]
    assert all(res.rows["truth"][a] == 1.0 for a in ("color", "background", "shape", "motion"))
    assert all(0.0 <= r["color_and_motion"] <= 1.0 for r in res.rows.values())
    assert "| vae |" in res.markdown() and "| denoise@1.0 |" in res.motion_markdown()
    sens = word_sensitivity(trained[0], levels=(1.0,), latents=1, device="cpu")
    assert list(sens) == ["text", "t=1.0"] and all(v >= 0 for r in sens.values() for v in r.values())
    assert set(sens["t=1.0"]) == {"motion", "colour", "swap"}


def _damaged(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_damaged_folders_are_refused_naming_the_problem(trained, tmp_path):
    t2v, _ = trained
    weights = "transformer/diffusion_pytorch_model.safetensors"

    d = _damaged(t2v, tmp_path, "truncated")
    data = (d / weights).read_bytes()
    (d / weights).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelNotAvailableError, match=r"transformer/diffusion_pytorch_model.safetensors is truncated"):
        load("shapes-wan", model_path=d)

    d = _damaged(t2v, tmp_path, "flipped")
    data = bytearray((d / weights).read_bytes())
    data[-5] ^= 0xFF
    (d / weights).write_bytes(bytes(data))
    with pytest.raises(ModelNotAvailableError, match=r"corrupted \(its SHA-256 differs"):
        load("shapes-wan", model_path=d)

    d = _damaged(t2v, tmp_path, "novae")
    shutil.rmtree(d / "vae")
    with pytest.raises(ModelNotAvailableError, match=r"vae/ is missing"):
        load("shapes-wan", model_path=d)

    d = _damaged(t2v, tmp_path, "notok")
    (d / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ModelNotAvailableError, match=r"tokenizer/tokenizer.json is missing"):
        load("shapes-wan", model_path=d)

    # without a manifest (a folder from elsewhere) the structural checks still name what is missing
    d = _damaged(t2v, tmp_path, "nomanifest")
    (d / MANIFEST).unlink()
    (d / weights).unlink()
    with pytest.raises(ModelNotAvailableError, match=r"transformer/ has no weights file"):
        load("shapes-wan", model_path=d)


def test_causal_training_refuses_an_incomplete_base(trained, tmp_path):
    t2v, _ = trained
    d = _damaged(t2v, tmp_path, "base")
    shutil.rmtree(d / "text_encoder")
    with pytest.raises(ValueError, match="text_encoder/ is missing"):
        train_shapes_wan_causal(tmp_path / "out", base=d, config=QUICK, device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_training_on_a_kept_vae_reuses_it_and_records_where_it_came_from(trained, tmp_path):
    from safetensors.torch import load_file

    t2v, _ = trained
    cfg = override_config(QUICK, ["dit.steps=1", "dit.image_steps=1"])
    out = train_shapes_wan(tmp_path / "kept", config=cfg, device="cpu", progress=False, vae=t2v)
    weights = "vae/diffusion_pytorch_model.safetensors"
    a, b = load_file(t2v / weights), load_file(out / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["vae_from"]["folder"] == str(t2v) and weights in manifest["vae_from"]["files"]
    assert manifest["logs"]["vae"] == [] and manifest["train"]["dit"]["steps"] == 1
    # diffusers writes the folder a component came from into its config: not into a published one
    assert [p for p in out.rglob("*.json") if "_name_or_path" in p.read_text()] == []
    # a folder whose VAE is another architecture is refused before anything trains
    d = _damaged(t2v, tmp_path, "widevae")
    conf = json.loads((d / "vae" / "config.json").read_text())
    conf["base_dim"] = 16
    (d / "vae" / "config.json").write_text(json.dumps(conf))
    (d / MANIFEST).unlink()  # the edit would otherwise be reported as a changed file
    with pytest.raises(ValueError, match="not the shapes-wan VAE .*base_dim"):
        train_shapes_wan(tmp_path / "never", config=cfg, device="cpu", progress=False, vae=d)
    assert not (tmp_path / "never").exists()


def test_training_settings_are_typed_from_the_config_and_bad_ones_are_named():
    cfg = override_config(TrainConfig(), ["dit.steps=40000", "dit.clip_shift=3", "dit.foreground_weight=none",
                                          "causal.mix=0.1,0.6,0.3", "seed=7", "vae.lr=1e-3"])
    assert (cfg.dit.steps, cfg.dit.clip_shift, cfg.dit.foreground_weight) == (40000, 3.0, None)
    assert cfg.causal.mix == (0.1, 0.6, 0.3) and cfg.seed == 7 and cfg.vae.lr == 1e-3
    assert type(cfg.dit.steps) is int and type(cfg.dit.clip_shift) is float
    # everything else is the default
    assert cfg.dit.batch == DitTrain().batch and cfg.causal.steps == CausalTrain().steps
    assert override_config(TrainConfig(), []) == TrainConfig()
    assert "dit.clip_shift" in setting_names() and "causal.mix" in setting_names()
    bad = {
        "dit.stepz=1": "unknown training setting 'dit.stepz'",
        "dit=1": "unknown training setting 'dit'",
        "dit.steps=2.5": "dit.steps must be a whole number",
        "dit.lr=inf": "dit.lr must be a finite number",
        "dit.batch=0": "dit.batch must be >= 1",
        "vae.centred=1.5": "vae.centred is a fraction",
        "frames=18": "frames must be 4k\\+1",
        "size=100": "size must be a multiple of 16",
        "causal.mix=1,2": "causal.mix takes 3 comma-separated numbers",
        "steps": "--set takes key=value",
    }
    for setting, message in bad.items():
        with pytest.raises(ValueError, match=message):
            override_config(TrainConfig(), [setting])
