"""Causal Wan runner: stock fidelity, chunk-by-chunk == one block-causal masked forward,
sink/window memory, KV-recache on prompt switch, bad configurations."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from gen.pipelines.ar.runner import CausalWanRunner, RunnerConfig
from gen.pipelines.ar.schedules import (
    ChunkAR,
    ChunkConfig,
    NoiseSampler,
    SinkWindowAR,
    SinkWindowConfig,
    warped_timesteps,
)
from gen.pipelines.tiny import build_tiny_pipeline

H = W = 8  # latent pixels: 4x4 = 16 tokens per frame keeps every forward in milliseconds
TPF = (H // 2) * (W // 2)


@pytest.fixture(scope="module")
def transformer():
    return build_tiny_pipeline("tiny-wan").transformer.eval()


class _MaskedProcessor:
    """Stock Wan self-attention under an explicit boolean mask (the slow reference)."""

    def __init__(self, mask):
        self.mask, self.stock = mask, WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.stock(attn, hidden_states, None, self.mask, rotary_emb)


def _reference_forward(transformer, x, t_frames, text, chunk):
    """One stock forward of the whole sequence: per-token timesteps (diffusers' Wan 2.2 path)
    and a block-causal mask: a token sees every token up to the end of its own chunk."""
    nf = x.shape[2]
    blk = torch.arange(nf).repeat_interleave(TPF) // chunk
    mask = (blk[None, :] <= blk[:, None])[None, None]
    saved = [b.attn1.processor for b in transformer.blocks]
    for b in transformer.blocks:
        b.attn1.set_processor(_MaskedProcessor(mask))
    try:
        t_tok = t_frames.repeat_interleave(TPF)[None]
        with torch.no_grad():
            return transformer(x, t_tok, text, return_dict=False)[0]
    finally:
        for b, p in zip(transformer.blocks, saved):
            b.attn1.set_processor(p)


def test_warped_timesteps_match_the_notes():
    assert warped_timesteps() == pytest.approx([1000, 937.5, 833.333, 625.0], abs=1e-3)
    assert warped_timesteps((1000, 800, 600, 400, 200)) == pytest.approx([1000, 952.381, 882.353, 769.231, 555.556], abs=1e-3)
    assert warped_timesteps((1000, 757, 522), 8, warp=False) == [1000, 757, 522]


def test_runner_equals_stock_forward_on_one_chunk(transformer, seed):
    x, text = torch.randn(1, 16, 3, H, W), torch.randn(1, 512, 32)
    with torch.no_grad():
        ref = transformer(x, torch.tensor([640.0]), text, return_dict=False)[0]
    stock = [type(b.attn1.processor) for b in transformer.blocks]
    with CausalWanRunner(transformer, RunnerConfig(cache_frames=3), batch=1, height=H, width=W) as runner:
        runner.set_prompt(text)
        out = runner.forward(x, 640.0, range(3))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert [type(b.attn1.processor) for b in transformer.blocks] == stock  # restored


def test_chunks_with_cache_equal_block_causal_full_forward(transformer, seed):
    chunk, n_frames = 3, 6
    cfg = ChunkConfig(chunk_frames=chunk, steps=(1000, 500))
    text = torch.randn(1, 512, 32)
    sched = ChunkAR(transformer, cfg, backend="torch")
    got = torch.cat(list(sched.generate(text, n_frames, height=H, width=W, noise=NoiseSampler(seed))), dim=2)
    assert sched.runner.cache.k.shape[2] == n_frames * TPF

    # slow reference: the same loop, each step one full forward of [clean chunks | current]
    noise, ts, clean = NoiseSampler(seed), sched.timesteps, []
    for ci in range(n_frames // chunk):
        shape = (1, 16, chunk, H, W)
        x = noise.initial(ci, shape)
        for i, t in enumerate(ts):
            seq = torch.cat([*clean, x], dim=2)
            t_frames = torch.tensor([0.0] * (chunk * len(clean)) + [t] * chunk)
            v = _reference_forward(transformer, seq, t_frames, text, chunk)[:, :, -chunk:]
            x0 = x - t / 1000 * v
            if i + 1 < len(ts):
                x = (1 - ts[i + 1] / 1000) * x0 + ts[i + 1] / 1000 * noise.renoise(ci, i, shape)
        clean.append(x0)
    ref = torch.cat(clean, dim=2)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_sink_window_cache_memory_is_constant(transformer, seed):
    cfg = SinkWindowConfig(chunk_frames=3, window_frames=9, sink_frames=3, steps=(1000,))
    text = torch.randn(1, 512, 32)
    sizes, spans = [], []
    for n_frames in (6, 12, 21):
        sched = SinkWindowAR(transformer, cfg, backend="torch")
        for _ in sched.generate(text, n_frames, height=H, width=W, noise=NoiseSampler(seed)):
            spans.append(len(sched.runner.last_context.read_frames))
            assert len(sched._history) <= cfg.window_frames
        sizes.append(sched.runner.cache.nbytes)
        ctx = sched.runner.last_context  # the last commit: sink + most recent + own chunk
        last = list(range(n_frames - 3, n_frames))
        assert list(ctx.read_frames[:3]) == [0, 1, 2]
        assert list(ctx.read_frames[-3:]) == last
        assert ctx.read_frames[3:-3] == tuple(range(max(3, n_frames - 6), n_frames - 3))
    assert len(set(sizes)) == 1 and sizes[0] == 2 * 2 * 9 * TPF * 2 * 16 * 4  # K+V, 2 layers, 9 frames
    assert max(spans) == cfg.window_frames


@pytest.mark.parametrize("keep_sink", [True, False])
def test_prompt_switch_recaches_exactly_the_window(transformer, seed, keep_sink):
    cfg = SinkWindowConfig(chunk_frames=3, window_frames=9, sink_frames=3, steps=(1000,), keep_sink_on_switch=keep_sink)
    text_a, text_b = torch.randn(1, 512, 32), torch.randn(1, 512, 32)
    sched = SinkWindowAR(transformer, cfg, backend="torch")
    seen = {}

    def on_recache(frames):
        cache = sched.runner.cache
        seen["frames"] = frames
        seen["sink_after"] = cache.k[:, :, : 3 * TPF].clone()
        seen["ring_after"] = cache.k[:, :, 3 * TPF :].clone()
        seen["slot_frame"] = list(cache.slot_frame)

    gen = sched.generate(text_a, 15, height=H, width=W, noise=NoiseSampler(seed), switches=[(12, text_b)], on_recache=on_recache)
    for i, _ in enumerate(gen):
        if i == 3:  # frames 0..11 done: snapshot before the switch at frame 12
            sink_before = sched.runner.cache.k[:, :, : 3 * TPF].clone()
            ring_before = sched.runner.cache.k[:, :, 3 * TPF :].clone()
    assert seen["frames"] == [6, 7, 8, 9, 10, 11]  # the ring: every cached non-sink frame
    assert not torch.equal(seen["ring_after"], ring_before)
    if keep_sink:
        assert torch.equal(seen["sink_after"], sink_before)
        assert seen["slot_frame"][:3] == [0, 1, 2]
    else:
        assert seen["slot_frame"][:3] == [6, 7, 8]  # re-anchored to the oldest recached frames
        ring = seen["ring_after"]
        slot = {f: s - 3 for s, f in enumerate(seen["slot_frame"]) if s >= 3}
        for i, f in enumerate((6, 7, 8)):
            rows = slice(slot[f] * TPF, (slot[f] + 1) * TPF)
            assert torch.equal(seen["sink_after"][:, :, i * TPF : (i + 1) * TPF], ring[:, :, rows])


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="smaller than a chunk"):
        SinkWindowConfig(chunk_frames=3, window_frames=2, sink_frames=0)
    with pytest.raises(ValueError, match="sink_frames=9 does not fit"):
        SinkWindowConfig(chunk_frames=3, window_frames=9, sink_frames=9)
    with pytest.raises(ValueError, match="smaller than the window"):
        RunnerConfig(cache_frames=4, sink_frames=4)


def test_switch_out_of_range_raises(transformer):
    sched = ChunkAR(transformer, ChunkConfig(steps=(1000,)), backend="torch")
    text = torch.randn(1, 512, 32)
    with pytest.raises(ValueError, match="outside the video"):
        next(sched.generate(text, 6, height=H, width=W, switches=[(6, text)]))
