"""A start in which the caption's ``left`` / ``right`` word steers self-attention (the probe's x axis).

The probe (``probe.py``) showed that a motion chosen by a global signal is not learned from
the stock or the local start, even with the direction handed over as a clean input channel,
while the same oracle channel is used within 1000 steps once one self-attention head's
horizontal look is a linear function of it (the shapes README, "A path for the signal").
This start builds that path for the caption, from the model's own activations at step 0
(probe clips noised to 0.9, "right" and "left" versions of the same captions):

* **Writer**: head ``WRITER_HEAD`` of block 0's cross-attention gets a constant query along
  Fisher's direction between the motion words' keys and the other words', scaled so that
  the motion word scores ``score`` (the zero padding rows score ``log(n / m)``, about 5.5);
  its output projection writes ``beta * (value . c) * e``, where ``c`` is the value
  difference of "right" and "left" and ``e`` a fixed random unit direction of the residual
  stream, ``beta`` chosen so that the two captions sit about ``signal`` either side of 0
  along ``e`` in block 1's self-attention input (layer-normed units; 4.5 measured at the
  default 5, the layer norm is not linear), the output bias centring them on 0.
* **Steered heads**: head ``STEERED_HEAD`` of every later block looks at the previous latent
  frame (time pair 0 of its query at phase -1 rad) near the same place (constant rows on
  the spatial RoPE pairs, as ``train._local_video_init``), and the second row of its
  horizontal pair 0 reads the right-minus-left direction of its input, scaled so the
  caption turns the phase by 1 rad: "right" looks one token to the left in the previous
  frame, "left" one token to the right, the empty prompt straight back.

Everything still trains. Only the horizontal axis is built; ``up`` / ``down``, speeds and
the other motions of ``gen train-tiny`` are not.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .grammar import Caption

__all__ = ["STEERED_HEAD", "WRITER_HEAD", "WriterGuard", "previous_frame_offsets", "steer_start", "writer_scores"]

WRITER_HEAD = 3
STEERED_HEAD = 2
_NOISE = 0.9  # the noise level of the clips the start is measured on: where direction is decided
_CLIPS = 24


def _probe_inputs(model, cfg, motion: str, seed: int) -> tuple[torch.Tensor, list[str], list[Caption]]:
    from .probe import bump_clips

    clips, caps = bump_clips(np.random.default_rng(seed), _CLIPS, cfg, motions=[motion] * _CLIPS)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(seed + 1))
    return (1 - _NOISE) * clips + _NOISE * noise, [c.text() for c in caps], caps


def _run(model, x: torch.Tensor, prompts: list[str], modules: dict) -> dict:
    """One forward at noise 0.9; the first output of each module in ``modules`` (name ->
    module), or its first input for ``("in", ...)`` names, detached on the CPU."""
    from .probe import _keeper

    got = {}
    hooks = [module.register_forward_pre_hook(_keeper(got, name, first_input=True))
             if isinstance(name, tuple) and name[0] == "in" else module.register_forward_hook(_keeper(got, name))
             for name, module in modules.items()]
    try:
        with torch.no_grad():
            model.predict(x, torch.full((x.shape[0],), _NOISE), prompts)
    finally:
        for h in hooks:
            h.remove()
    return {name: value.detach().cpu() for name, value in got.items()}


def _block_inputs(model, cfg) -> list[tuple[torch.Tensor, float, float]]:
    """Per block: the unit right-minus-left direction of its self-attention input (mean over
    clips and tokens), half the mean projected difference and the midpoint's projection
    (layer-normed units)."""
    blocks = model.transformer.blocks
    mods = {("in", i): b.attn1 for i, b in enumerate(blocks)}
    x, _, caps = _probe_inputs(model, cfg, "right", 123)
    right = _run(model, x, [c.text() for c in caps], mods)
    left = _run(model, x, [Caption(c.shape, c.color, "left", c.background).text() for c in caps], mods)
    out = []
    for i in range(len(blocks)):
        diff = right[("in", i)] - left[("in", i)]
        d = diff.mean((0, 1))
        e = d / d.norm().clamp_min(1e-12)  # block 0's input does not differ: e = 0
        mid = float(((right[("in", i)] + left[("in", i)]) @ e).mean() / 2)
        out.append((e, float((diff @ e).mean() / 2), mid))
    return out


def _writer_slice(attn) -> slice:
    """The writer head's rows of block 0's cross-attention projections."""
    hd = attn.to_q.weight.shape[0] // attn.heads
    return slice(WRITER_HEAD * hd, (WRITER_HEAD + 1) * hd)


def _writer(model, cfg, score: float, signal: float) -> None:
    attn = model.transformer.blocks[0].attn2
    sl = _writer_slice(attn)
    hd = sl.stop - sl.start
    mods = {"k": attn.norm_k, "v": attn.to_v, "q": attn.norm_q}
    keys, values, inputs = {}, {}, {}
    others = []
    for motion in ("right", "left"):
        x, texts, _ = inputs[motion] = _probe_inputs(model, cfg, motion, 321)
        rec = _run(model, x, texts, mods)
        ids = model.tokenizer(texts).input_ids
        word = model.tokenizer.convert_tokens_to_ids(motion)
        rows = [r.index(word) for r in ids]
        keys[motion] = torch.stack([rec["k"][i, r, sl] for i, r in enumerate(rows)])
        values[motion] = torch.stack([rec["v"][i, r, sl] for i, r in enumerate(rows)]).mean(0)
        others += [rec["k"][i, j, sl] for i, r in enumerate(rows) for j in range(len(ids[i])) if j != r]
    motion_key = torch.cat(list(keys.values())).mean(0)
    others = torch.stack(others).double()
    # Fisher's direction: the other words' spread along it counts, not just their mean (with
    # the plain mean difference a colour word outscored "left" in 1 of 36 captions)
    spread = torch.cov(others.T) + 1e-3 * torch.eye(others.shape[1], dtype=torch.float64)
    d = torch.linalg.solve(spread, motion_key.double() - others.mean(0)).float()
    with torch.no_grad():
        attn.to_q.weight[sl] = 0.0
        attn.to_q.bias[sl] = 3.0 * d / d.norm()
        x, texts, _ = inputs["right"]
        q = _run(model, x, texts, {"q": attn.norm_q})["q"][..., sl].mean((0, 1))
        attn.norm_q.weight[sl] *= score / (float(q @ motion_key) / hd**0.5)
    c = values["right"] - values["left"]
    c = c / c.norm()
    offset = float((values["right"] + values["left"]) @ c / 2)
    width = attn.to_out[0].weight.shape[0]
    e = torch.randn(width, generator=torch.Generator().manual_seed(cfg.seed + 11))
    e = e / e.norm()
    bias0 = attn.to_out[0].bias.detach().clone()

    def write(beta: float, offset: float) -> None:
        with torch.no_grad():
            attn.to_out[0].weight[:, sl] = beta * torch.outer(e, c)
            attn.to_out[0].bias.copy_(bias0 - beta * offset * e)

    write(1.0, offset)  # the written difference is linear in beta; measure it at 1, then scale
    beta = signal / _block_inputs(model, cfg)[1][1]
    write(beta, offset)
    # centre: "right" and "left" equally far either side of 0 in block 1's input (secant on
    # the output bias along e; the layer norm makes the midpoint only nearly linear in it)
    _, _, mid0 = _block_inputs(model, cfg)[1]
    write(beta, offset + 1.0 / beta)
    _, _, mid1 = _block_inputs(model, cfg)[1]
    write(beta, offset + mid0 / (mid0 - mid1) / beta)


def writer_scores(model, cfg, seed: int = 321) -> tuple[float, float]:
    """The writer head's mean score of the motion word (query averaged over the video
    tokens, ``q . k / sqrt(head_dim)``) and its mean attention weight on the word, over
    probe clips noised to 0.9 with "right" and "left" captions (``_CLIPS`` each)."""
    attn = model.transformer.blocks[0].attn2
    sl = _writer_slice(attn)
    hd = sl.stop - sl.start
    scores, shares = [], []
    for motion in ("right", "left"):
        x, texts, _ = _probe_inputs(model, cfg, motion, seed)
        rec = _run(model, x, texts, {"k": attn.norm_k, "q": attn.norm_q})
        ids = model.tokenizer(texts).input_ids
        word = model.tokenizer.convert_tokens_to_ids(motion)
        q, k = rec["q"][..., sl], rec["k"][..., sl]  # (B, tokens, hd), (B, text rows, hd)
        s = torch.einsum("btd,bjd->btj", q, k) / hd**0.5
        for i, r in enumerate(ids):
            j = r.index(word)
            scores.append(float(s[i, :, j].mean()))
            # the pipeline's zero padding rows are zero keys (score 0): each adds exp(0)
            words = s[i, :, : len(r)].double()
            pad = torch.full((words.shape[0], 1), math.log(cfg.dit.text_len - len(r)), dtype=torch.float64)
            shares.append(float((words[:, j] - torch.cat([words, pad], 1).logsumexp(1)).exp().mean()))
    return float(np.mean(scores)), float(np.mean(shares))


class WriterGuard:
    """Keeps ``steer_start``'s writer as built while the rest of the model trains.

    Training mutes the writer even with its own rows frozen, through the key RMSNorm that
    Wan takes across all heads: the other heads' rows of the motion word's key grow, and the
    writer head's key of the word shrinks after the norm until its score falls below the
    zero padding's (the shapes README, "A path for the signal"). The guard takes the writer
    head out of the gradient: forward hooks on block 0's cross-attention pass the writer
    head's slice of ``norm_q``, ``norm_k`` and ``to_v`` outputs on detached, so no gradient
    reaches the text encoder, the other heads' rows or the shared norms through it (the
    forward is unchanged: the stock model, the stock numbers). Called after every optimiser
    step, it puts the writer's rows back (query, key and value rows of its head, its columns
    of the output projection) and, every ``every`` steps, rescales its head's slice of the
    ``norm_q`` / ``norm_k`` weights (by at most 25% a call) so the word's mean score
    (``writer_scores``) is back at its value at the start: the norms' other heads still
    train and move the shared root mean square. The EMA copies of those parameters are
    set to the same values. ``remove()`` takes the hooks off.

    Measured (the shapes README, "Keeping the writer"): this does not keep the writer. Its
    share of the word fell from 0.9 to 0.04 in 1000 probe steps, its keys turned by the
    trained text MLP in front of every cross-attention and by the norms' other heads. What
    keeps it is holding everything in front of it: ``probe.py --steer-start --freeze
    blocks.0.attn2 --freeze condition_embedder.text_embedder --freeze-text`` (samples 68% and
    98% their caption's way at 1000 steps, seeds 0 and 17).
    """

    def __init__(self, model, cfg, every: int = 10):
        attn = model.transformer.blocks[0].attn2
        sl = self.sl = _writer_slice(attn)
        self.model, self.cfg, self.attn, self.every, self.calls = model, cfg, attn, every, 0
        rows = [(attn.to_q.weight, sl), (attn.to_q.bias, sl), (attn.to_k.weight, sl), (attn.to_k.bias, sl),
                (attn.to_v.weight, sl), (attn.to_v.bias, sl), (attn.to_out[0].weight, (slice(None), sl))]
        self.rows = [(p, idx, p.detach()[idx].clone()) for p, idx in rows]
        self.target, _ = writer_scores(model, cfg)
        self.last_scale = 1.0
        self._shadow = None  # (the EMA, its shadow tensors by parameter id)

        def detach_writer(module, args, output):
            a, b = sl.start, sl.stop
            return torch.cat([output[..., :a], output[..., a:b].detach(), output[..., b:]], -1)

        self.hooks = [m.register_forward_hook(detach_writer) for m in (attn.norm_q, attn.norm_k, attn.to_v)]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    @torch.no_grad()
    def __call__(self, ema=None) -> None:
        """Restore the writer after an optimiser step; ``ema``: the stage's ``train._Ema``."""
        for p, idx, value in self.rows:
            p[idx] = value
        self.calls += 1
        if self.calls % self.every == 0:
            score, _ = writer_scores(self.model, self.cfg)
            # the score is q . k: split the correction between the two norms' weights; a
            # score at or below 0 is left alone (no scale of the weights brings it back)
            f = math.sqrt(self.target / score) if score > 0 else 1.0
            f = min(max(f, 0.8), 1.25)
            self.attn.norm_q.weight[self.sl] *= f
            self.attn.norm_k.weight[self.sl] *= f
            self.last_scale = f
        if ema is not None:
            if self._shadow is None or self._shadow[0] is not ema:  # built once per EMA
                self._shadow = (ema, {id(p): s for p, s in zip(ema.params, ema.shadow)})
            shadow = self._shadow[1]
            for p, idx, _ in self.rows:
                if id(p) in shadow:
                    shadow[id(p)][idx] = p[idx]
            for norm in (self.attn.norm_q, self.attn.norm_k):
                if id(norm.weight) in shadow:
                    shadow[id(norm.weight)][self.sl] = norm.weight[self.sl]


def _steered(model, cfg, gain: float) -> None:
    tr = model.transformer
    hd = tr.config.attention_head_dim
    space = 2 * (hd // 6)  # diffusers' WanRotaryPosEmbed split, as train._local_video_init
    h0, w0 = hd - 2 * space, hd - space
    base = STEERED_HEAD * hd
    reads = _block_inputs(model, cfg)
    with torch.no_grad():
        for i, block in enumerate(tr.blocks):
            if i == 0:
                continue  # block 0's self-attention comes before any cross-attention
            e, half, _ = reads[i]
            a = block.attn1
            for lin, norm in ((a.to_q, a.norm_q), (a.to_k, a.norm_k)):
                norm.weight[base:base + hd] = 0.1  # the head's other rows start quiet
                for row, g in ((h0, 1.1), (h0 + 2, 1.55), (w0, gain), (w0 + 2, 1.55)):
                    lin.weight[base + row] = 0.0
                    lin.bias[base + row] = 3.0
                    norm.weight[base + row] = g
                    lin.weight[base + row + 1] = 0.0
                    lin.bias[base + row + 1] = 0.0
            # time pair 0: the key constant, the query at phase -1 rad (the previous frame)
            for lin, norm, g in ((a.to_k, a.norm_k, gain), (a.to_q, a.norm_q, gain * math.cos(-1.0))):
                lin.weight[base] = 0.0
                lin.bias[base] = 3.0
                norm.weight[base] = g
            a.to_k.weight[base + 1] = 0.0
            a.to_k.bias[base + 1] = 0.0
            a.to_q.weight[base + 1] = 0.0
            a.to_q.bias[base + 1] = 3.0
            a.norm_q.weight[base + 1] = gain * math.sin(-1.0)
            # horizontal pair 0: "right" (positive along e) turns the query's phase by -1 rad
            a.to_q.weight[base + w0 + 1] = -math.tan(1.0) * 3.0 / half * e
            a.to_q.bias[base + w0 + 1] = 0.0
            a.norm_q.weight[base + w0 + 1] = gain


def steer_start(model, cfg, *, score: float = 11.0, signal: float = 5.0, gain: float = 1.1) -> None:
    """Build the writer and the steered heads into ``model`` (a ``probe._Model``) in place.

    Args:
        score: the motion word's cross-attention score in the writer head (padding: ~5.5).
        signal: how far either side of 0 "right" and "left" put block 1's self-attention
            input along the written direction, layer-normed units (the oracle channel
            measured 5.5).
        gain: RMSNorm weight of the steered heads' time and horizontal rows.
    """
    tr = model.transformer
    if tr.config.num_attention_heads <= max(WRITER_HEAD, STEERED_HEAD) or tr.config.attention_head_dim < 12:
        raise ValueError(f"the steer start needs {max(WRITER_HEAD, STEERED_HEAD) + 1} heads of at least 12 "
                         f"dimensions; this transformer has {tr.config.num_attention_heads} of "
                         f"{tr.config.attention_head_dim}.")
    if len(tr.blocks) < 2:
        raise ValueError("the steer start needs at least 2 blocks (block 0 writes, later blocks read).")
    _writer(model, cfg, score, signal)
    _steered(model, cfg, gain)


def _self_attention(model, x: torch.Tensor, prompts: list[str]) -> list[torch.Tensor]:
    """One forward at noise 0.9; per block, the self-attention weights ``(B, heads, tokens,
    tokens)`` rebuilt from its normed queries and keys and the transformer's RoPE, float64."""
    tr = model.transformer
    heads = tr.config.num_attention_heads
    mods = {}
    for i, b in enumerate(tr.blocks):
        mods[("q", i)], mods[("k", i)] = b.attn1.norm_q, b.attn1.norm_k
    rec = _run(model, x, prompts, mods)
    with torch.no_grad():
        cos, sin = (t.cpu().double() for t in tr.rope(x.to(model.device)))

    def rotate(t):
        t = t.double().unflatten(-1, (heads, -1))  # (B, tokens, heads, head_dim)
        a, b = t.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[..., 0::2], sin[..., 1::2]
        out = torch.empty_like(t)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
        return out.transpose(1, 2)

    out = []
    for i in range(len(tr.blocks)):
        q, k = rotate(rec[("q", i)]), rotate(rec[("k", i)])
        out.append((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1))
    return out


@torch.no_grad()
def previous_frame_offsets(model, cfg, motion: str, head: int = STEERED_HEAD, frame: int = 2) -> list[dict[int, float]]:
    """Per block: the mean self-attention weight of ``head`` from a token of latent frame
    ``frame`` to the token of frame ``frame - 1`` in its row at horizontal offset -1, 0 and
    +1 (on the torus), for probe clips of ``motion`` noised to 0.9."""
    x, texts, _ = _probe_inputs(model, cfg, motion, 9)
    f, side = x.shape[2], x.shape[-1] // 2
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    result = []
    for w in _self_attention(model, x, texts):
        w = w[:, head].view(-1, f, side, side, f, side, side)[:, frame, :, :, frame - 1]  # (B, y, x, y', x')
        result.append({dx: float(w[:, ys, xs, ys, (xs + dx) % side].mean()) for dx in (-1, 0, 1)})
    return result
