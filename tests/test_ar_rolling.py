"""Rolling Forcing: the cached rolling loop equals a slow reference written with full masked
attention (stock forwards, explicit masks and RoPE positions), plus the plan and bad configs."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from gen.pipelines.ar.rolling import RollingConfig, RollingForcingAR, substep_timesteps
from gen.pipelines.ar.schedules import NoiseSampler
from gen.pipelines.tiny import build_tiny_pipeline

H = W = 4  # latent pixels: 2x2 = 4 tokens per frame
TPF = (H // 2) * (W // 2)


@pytest.fixture(scope="module")
def transformer():
    return build_tiny_pipeline("tiny-wan").transformer.eval()


class _Masked:
    """Stock Wan self-attention with an explicit mask and explicit RoPE tables."""

    def __init__(self, mask, rope):
        self.mask, self.rope, self.stock = mask, rope, WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.stock(attn, hidden_states, None, self.mask, self.rope)


def _rope(transformer, positions):
    """Stock rotary tables for frames at arbitrary temporal ``positions`` (one per frame)."""
    rope = transformer.rope
    cos = rope.freqs_cos.split([rope.t_dim, rope.h_dim, rope.w_dim], 1)
    sin = rope.freqs_sin.split([rope.t_dim, rope.h_dim, rope.w_dim], 1)
    hp, wp = H // 2, W // 2
    p = torch.as_tensor(positions)

    def table(parts):
        f = parts[0][p].view(-1, 1, 1, rope.t_dim).expand(-1, hp, wp, -1)
        h = parts[1][:hp].view(1, hp, 1, -1).expand(len(p), hp, wp, -1)
        w = parts[2][:wp].view(1, 1, wp, -1).expand(len(p), hp, wp, -1)
        return torch.cat([f, h, w], -1).reshape(1, len(p) * hp * wp, 1, -1)

    return table(cos), table(sin)


class _Reference:
    """Rolling Forcing without a cache. Each forward is one stock forward over every node it
    depends on: committed frames re-run at t=0 under the mask of their own commit pass
    (sink + most recent committed frames, capped at the span, + their chunk), so their K/V
    equal the committed ones. In relative mode the sink is re-roped right before each
    reader's first non-sink frame: one copy of the sink per offset (a sink frame only attends
    the sink, so its states do not depend on where it sits)."""

    def __init__(self, transformer, cfg, text):
        self.tr, self.cfg, self.text = transformer, cfg, text
        self.clean: dict[int, torch.Tensor] = {}  # frame -> (B, C, 1, H, W)
        self.reads: dict[int, list[int]] = {}  # committed frame -> frames its commit pass attended

    def plan(self, frames):
        """Frames attended by queries ``frames``: sink + most recent committed + own."""
        s, cap = self.cfg.sink_frames, self.cfg.max_attention_frames
        sink = [f for f in range(s) if f in self.clean and f < frames[0]]
        older = [f for f in sorted(self.clean) if f < frames[0] and f not in sink]
        budget = cap - len(sink) - len(frames)
        return sink + (older[len(older) - budget:] if budget else []) + list(frames)

    def _positions(self, read_list, own):
        """``(frame, RoPE position)`` of a read list: absolute, except that in relative mode
        the committed sink frames sit right before the first frame after them."""
        sink = [f for f in read_list if f < self.cfg.sink_frames and f not in own]
        if self.cfg.positions == "absolute" or not sink:
            return [(f, f) for f in read_list]
        first = read_list[len(sink)]
        return [(f, first - len(sink) + i if i < len(sink) else f) for i, f in enumerate(read_list)]

    def forward(self, x, t_frames, frames):
        nodes: list[tuple[int, int]] = []  # (frame, position)
        reads: dict[tuple[int, int], list[tuple[int, int]]] = {}

        def visit(node, read):
            if node in reads:
                return
            reads[node] = read
            nodes.append(node)
            for f, p in read:
                if f not in frames:  # a committed frame: re-run under its commit pass's mask
                    shift = p - f  # a re-roped sink copy is shifted as a whole
                    visit((f, p), [(g, q + shift) for g, q in self._positions(*self.reads[f])])

        read_list = self.plan(frames)
        read = self._positions(read_list, frames)
        queries = read[len(read) - len(frames):]
        for q in queries:
            visit(q, read)
        nodes = [n for n in nodes if n not in queries] + queries
        idx = {n: i for i, n in enumerate(nodes)}
        allow = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
        for n, rl in reads.items():
            allow[idx[n], [idx[r] for r in rl]] = True
        mask = allow.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1)[None, None]
        lat = torch.cat([self.clean[f] for f, _ in nodes[: -len(frames)]] + [x], 2)
        t_tok = torch.cat([torch.zeros(len(nodes) - len(frames)), t_frames]).repeat_interleave(TPF)[None]
        procs = [b.attn1.processor for b in self.tr.blocks]
        for b in self.tr.blocks:
            b.attn1.set_processor(_Masked(mask, _rope(self.tr, [p for _, p in nodes])))
        try:
            with torch.no_grad():
                out = self.tr(lat, t_tok, self.text, return_dict=False)[0]
        finally:
            for b, p in zip(self.tr.blocks, procs):
                b.attn1.set_processor(p)
        return out[:, :, -len(frames):], read_list

    def commit(self, x0, frames):
        read_list = self.plan(frames)
        for i, f in enumerate(frames):
            self.clean[f] = x0[:, :, i : i + 1]
            self.reads[f] = (read_list, frames)

    def generate(self, n_frames, noise, ts):
        """``ts``: per level, the timesteps of its substeps down to the next level
        (``substep_timesteps``; one forward per window step with ``substeps=1``)."""
        cf, lv, sampler = self.cfg.chunk_frames, self.cfg.levels, self.cfg.sampler
        k = len(ts[0]) - 1
        n, state, out = n_frames // cf, {}, {}
        for w in range(n + lv - 1):
            chunks = list(range(max(0, w - lv + 1), min(n - 1, w) + 1))
            if w < n:
                state[w] = noise.initial(w, (1, 16, cf, H, W))
            frames = list(range(chunks[0] * cf, (chunks[-1] + 1) * cf))
            for j in range(k):
                x = torch.cat([state[b] for b in chunks], 2)
                t = torch.tensor([ts[w - b][j] for b in chunks for _ in range(cf)])
                v, _ = self.forward(x, t, frames)
                x0 = x - (t / 1000).view(1, 1, -1, 1, 1) * v
                for i, b in enumerate(chunks):
                    xb, vb = x0[:, :, i * cf : (i + 1) * cf], v[:, :, i * cf : (i + 1) * cf]
                    sig = ts[w - b][j + 1] / 1000
                    if sig > 0 and sampler == "euler":
                        state[b] = state[b] + (sig - ts[w - b][j] / 1000) * vb
                    elif sig > 0:
                        state[b] = (1 - sig) * xb + sig * noise.renoise(b, (w - b) * k + j, xb.shape)
                    else:
                        out[b] = xb
                        self.commit(xb, list(range(b * cf, (b + 1) * cf)))
        return torch.cat([out[b] for b in range(n)], 2)


@pytest.mark.parametrize("positions", ["relative", "absolute"])
def test_rolling_matches_masked_reference(transformer, seed, positions):
    # 1-frame chunks, 3 levels, span 6 with a 1-frame sink: the window fills, the span cap
    # bites (working frames trimmed), the sink is re-roped, and the window drains
    cfg = RollingConfig(chunk_frames=1, steps=(1000, 700, 400), sink_frames=1, max_attention_frames=6,
                        positions=positions)
    text = torch.randn(1, 512, 32)
    sched = RollingForcingAR(transformer, cfg, backend="torch")
    n_frames = 9
    got = torch.cat(list(sched.generate(text, n_frames, height=H, width=W, noise=NoiseSampler(seed))), 2)
    ref = _Reference(transformer, cfg, text).generate(n_frames, NoiseSampler(seed), sched.substep_timesteps)
    assert got.shape == (1, 16, n_frames, H, W)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


@pytest.mark.parametrize("sampler", ["euler", "renoise"])
def test_rolling_substeps_match_masked_reference(transformer, seed, sampler):
    # three forwards per window step, every chunk moved a third of the way to its next level
    cfg = RollingConfig(chunk_frames=1, steps=(1000, 600), shift=3.0, sink_frames=1, max_attention_frames=4,
                        sampler=sampler, substeps=3)
    text = torch.randn(1, 512, 32)
    sched = RollingForcingAR(transformer, cfg, backend="torch")
    got = torch.cat(list(sched.generate(text, 5, height=H, width=W, noise=NoiseSampler(seed))), 2)
    ref = _Reference(transformer, cfg, text).generate(5, NoiseSampler(seed), sched.substep_timesteps)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_substep_timesteps_cut_each_level_in_listed_units():
    cfg = RollingConfig(steps=(1000, 667, 333), shift=3.0, substeps=2)
    sub = substep_timesteps(cfg)

    def warp(k):  # the shifted schedule at listed step k (k / 1000 = unshifted sigma)
        u = k / 1000
        return 1000 * 3 * u / (1 + 2 * u)

    want = [[warp(1000), warp(833.5), warp(667)], [warp(667), warp(500), warp(333)], [warp(333), warp(166.5), 0.0]]
    assert all(a == pytest.approx(b, abs=1e-9) for row, wrow in zip(sub, want) for a, b in zip(row, wrow))
    # one substep: the levels themselves, as warped_timesteps gives them
    one = substep_timesteps(RollingConfig(steps=(1000, 800, 600, 400, 200)))
    levels = RollingForcingAR(None, RollingConfig()).timesteps
    assert [row[0] for row in one] == pytest.approx(levels, abs=1e-9)
    assert [row[1] for row in one] == pytest.approx([*levels[1:], 0.0], abs=1e-9)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="substeps must be an int >= 1"):
            RollingConfig(substeps=bad)


def test_rolling_defaults_and_plan(transformer, seed):
    cfg = RollingConfig()
    assert (cfg.levels, cfg.window_frames, cfg.sink_frames, cfg.max_attention_frames) == (5, 15, 3, 21)
    sched = RollingForcingAR(transformer, cfg, backend="torch")
    assert sched.timesteps == pytest.approx([1000, 952.381, 882.353, 769.231, 555.556], abs=1e-3)
    steps = sched.window_steps(4)
    assert steps[:5] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3]] and len(steps) == 8
    assert steps[-1] == [3]
    seen = []
    gen = sched.generate(torch.randn(1, 512, 32), 24, height=H, width=W, noise=NoiseSampler(seed))
    for _ in gen:
        seen.append(sched.runner.last_context)
    assert len(seen) == 8
    # once the window is full: commit of chunk 6 (frames 18..20) attends sink + 15 recent + own = 21
    ctx = seen[6]
    assert ctx.read_frames[:3] == (0, 1, 2) and ctx.read_frames[-3:] == (18, 19, 20)
    assert len(ctx.read_frames) == 21 and ctx.key_pos == tuple(range(21))  # sink re-roped before the rest


def test_rolling_bad_input(transformer):
    with pytest.raises(ValueError, match="smaller than the window"):
        RollingConfig(chunk_frames=3, max_attention_frames=12)
    with pytest.raises(ValueError, match="does not fit"):
        RollingConfig(sink_frames=9)
    with pytest.raises(ValueError, match="whole chunks"):
        RollingConfig(sink_frames=2)
    sched = RollingForcingAR(transformer, RollingConfig(steps=(1000,), max_attention_frames=6), backend="torch")
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        next(sched.generate(torch.randn(1, 512, 32), 4, height=H, width=W))
    with pytest.raises(ValueError, match="not supported"):
        next(sched.generate(torch.randn(1, 512, 32), 6, height=H, width=W, switches=[(3, None)]))


def test_long_video_rolling(tmp_path):
    from gen.long import long_video, long_video_frames

    with pytest.raises(ValueError, match="not supported by the rolling schedule"):
        next(long_video_frames("a", schedule="rolling", seconds=2, switches=[(1.0, "b")]))
    out = tmp_path / "r.mp4"
    res = long_video("a red ball", out, schedule="rolling", seconds=2.0, height=32, width=32, progress=False,
                     device="cpu")
    assert out.is_file() and res.frames == 21  # 16 frames at 8 fps: 2 chunks of 3 latents -> 1 + 4*5
