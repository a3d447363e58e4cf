"""The steer start (``gen.pipelines.shapes.steer``): the caption's left/right word wired to
a self-attention head that looks one token the other way in the previous latent frame."""

import numpy as np
import pytest
import torch

from gen.pipelines.shapes.config import DitTrain
from gen.pipelines.shapes.probe import ProbeConfig, _cross_attention, _Model, bump_clips, run_probe
from gen.pipelines.shapes.steer import (
    STEERED_HEAD,
    WRITER_HEAD,
    _self_attention,
    previous_frame_offsets,
    steer_start,
)

LOCAL = DitTrain(video_local_heads=1.0)


@pytest.fixture(scope="module", params=[0, 17])
def steered(request):
    # Fixed weight seeds: the start is built from step-0 activations and is not good on every
    # seed (seeds 1-24 all pass the checks below; one unrecorded seed of 0-999 built a writer
    # that read the motion word in 3 of 6 captions, with its heads turned the wrong way).
    # The clips the checks are measured on are fresh.
    cfg = ProbeConfig(motions=("left", "right"), steer_start=True, seed=request.param, dit=LOCAL)
    return cfg, _Model(cfg)


def test_steered_heads_look_against_the_captions_motion_in_the_previous_frame(steered):
    cfg, model = steered
    right = previous_frame_offsets(model, cfg, "right")
    left = previous_frame_offsets(model, cfg, "left")
    for r, lt in zip(right[1:], left[1:]):
        # moving right: the bump came from one token to the left (offset -1), and vice versa
        assert r[-1] > 5 * r[1] and r[-1] > r[0]
        assert lt[1] > 5 * lt[-1] and lt[1] > lt[0]
    stock = _Model(ProbeConfig(motions=("left", "right"), seed=cfg.seed, dit=LOCAL))
    for r in previous_frame_offsets(stock, cfg, "right"):
        assert 0.5 < r[-1] / r[1] < 2.0  # no side preferred without the start


def test_the_writer_head_reads_the_motion_word(steered):
    cfg, model = steered
    clips, caps = bump_clips(np.random.default_rng(), 6, cfg)
    xt = 0.1 * clips + 0.9 * torch.randn(clips.shape)
    texts = [c.text() for c in caps]
    ids = model.tokenizer(texts).input_ids
    rows = [r.index(model.tokenizer.convert_tokens_to_ids(c.motion)) for r, c in zip(ids, caps)]
    weights = _cross_attention(model, xt, torch.full((6,), 0.9), texts)[0]["weights"]  # block 0
    on_word = torch.stack([weights[i, WRITER_HEAD, :, r].mean() for i, r in enumerate(rows)])
    # measured over 8 seeds x 12 captions: 0.34-1.0 per caption, mean 0.9 (the stock head: ~0.03)
    assert float(on_word.mean()) > 0.6
    others = torch.stack([weights[i, h, :, r].mean() for i, r in enumerate(rows) for h in range(4) if h != WRITER_HEAD])
    assert float(others.max()) < 0.2


def test_self_attention_weights_rebuild_the_blocks_self_attention_output(steered):
    cfg, model = steered
    clips, caps = bump_clips(np.random.default_rng(), 2, cfg)
    xt = 0.1 * clips + 0.9 * torch.randn(clips.shape)
    texts = [c.text() for c in caps]
    got = {}
    hooks = []
    for i, b in enumerate(model.transformer.blocks):
        hooks += [b.attn1.to_v.register_forward_hook(lambda m, a, o, i=i: got.setdefault(("v", i), o.detach())),
                  b.attn1.register_forward_hook(lambda m, a, o, i=i: got.setdefault(("out", i), o.detach()))]
    try:
        weights = _self_attention(model, xt, texts)
    finally:
        for h in hooks:
            h.remove()
    for i, (w, b) in enumerate(zip(weights, model.transformer.blocks)):
        v = got[("v", i)].double().unflatten(-1, (4, -1)).transpose(1, 2)  # (B, heads, tokens, dim)
        mixed = (w @ v).transpose(1, 2).flatten(2)
        out = torch.nn.functional.linear(mixed, b.attn1.to_out[0].weight.double(), b.attn1.to_out[0].bias.double())
        torch.testing.assert_close(out, got[("out", i)].double(), rtol=1e-4, atol=1e-4)
    assert STEERED_HEAD < 4


def test_refused_where_it_cannot_be_built():
    with pytest.raises(ValueError, match="horizontal axis only"):
        ProbeConfig(motions=("left", "up"), steer_start=True)
    cfg = ProbeConfig(motions=("left", "right"))
    model = _Model(cfg)
    model.transformer.blocks = model.transformer.blocks[:1]
    with pytest.raises(ValueError, match="at least 2 blocks"):
        steer_start(model, cfg)


def test_a_short_run_from_the_steer_start(seed):
    cfg = ProbeConfig(steps=1, batch=2, eval_every=1, eval_clips=2, eval_steps=2, levels=(0.7,),
                      motions=("left", "right"), steer_start=True, seed=seed % 1000)
    log = run_probe(cfg, progress=False)
    assert log[-1]["step"] == 1 and np.isfinite(log[-1]["loss"])
