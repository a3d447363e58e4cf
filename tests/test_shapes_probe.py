"""The latent-space motion probe (``gen.pipelines.shapes.probe``): its clips, its reader,
and one short run end to end."""

import math

import numpy as np
import pytest
import torch

from gen.pipelines.shapes.probe import (
    DIRECTIONS,
    ProbeConfig,
    _cross_attention,
    _Model,
    bump_clips,
    caption_reach,
    main,
    read_directions,
    run_probe,
    teacher_accuracy,
)


def test_reader_reads_every_motion_of_fresh_clips_and_the_reverse_of_reversed_ones(seed):
    rng = np.random.default_rng(seed)
    for speed in (1.0, 2.0, float(rng.uniform(1.0, 3.0))):
        cfg = ProbeConfig(speed=speed)
        motions = [m for m in DIRECTIONS for _ in range(4)]
        clips, caps = bump_clips(rng, len(motions), cfg, motions)
        assert [c.motion for c in caps] == motions
        assert read_directions(clips, speed) == motions
        reverse = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still"}
        assert read_directions(clips.flip(2), speed) == [reverse[m] for m in motions]


def test_clips_are_one_bump_of_the_configured_height_on_a_torus(seed):
    cfg = ProbeConfig(speed=2.0, height=2.5, width=1.0)
    clips, _ = bump_clips(np.random.default_rng(seed), 6, cfg)
    assert clips.shape == (6, 16, cfg.frames, cfg.side, cfg.side)
    assert bool((clips[:, 1:] == 0).all())
    peaks = clips[:, 0].amax((-1, -2))
    assert bool((peaks <= cfg.height + 1e-6).all()) and bool((peaks > 0.6 * cfg.height).all())
    # a width-1 bump on the grid sums to about 2 pi height (the continuous integral)
    assert torch.allclose(clips[:, 0].sum((-1, -2)), torch.full((6, cfg.frames), 2 * math.pi * 2.5), rtol=0.02)


def test_teacher_forcing_at_zero_noise_reads_the_clip_and_never_the_opposite_caption(seed):
    cfg = ProbeConfig(seed=seed % 1000)
    model = _Model(cfg)
    motions = ["left", "right", "up", "down"]
    clips, caps = bump_clips(np.random.default_rng(seed), 4, cfg, motions)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(seed))
    assert teacher_accuracy(model, clips, caps, 0.0, cfg.speed, noise) == (1.0, 1.0)
    assert teacher_accuracy(model, clips, caps, 0.0, cfg.speed, noise, opposite=True) == (1.0, 0.0)


def test_a_short_run_logs_every_score(seed):
    cfg = ProbeConfig(steps=2, batch=2, eval_every=1, eval_clips=5, eval_steps=2, levels=(0.7,), seed=seed % 1000)
    log = run_probe(cfg, progress=False)
    assert [e["step"] for e in log] == [1, 2]
    for entry in log:
        assert math.isfinite(entry["loss"])
        assert set(entry["sampled"]) == {*cfg.motions, "all"}
        assert all(0.0 <= v <= 1.0 for v in entry["sampled"].values())
        reads = entry["sampled_reads"]  # 5 clips over 5 motions: one each, read as one direction
        assert set(reads) == set(cfg.motions) and all(sum(r.values()) == 1 for r in reads.values())
        assert all(entry["sampled"][m] == reads[m].get(m, 0) for m in cfg.motions)
        assert set(entry["teacher"]) == {"0.7"}
        assert set(entry["teacher"]["0.7"]) == {"clip", "opposite_caption"}
        assert len(entry["reach"]) == 4
        assert all(0.0 < r["motion_word"] < 1.0 and r["opposite_change"] > 0.0 for r in entry["reach"])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="probe motions"):
        ProbeConfig(motions=("sideways",))
    with pytest.raises(ValueError, match="steps must be at least 1"):
        ProbeConfig(steps=0)
    with pytest.raises(ValueError, match="speed and width"):
        ProbeConfig(speed=-1.0)
    with pytest.raises(ValueError, match="reach_level"):
        ProbeConfig(reach_level=0.0)
    with pytest.raises(SystemExit, match="steps must be at least 1"):
        main(["--steps", "0"])
    with pytest.raises(SystemExit, match="dit"):
        main(["--set", "vae.steps=3"])
    with pytest.raises(SystemExit, match="unknown training setting"):
        main(["--set", "dit.nonsense=1"])
    with pytest.raises(SystemExit, match="probe motions"):
        main(["--motions", "left,sideways"])
    with pytest.raises(SystemExit, match="unknown device"):
        main(["--device", "gpu0"])
    with pytest.raises(SystemExit, match="not supported"):
        main(["--device", "meta"])


def test_cuda_without_a_gpu_is_refused_before_any_training(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here; use --device cpu"):
        main(["--device", "cuda", "--steps", "1"])


@pytest.mark.gpu
def test_a_cuda_run_follows_the_cpu_run(seed):
    cfg = ProbeConfig(steps=3, batch=2, eval_every=3, eval_clips=5, eval_steps=2, levels=(0.7,), seed=seed % 1000)
    cpu, gpu = run_probe(cfg, progress=False), run_probe(cfg, device="cuda", progress=False)
    # Same clips, noise and start on both devices: the losses differ only by arithmetic.
    assert gpu[0]["loss"] == pytest.approx(cpu[0]["loss"], rel=1e-2)


def test_cross_attention_weights_rebuild_the_blocks_cross_attention_output(seed):
    """The weights ``caption_reach`` reads, times the values ``attn2`` makes of the text it
    was given (hooked), through ``to_out``, give the output the real forward computed."""
    cfg = ProbeConfig(seed=seed % 1000)
    model = _Model(cfg)
    clips, caps = bump_clips(np.random.default_rng(seed), 3, cfg)
    x = 0.5 * clips + 0.5 * torch.randn(clips.shape, generator=torch.Generator().manual_seed(seed))
    texts = {}

    def keep_text(i):
        def hook(module, args):  # attn2(hidden, encoder_hidden_states, None, None)
            texts.setdefault(i, args[1])

        return hook

    hooks = [b.attn2.register_forward_pre_hook(keep_text(i)) for i, b in enumerate(model.transformer.blocks)]
    try:
        got = _cross_attention(model, x, torch.full((3,), 0.5), [c.text() for c in caps])
    finally:
        for h in hooks:
            h.remove()
    for i, (block, rec) in enumerate(zip(model.transformer.blocks, got)):
        attn = block.attn2
        w = rec["weights"]
        assert torch.allclose(w.sum(-1), torch.ones(()).double())
        v = attn.to_v(texts[i]).double().unflatten(2, (attn.heads, -1))  # (B, rows, heads, dh)
        mixed = torch.einsum("bhqk,bkhd->bqhd", w, v).flatten(2)
        rebuilt = torch.nn.functional.linear(mixed, attn.to_out[0].weight.double(), attn.to_out[0].bias.double())
        assert torch.allclose(rebuilt.float(), rec["out"], atol=1e-5), (i, (rebuilt.float() - rec["out"]).abs().max())


def test_reach_is_zero_when_the_encoder_cannot_tell_the_motion_words_apart(seed):
    cfg = ProbeConfig(seed=seed % 1000)
    model = _Model(cfg)
    clips, caps = bump_clips(np.random.default_rng(seed), 4, cfg, ["left", "right", "left", "right"])
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(seed))
    before = caption_reach(model, clips, caps, 0.9, noise)
    assert all(r["opposite_change"] > 1e-4 and 0.0 < r["motion_word"] < 1.0 for r in before)
    emb = model.text_encoder.get_input_embeddings().weight
    left, right = model.tokenizer.convert_tokens_to_ids(["left", "right"])
    with torch.no_grad():
        emb[right] = emb[left]
    after = caption_reach(model, clips, caps, 0.9, noise)
    assert all(r["opposite_change"] == 0.0 for r in after)
    # the weight on the word's row is still read where the word is
    assert all(0.0 < r["motion_word"] < 1.0 for r in after)


def test_frozen_parameters_and_the_text_encoder_stay_at_their_start(seed, monkeypatch):
    import gen.pipelines.shapes.probe as probe

    built = []

    class Kept(probe._Model):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.start = {n: p.detach().clone() for n, p in self.transformer.named_parameters()}
            self.text_start = [p.detach().clone() for p in self.text_encoder.parameters()]
            built.append(self)

    monkeypatch.setattr(probe, "_Model", Kept)
    cfg = ProbeConfig(steps=2, batch=2, eval_every=2, eval_clips=2, eval_steps=1, levels=(0.7,), seed=seed % 1000,
                      frozen=("blocks.0.attn2",), train_text=False)
    run_probe(cfg, progress=False)
    (model,) = built
    moved = {n for n, p in model.transformer.named_parameters() if not torch.equal(p, model.start[n])}
    assert not any(n.startswith("blocks.0.attn2.") for n in moved)
    assert any(n.startswith("blocks.0.attn1.") for n in moved) and any(n.startswith("blocks.1.attn2.") for n in moved)
    assert all(torch.equal(p, s) for p, s in zip(model.text_encoder.parameters(), model.text_start))
    with pytest.raises(ValueError, match="no transformer parameter is named 'blocks.9'"):
        run_probe(ProbeConfig(steps=1, frozen=("blocks.9",)), progress=False)
