"""A start in which the caption's motion word steers self-attention.

The probe (``probe.py``) showed that a motion chosen by a global signal is not learned from
the stock or the local start, even with the direction handed over as a clean input channel,
while the same oracle channel is used within 1000 steps once one self-attention head's
horizontal look is a linear function of it (the shapes README, "A path for the signal").
This start builds that path for the caption, from the model's own activations at step 0
(probe clips noised to 0.9, the same captions with each motion word of ``MOTIONS``):

* **Writer**: head ``WRITER_HEAD`` of block 0's cross-attention gets a constant query that
  scores every motion word's mean key alike and the other words' keys (and each motion
  word's spread over captions) least in mean square, scaled so that the motion words score
  ``score`` on average (the zero padding rows score ``log(n / m)``, about 5.5). Its output
  projection writes ``beta_k (A_k . o + b_k)`` of the head's output ``o`` along two fixed
  orthonormal random directions ``e_x``, ``e_y`` of the residual stream, the affine map
  ``A o + b`` fitted (least squares over the captions) so that the head's outputs land on
  their captions' steps ``STEPS`` (right +x, left -x, down +y, up -y, still and bouncing
  0); ``beta_k`` chosen so that an axis's two words sit about ``signal`` either side of 0
  along ``e_k`` in block 1's self-attention input (layer-normed units; 4.4-4.6 measured at
  the default 5, the layer norm is not linear), the output bias centring them on 0.
* **Steered heads**: head ``STEERED_HEAD`` of every later block looks at the previous latent
  frame (time pair 0 of its query at phase -1 rad) near the same place (constant rows on
  the spatial RoPE pairs, as ``train._local_video_init``), and the second row of each
  spatial axis's pair 0 reads that axis's written direction in its input, scaled so the
  caption turns the phase by ``step`` rad (``step`` tokens): "right" looks ``step`` tokens
  to the left in the previous frame, "left" to the right, "down" up, "up" down, "still"
  straight back.

Everything still trains; ``gen train-tiny`` (``DitTrain.steer_start``) and the probe's
``--freeze`` options hold the writer's path (``hold_writer_path``), without which training
turns the writer's keys and values away (the shapes README, "Keeping the writer").
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .grammar import Caption

__all__ = ["AXES", "HELD", "MOTIONS", "STEERED_HEAD", "STEPS", "WRITER_HEAD", "TrainModel", "WriterGuard",
           "hold_writer_path", "previous_frame_offsets", "steer_start", "writer_scores"]

WRITER_HEAD = 3
STEERED_HEAD = 2
# The step on the (x, y) token grid each motion word writes: ``bouncing`` has no one
# direction and writes what ``still`` writes (the steered heads look straight back).
STEPS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0),
         "bouncing": (0.0, 0.0)}
MOTIONS = tuple(STEPS)  # the words the start is built for
AXES = (("right", "left"), ("down", "up"))  # per axis, the word that writes +1 and the one that writes -1
_TUNED_RMS = (1.23, 1.13)  # steered blocks' to_q / to_k output RMS where the heads' gains were tuned
_NOISE = 0.9  # the noise level of the clips the start is measured on: where direction is decided
_CLIPS = 24


def _probe_inputs(model, cfg, motion: str, seed: int) -> tuple[torch.Tensor, list[str], list[Caption]]:
    """``_CLIPS`` clips of ``motion`` noised to 0.9, their full captions' texts and the
    captions: the model's own clips where it has them (``steer_clips``), else probe bumps."""
    if hasattr(model, "steer_clips"):
        clips, caps = model.steer_clips(motion, _CLIPS, seed)
    else:
        from .probe import bump_clips

        # a bump has no bounce: "bouncing" captions over still bumps (the words' keys and
        # values, which the writer is built from, come from the caption alone)
        clips, caps = bump_clips(np.random.default_rng(seed), _CLIPS, cfg,
                                 motions=["still" if motion == "bouncing" else motion] * _CLIPS)
        caps = [Caption(c.shape, c.color, motion, c.background) for c in caps]
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


def _block_inputs(model, cfg, pos: str = "right", neg: str = "left") -> list[tuple[torch.Tensor, float, float]]:
    """Per block: the unit direction of its self-attention input (mean over clips and tokens)
    from captions saying ``neg`` to the same captions saying ``pos`` (clips moving ``pos``),
    half the mean projected difference and the midpoint's projection (layer-normed units)."""
    blocks = model.transformer.blocks
    mods = {("in", i): b.attn1 for i, b in enumerate(blocks)}
    x, _, caps = _probe_inputs(model, cfg, pos, 123)
    right = _run(model, x, [c.text() for c in caps], mods)
    left = _run(model, x, [Caption(c.shape, c.color, neg, c.background).text() for c in caps], mods)
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


def _word_rows(model, texts: list[str], word: str) -> list[int]:
    """The text row of ``word`` in each caption of ``texts``."""
    token = model.tokenizer.convert_tokens_to_ids(word)
    return [r.index(token) for r in model.tokenizer(texts).input_ids]


def _output_map(outputs: torch.Tensor, steps: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map ``A o + b`` ``(2, hd)``, ``(2,)`` of least squares (ridge ``ridge``
    times the outputs' mean variance) from the head's outputs ``o`` ``(N, hd)`` to their
    captions' steps ``(N, 2)``."""
    o, t = outputs.double(), steps.double()
    om, tm = o.mean(0), t.mean(0)
    oc = o - om
    gram = oc.T @ oc
    a = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * torch.eye(o.shape[1], dtype=torch.float64),
                           oc.T @ (t - tm)).T
    return a.float(), (tm - a @ om).float()


def _writer(model, cfg, score: float, signal: float) -> None:
    attn = model.transformer.blocks[0].attn2
    sl = _writer_slice(attn)
    hd = sl.stop - sl.start
    mods = {"k": attn.norm_k}
    keys, inputs = {}, {}
    others = []
    for motion in MOTIONS:
        x, texts, _ = inputs[motion] = _probe_inputs(model, cfg, motion, 321)
        rec = _run(model, x, texts, mods)
        rows = _word_rows(model, texts, motion)
        keys[motion] = torch.stack([rec["k"][i, r, sl] for i, r in enumerate(rows)])
        lengths = [len(t) for t in model.tokenizer(texts).input_ids]
        others += [rec["k"][i, j, sl] for i, r in enumerate(rows) for j in range(lengths[i]) if j != r]
    motion_key = torch.cat(list(keys.values())).mean(0)
    others = torch.stack(others).double()
    # the query direction d of least mean square score on the other words (their spread
    # counts, not just their mean: with the plain mean difference of two words' keys a colour
    # word outscored "left" in 1 of 36 captions) under the same score for every motion
    # word's mean key (Fisher's direction between the mean of five keys gave "up" a share of
    # 0.21, "right" 1.0)
    k = torch.stack([keys[m].mean(0) for m in MOTIONS]).double()  # (6, hd)
    # each motion word's own spread over captions counts with the other words (the text
    # encoder's local heads give a word a key per context)
    within = torch.cat([keys[m] - keys[m].mean(0) for m in MOTIONS]).double()
    moment = others.T @ others / len(others) + within.T @ within / len(within)
    moment += 1e-3 * moment.diagonal().mean() * torch.eye(hd, dtype=torch.float64)
    mk = torch.linalg.solve(moment, k.T)  # (hd, 6)
    d = (mk @ torch.linalg.solve(k @ mk, torch.ones(len(MOTIONS), dtype=torch.float64))).float()
    with torch.no_grad():
        attn.to_q.weight[sl] = 0.0
        attn.to_q.bias[sl] = 3.0 * d / d.norm()
        q = torch.cat([_run(model, x, texts, {"q": attn.norm_q})["q"][..., sl] for x, texts, _ in inputs.values()])
        attn.norm_q.weight[sl] *= score / (float(q.mean((0, 1)) @ motion_key) / hd**0.5)
    # the map from what the head reads to the step it writes, fitted on its outputs (the
    # words' keys depend on their context: in some captions "moving" or "a" takes most of the
    # head from the motion word, and carries it, mixed in by the text encoder's local heads)
    outputs, steps = [], []
    for motion, (x, texts, _) in inputs.items():
        got = _run(model, x, texts, {("in", "out"): attn.to_out[0]})[("in", "out")][..., sl].mean(1)
        outputs.append(got)
        steps += [STEPS[motion]] * len(texts)
    a, b = _output_map(torch.cat(outputs), torch.tensor(steps))
    width = attn.to_out[0].weight.shape[0]
    # two fixed orthonormal directions of the residual stream, one per axis
    e, _ = torch.linalg.qr(torch.randn(width, 2, generator=torch.Generator().manual_seed(cfg.seed + 11)))
    bias0 = attn.to_out[0].bias.detach().cpu().clone()  # the measurements are on the CPU; copy_ moves them

    def write(beta: torch.Tensor, offset: torch.Tensor) -> None:
        # along axis k the head writes beta_k (A_k v + b_k + offset_k): "right" / "down" +beta, still 0
        with torch.no_grad():
            attn.to_out[0].weight[:, sl] = e @ (beta[:, None] * a)
            attn.to_out[0].bias.copy_(bias0 + e @ (beta * (b + offset)))

    def block1() -> list[tuple[float, float]]:
        """(half difference, midpoint) of block 1's input per axis, layer-normed units."""
        return [_block_inputs(model, cfg, *pair)[1][1:] for pair in AXES]

    zero = torch.zeros(2)
    write(torch.ones(2), zero)  # the written difference is linear in beta; measure it at 1, then scale
    beta = torch.tensor([signal / half for half, _ in block1()])
    write(beta, zero)
    # centre: the two words of an axis equally far either side of 0 in block 1's input (secant
    # on the output bias along e; the layer norm makes the midpoint only nearly linear in it)
    mid0 = torch.tensor([mid for _, mid in block1()])
    write(beta, 1.0 / beta)
    mid1 = torch.tensor([mid for _, mid in block1()])
    write(beta, mid0 / (mid0 - mid1) / beta)


def writer_scores(model, cfg, seed: int = 321) -> tuple[float, float]:
    """The writer head's mean score of the motion word (query averaged over the video
    tokens, ``q . k / sqrt(head_dim)``) and its mean attention weight on the word, over
    probe clips noised to 0.9 with captions of each of ``MOTIONS`` (``_CLIPS`` each)."""
    attn = model.transformer.blocks[0].attn2
    sl = _writer_slice(attn)
    hd = sl.stop - sl.start
    scores, shares = [], []
    for motion in MOTIONS:
        x, texts, _ = _probe_inputs(model, cfg, motion, seed)
        rec = _run(model, x, texts, {"k": attn.norm_k, "q": attn.norm_q})
        ids = model.tokenizer(texts).input_ids
        q, k = rec["q"][..., sl], rec["k"][..., sl]  # (B, tokens, hd), (B, text rows, hd)
        s = torch.einsum("btd,bjd->btj", q, k) / hd**0.5
        for i, (r, j) in enumerate(zip(ids, _word_rows(model, texts, motion))):
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


def _steered(model, cfg, gain: float, step: float) -> None:
    tr = model.transformer
    hd = tr.config.attention_head_dim
    space = 2 * (hd // 6)  # diffusers' WanRotaryPosEmbed split, as train._local_video_init
    h0, w0 = hd - 2 * space, hd - space
    base = STEERED_HEAD * hd
    reads = [_block_inputs(model, cfg, *pair) for pair in AXES]  # (x, y), per block
    with torch.no_grad():
        for i, block in enumerate(tr.blocks):
            if i == 0:
                continue  # block 0's self-attention comes before any cross-attention
            a = block.attn1
            for lin, norm in ((a.to_q, a.norm_q), (a.to_k, a.norm_k)):
                norm.weight[base:base + hd] = 0.1  # the head's other rows start quiet
                for row, g in ((h0, gain), (h0 + 2, 1.55), (w0, gain), (w0 + 2, 1.55)):
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
            # pair 0 of each spatial axis (1 rad a token): "right" ("down"), positive along the
            # axis's direction, turns the query's phase by -step rad, the midpoint (still) by 0
            for row, (e, half, mid) in ((w0, reads[0][i]), (h0, reads[1][i])):
                a.to_q.weight[base + row + 1] = -math.tan(step) * 3.0 / half * e
                a.to_q.bias[base + row + 1] = math.tan(step) * 3.0 / half * mid
                a.norm_q.weight[base + row + 1] = gain
    # The RMSNorms divide by the root mean square over all heads: on a trained model the
    # other heads' rows are larger (2.0-2.7 in the shipped shapes-wan, against 1.13-1.24
    # where the gains were tuned, fresh probe models of seeds 0 and 17), and the same rows
    # came out half as large: the head spread its weight over the clip (0.015 / 0.011 /
    # 0.007 one token behind / in place / ahead, against 0.08 / 0.03 / 0.005). The head's
    # norm weights are scaled by the measured ratio, which keeps its look's phase.
    mods = {}
    for i, block in enumerate(tr.blocks[1:], 1):
        mods[("q", i)], mods[("k", i)] = block.attn1.to_q, block.attn1.to_k
    x, texts, _ = _probe_inputs(model, cfg, "right", 123)
    rec = _run(model, x, texts, mods)
    with torch.no_grad():
        for i, block in enumerate(tr.blocks[1:], 1):
            for kind, norm, tuned in (("q", block.attn1.norm_q, _TUNED_RMS[0]), ("k", block.attn1.norm_k, _TUNED_RMS[1])):
                rms = float(rec[(kind, i)].pow(2).mean(-1).sqrt().mean())
                norm.weight[base:base + hd] *= rms / tuned


def steer_start(model, cfg, *, score: float = 11.0, signal: float = 5.0, gain: float = 1.1,
                step: float = 1.0) -> None:
    """Build the writer and the steered heads into ``model`` (a ``probe._Model``) in place.

    Args:
        score: the motion words' mean cross-attention score in the writer head (padding: ~5.5).
        signal: how far either side of 0 the two words of an axis put block 1's
            self-attention input along that axis's written direction, layer-normed units
            (the oracle channel measured 5.5).
        gain: RMSNorm weight of the steered heads' time and spatial rows.
        step: how far the steered heads look back against the caption's motion, tokens per
            latent frame (the clips' speed; under 1.57, where the phase turn stops growing).
    """
    tr = model.transformer
    if tr.config.num_attention_heads <= max(WRITER_HEAD, STEERED_HEAD) or tr.config.attention_head_dim < 12:
        raise ValueError(f"the steer start needs {max(WRITER_HEAD, STEERED_HEAD) + 1} heads of at least 12 "
                         f"dimensions; this transformer has {tr.config.num_attention_heads} of "
                         f"{tr.config.attention_head_dim}.")
    if len(tr.blocks) < 2:
        raise ValueError("the steer start needs at least 2 blocks (block 0 writes, later blocks read).")
    if not 0.0 < step < math.pi / 2:
        raise ValueError(f"step must be in (0, 1.57) tokens per latent frame, got {step}.")
    _writer(model, cfg, score, signal)
    _steered(model, cfg, gain, step)


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
def previous_frame_offsets(model, cfg, motion: str, head: int = STEERED_HEAD, frame: int = 2,
                           axis: str = "x") -> list[dict[int, float]]:
    """Per block: the mean self-attention weight of ``head`` from a token of latent frame
    ``frame`` to the token of frame ``frame - 1`` at offset -1, 0 and +1 along ``axis``
    (``"x"``: in its row, ``"y"``: in its column; on the torus), for probe clips of
    ``motion`` noised to 0.9."""
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}.")
    x, texts, _ = _probe_inputs(model, cfg, motion, 9)
    f, side = x.shape[2], x.shape[-1] // 2
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    result = []
    for w in _self_attention(model, x, texts):
        w = w[:, head].view(-1, f, side, side, f, side, side)[:, frame, :, :, frame - 1]  # (B, y, x, y', x')
        if axis == "x":
            result.append({d: float(w[:, ys, xs, ys, (xs + d) % side].mean()) for d in (-1, 0, 1)})
        else:
            result.append({d: float(w[:, ys, xs, (ys + d) % side, xs].mean()) for d in (-1, 0, 1)})
    return result


# -- the start in ``gen train-tiny`` --------------------------------------------------------------

HELD = ("condition_embedder.text_embedder", "blocks.0.attn2")
"""The transformer's parameters held (with the whole text encoder) while the clip phase trains
from the start: the writer and everything in front of it. With only block 0's cross-attention
held, the trained text MLP turned the motion word's key and value away from what the writer
writes (samples at chance); with these and the text encoder held, 68-98% (the shapes README,
"Keeping the writer")."""


def hold_writer_path(transformer, text_encoder) -> list[torch.nn.Parameter]:
    """Stop training the writer's path (``HELD`` and the text encoder); returns the parameters
    held. The optimiser skips them (no gradient, so no step and no weight decay either)."""
    held = list(text_encoder.parameters())
    for prefix in HELD:
        held += list(transformer.get_submodule(prefix).parameters())
    for p in held:
        p.requires_grad_(False)
    return held


class TrainModel:
    """The steer start's view of ``gen train-tiny``'s stage 2: its transformer, text encoder
    and tokenizer predicting through the stage's ``PaddedTextAttention`` (installed), and
    its encoded clips as the clips the start is measured on.

    Args:
        data: the stage's ``LatentSet``; every motion of ``MOTIONS`` must have clips.
    """

    def __init__(self, transformer, text_encoder, tokenizer, proc, data, device: torch.device):
        self.transformer, self.text_encoder, self.tokenizer = transformer, text_encoder, tokenizer
        self.proc, self.data, self.device = proc, data, device
        by_motion = {m: [i for i, c in enumerate(data.captions) if c.motion == m] for m in MOTIONS}
        missing = [m for m, idx in by_motion.items() if not idx]
        if missing:
            raise ValueError(f"the steer start is measured on clips of every motion ({', '.join(MOTIONS)}); the "
                             f"training clips have none of {', '.join(missing)}: train on more clips (dit.clips) "
                             f"or without dit.steer_start.")
        self.by_motion = by_motion

    def steer_clips(self, motion: str, count: int, seed: int) -> tuple[torch.Tensor, list[Caption]]:
        """``count`` clean latents ``(count, C, F, h, w)`` of clips moving ``motion`` and their
        captions, drawn (with replacement where fewer) by ``seed``."""
        idx = np.random.default_rng(seed).choice(self.by_motion[motion], count,
                                                 replace=len(self.by_motion[motion]) < count)
        return self.data.latents[torch.as_tensor(idx)].float(), [self.data.captions[i] for i in idx]

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The flow prediction for latents ``x`` at noise levels ``sigma`` ``(B,)`` in [0, 1]."""
        text = self.proc.encode(self.tokenizer, self.text_encoder, prompts)
        return self.transformer(x.to(self.device), (sigma * 1000).to(self.device), text, return_dict=False)[0]
