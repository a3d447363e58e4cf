"""``rectified``: Rectified SpaAttn, a dynamic pooled block selection with rectification.

Each call's plan comes from its own ``q`` and ``k`` (the first dynamic method). Video
tokens are put in a space-filling-curve order (Hilbert by default, as the authors'
Gilbert curve: a block of consecutive tokens is then a compact spatio-temporal brick),
cut into blocks of ``block_size`` tokens, and:

1. **Pooling**: ``q̄, k̄, v̄`` are the block means of the valid tokens; ``P̄ =
   softmax(q̄k̄ᵀ/√d)`` over key blocks, each block weighted by its token count (``+ log
   n_j`` on the logit: for full blocks this is the authors' softmax, and a ragged last
   block counts for the tokens it has; the authors pad with zeros and include them in the
   mean, which biases that block).
2. **Critical blocks** per query block: sorted by ``P̄`` descending, kept while the
   cumulative mass is ``<= p`` plus one more, at least ``top_k`` (default
   ``(1 − drop_rate)·n_blocks``); plus every block holding a 26-neighbour (``t±1, h±1,
   w±1``) of one of the query block's tokens, and (video) first-frame query blocks see
   every first-frame key block (the authors' ``[:ffb, :ffb]`` square, taken here as the
   blocks that really hold frame-0 tokens, which under a curve order are not the first
   ``ffb``).
3. **GAPR**: a dropped block pair ``(n, m)`` is *rectified* (its mass enters the pooled
   compensation) when ``|q̄_n·k̄_m| > |mean|Δq|·k̄_m| + |q̄_n·mean|Δk||`` (unscaled dots;
   the authors' ``I·J`` factor is on both sides), otherwise ignored.
4. **Rectification**: with ``E`` = critical ∪ ignored, ``R_n = Σ_{m∈E} P̄_nm`` and
   ``C_n = Σ_{m∉E} P̄_nm v̄_m``, the output is ``O = R·O_sparse + C`` per query block,
   where ``O_sparse`` is block-sparse attention over the critical blocks.

Text (IPAR, HunyuanVideo and FLUX): text keys are not pooled; their column in ``P̄`` is
the logsumexp of the individual valid text keys, always selected (and counted first in
the cumulative mass), and ``R·O + C`` is applied after the video/text log-sum-exp merge.
Text queries stay dense (the joint rule).

The estimation (pooling, selection, ``R``, ``C``) runs on the device without host
synchronisation: pooling and the row selection are gen's Triton kernels on CUDA
(``gen.kernels.block_estimate``) with a PyTorch reference elsewhere; the three pooled
products are small matmuls (``n_blocks² · D``) left to torch. The plan is as wide as the
key-block count, so nothing waits for the longest row. Everything traces into
``torch.compile(fullgraph=True)`` without a graph break.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..context import AttentionContext
from ..dispatch import block_sparse_attention
from ..estimate import block_stats, select_blocks
from ..layout import TokenLayout
from ..merge import merge_attention
from ..plan import BlockPlan
from ..plan_cache import PlanCache
from ..token_order import TokenPermutation, hilbert_order
from ._observed import ObservedDensities
from .base import MethodConfig, SparseMethod

__all__ = ["RectifiedConfig", "RectifiedSpaAttn", "Estimate", "forced_block_mask"]

ORDERS = ("hilbert", "frame")


@dataclass(frozen=True)
class RectifiedConfig(MethodConfig):
    """Config of ``rectified``.

    Args:
        p: cumulative pooled-attention mass kept per query block (authors: 0.3); ``>= 1``
            keeps every block (dense).
        drop_rate: fraction of key blocks the ``top_k`` floor may drop: the floor is
            ``int((1 − drop_rate) · n_blocks)`` (authors: 0.75 Wan 2.1, 0.8 HunyuanVideo,
            0.9 FLUX, 0.85 Wan 2.2). Ignored when ``top_k`` is set.
        top_k: least number of key blocks kept per query block (None: from ``drop_rate``).
        block_size: tokens per block, for pooling and the kernel (128 as the authors; a
            power of two in [16, 256]).
        neighbours: always keep the blocks holding 26-neighbours of a block's tokens.
        first_frame: first-frame query blocks always see every first-frame key block
            (videos only; an image has one frame and this would make it dense).
        rectify: apply ``O = R·O_sparse + C``; False runs the plain sparse selection (ablation).
        gapr: decide per dropped block whether it is rectified (GAPR); False rectifies
            every dropped block (the paper's "naive pooled rectification" ablation).
        order: video token order before blocking: ``"hilbert"`` (compact bricks) or
            ``"frame"`` (frame-major, blocks are row strips).
    """

    p: float = 0.3
    drop_rate: float = 0.75
    top_k: int | None = None
    block_size: int = 128
    neighbours: bool = True
    first_frame: bool = True
    rectify: bool = True
    gapr: bool = True
    order: str = "hilbert"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not self.p > 0:
            raise ValueError(f"p must be a number > 0 (cumulative mass; 0.3 in the paper), got {self.p!r}.")
        if isinstance(self.drop_rate, bool) or not isinstance(self.drop_rate, (int, float)) or not 0 <= self.drop_rate < 1:
            raise ValueError(f"drop_rate must lie in [0, 1), got {self.drop_rate!r}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0 (key blocks), got {self.top_k!r}.")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b > 256 or b & (b - 1):
            raise ValueError(f"block_size must be a power of two in [16, 256], got {b!r}.")
        for name in ("neighbours", "first_frame", "rectify", "gapr"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}.")


@dataclass(frozen=True, eq=False)
class Estimate:
    """What the estimation decided for one call (video tokens in the method's order).

    Attributes:
        plan: the critical blocks, ``kv_indices (B, H, nq, nq)`` (as wide as the block
            count: no host sync to learn the longest row).
        r: fp32 ``(B, H, nq)``: the factor of the sparse output.
        c: fp32 ``(B, H, nq, D)``: the pooled compensation.
    """

    plan: BlockPlan
    r: torch.Tensor
    c: torch.Tensor


def forced_block_mask(perm: TokenPermutation, layout: TokenLayout, block: int, *, neighbours: bool,
                      first_frame: bool) -> torch.Tensor:
    """Bool ``(nb, nb)`` of the blocks always visited, for the video tokens of ``layout`` in
    the order ``perm`` cut into blocks of ``block`` tokens: block ``j`` for query block
    ``i`` when a token of ``j`` is a 26-neighbour (or the same token) of a token of ``i``,
    and, with ``first_frame`` on a video, first-frame blocks among themselves."""
    n = perm.n_out
    nb = -(-n // block)
    mask = torch.zeros(nb, nb, dtype=torch.bool)
    blk = perm.inverse // block  # block of each token (frame-major token index)
    f, h, w = layout.grid
    grid = blk.view(f, h, w)
    # the diagonal always: a query block sees its own keys
    mask[torch.arange(nb), torch.arange(nb)] = True
    if neighbours:
        def cut(size: int, d: int) -> tuple[slice, slice]:
            # tokens at x and x + d, both inside an axis of ``size``
            return slice(max(0, -d), size - max(0, d)), slice(max(0, d), size - max(0, -d))

        for dt in (-1, 0, 1):
            for dh in (-1, 0, 1):
                for dw in (-1, 0, 1):
                    (at, bt), (ah, bh), (aw, bw) = cut(f, dt), cut(h, dh), cut(w, dw)
                    mask[grid[at, ah, aw].flatten(), grid[bt, bh, bw].flatten()] = True
    if first_frame and f > 1:
        first = torch.unique(grid[0].flatten())
        mask[first.unsqueeze(1), first.unsqueeze(0)] = True
    return mask


class RectifiedSpaAttn(SparseMethod):
    name = "rectified"
    config_cls = RectifiedConfig
    static = False
    summary = "Rectified SpaAttn: pooled top-p block selection per call, R·O + C rectification"

    def __init__(self, config: RectifiedConfig | None = None, *, model: str | None = None) -> None:
        super().__init__(config, model=model)
        # neighbour/first-frame blocks per layout, as a (static) plan so compiled graphs
        # read it from the plan cache instead of tracing its construction
        self._forced = PlanCache(self._build_forced)
        # per layout: [sum of computed video pair fractions (a device scalar, no sync), calls]
        self._observed = ObservedDensities()

    # -- static parts ---------------------------------------------------------------------
    def token_order(self, layout: TokenLayout) -> TokenPermutation | None:
        return hilbert_order(layout.grid) if self.config.order == "hilbert" else None

    def _perm(self, layout: TokenLayout) -> TokenPermutation:
        perm = self._order(layout)
        if perm is None:
            perm = TokenPermutation(torch.arange(layout.video_len), layout.video_len)
        return perm

    def _build_forced(self, key: tuple) -> BlockPlan:
        layout, _, device = self.key_layout(key)
        b = self.config.block_size
        perm = self._perm(layout)
        mask = forced_block_mask(perm, layout, b, neighbours=self.config.neighbours,
                                 first_frame=self.config.first_frame)
        return BlockPlan.from_block_mask(mask, b, b, perm.n_out, perm.n_out).to(device)

    def forced_mask(self, layout: TokenLayout, device: torch.device) -> torch.Tensor:
        """Bool ``(nb, nb)``: the blocks always visited at ``layout`` (cached per layout)."""
        return self._forced.get(self.plan_key(layout, 1, device)).to_block_mask()[0, 0]

    def top_k(self, n_blocks: int) -> int:
        """The floor on kept key blocks per query block for ``n_blocks`` key blocks."""
        if self.config.top_k is not None:
            return min(self.config.top_k, n_blocks)
        return max(1, int((1 - self.config.drop_rate) * n_blocks))

    # -- estimation -------------------------------------------------------------------------
    def estimate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                 k_text: torch.Tensor | None = None, text_valid: torch.Tensor | None = None) -> Estimate:
        """The plan, ``R`` and ``C`` of one call. ``q, k, v (B, H, Sv, D)``: video tokens
        already in :meth:`token_order`; ``k_text (B, H, St, D)`` and ``text_valid`` int
        ``(B,)`` (None: all valid) for IPAR."""
        cfg = self.config
        bsz, heads, n, d = q.shape
        b = cfg.block_size
        nb = -(-n // b)
        backend = None if cfg.backend is None else ("triton" if cfg.backend == "triton" else "torch")
        scale = 1.0 / math.sqrt(d)
        qm, qd, count = block_stats(q, b, None, cfg.gapr, backend=backend)
        km, kd, _ = block_stats(k, b, None, cfg.gapr, backend=backend)
        vm, _, _ = block_stats(v, b, None, False, backend=backend)
        dots = qm @ km.transpose(-1, -2)  # (B, H, nb, nb) fp32, unscaled
        logits = dots * scale + torch.log(count).view(1, 1, 1, nb)
        text_logit = None
        if k_text is not None and k_text.shape[2] > 0:
            st = (qm @ k_text.float().transpose(-1, -2)) * scale  # (B, H, nb, St)
            if text_valid is not None:
                keep = torch.arange(k_text.shape[2], device=q.device).view(1, -1) < text_valid.view(-1, 1).to(q.device)
                st = st.masked_fill(~keep.view(bsz, 1, 1, -1), float("-inf"))
            text_logit = torch.logsumexp(st, dim=-1)
        if cfg.gapr:
            err = (qd @ km.transpose(-1, -2)).abs() + (qm @ kd.transpose(-1, -2)).abs()
            rectifiable = dots.abs() > err
        else:
            rectifiable = torch.ones_like(dots, dtype=torch.bool)
        forced = self.forced_mask(layout, q.device)
        idx, counts, r, weights = select_blocks(logits, text_logit, rectifiable, forced, float(cfg.p),
                                                self.top_k(nb), backend=backend)
        plan = BlockPlan(b, b, n, n, idx, counts, check_values=False)
        if not torch.compiler.is_compiling():
            self._observe(TokenLayout(*layout.grid), plan)
        return Estimate(plan, r, weights @ vm)

    def _observe(self, layout: TokenLayout, plan: BlockPlan) -> None:
        # computed video pairs of this call as a fraction of dense, kept on the device
        _, cols = plan.block_sizes()
        rows = torch.full((plan.n_q_blocks,), float(plan.block_m), dtype=torch.float64)
        rows[-1] = cols[-1]  # square plan: the ragged last block is ragged both ways
        cols, rows = cols.to(plan.device), rows.to(plan.device)
        used = torch.arange(plan.max_visits, device=plan.device) < plan.kv_counts.unsqueeze(-1)
        per_row = (cols[plan.kv_indices.long()] * used).sum(-1)  # (B, H, nq)
        frac = (per_row * rows).sum((-1,)).mean() / (plan.q_len * plan.kv_len)
        self._observed.add(layout, frac)

    def observed_video_density(self, layout: TokenLayout) -> float | None:
        """Mean fraction of video-video pairs computed over the calls estimated at
        ``layout`` so far (None before any; one device sync)."""
        return self._observed.mean(layout)

    def reset_observed(self) -> None:
        """Forget the densities observed so far."""
        self._observed.clear()

    def plan(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None, *,
             q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> BlockPlan:
        """The plan of one real call: ``q, k (B, H, Sv, D)`` are its video queries and keys
        in frame-major order (for pictures: ``gen masks --capture``). Without them there
        is no plan: the pattern depends on the inputs."""
        if q is None or k is None:
            raise NotImplementedError("rectified plans depend on each call's q and k; pass q= and k=")
        perm = self._perm(layout)
        q, k = perm.apply(q, dim=2), perm.apply(k, dim=2)
        return self.estimate(q, k, k, layout).plan

    # -- attention --------------------------------------------------------------------------
    def _rectify(self, out: torch.Tensor, est: Estimate) -> torch.Tensor:
        if not self.config.rectify:
            return out
        b, n = self.config.block_size, out.shape[2]
        r = est.r.repeat_interleave(b, dim=2)[:, :, :n].unsqueeze(-1)
        c = est.c.repeat_interleave(b, dim=2)[:, :, :n]
        return (r * out.float() + c).to(out.dtype)

    def _sparse(self, q, k, v, plan):
        return block_sparse_attention(q, k, v, plan, return_lse=True, backend=self.config.backend)

    def video_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                        ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Video-only call (Wan): ``R·O_sparse + C``. The returned LSE is that of the sparse
        part (a rectified output is not a softmax; nothing merges it)."""
        perm = self._perm(layout)
        q, k, v = (perm.apply(x, dim=2) for x in (q, k, v))
        est = self.estimate(q, k, v, layout)
        if not ctx.need_lse:
            out = block_sparse_attention(q, k, v, est.plan, backend=self.config.backend)
            return perm.invert(self._rectify(out, est), dim=2), None
        out, lse = self._sparse(q, k, v, est.plan)
        out = self._rectify(out, est)
        return perm.invert(out, dim=2), perm.invert(lse.unsqueeze(-1), dim=2).squeeze(-1)

    def joint_video_attention(self, q, k, v, k_text, v_text, text_valid, layout, ctx) -> torch.Tensor:
        """Video queries with text (IPAR): the text column joins the pooled softmax, the
        sparse video part and the dense text part merge by log-sum-exp, then ``R·O + C``."""
        perm = self._perm(layout)
        q, k, v = (perm.apply(x, dim=2) for x in (q, k, v))
        est = self.estimate(q, k, v, layout, k_text, text_valid)
        out_vv, lse_vv = self._sparse(q, k, v, est.plan)
        out_vt, lse_vt = block_sparse_attention(
            q, k_text, v_text, self._dense_plan(layout.video_len, layout.text_len, q.device),
            kv_valid=text_valid, return_lse=True, backend=self.config.backend,
        )
        out, _ = merge_attention(out_vv, lse_vv, out_vt, lse_vt)
        return perm.invert(self._rectify(out, est), dim=2)

    # -- for pictures and reports -----------------------------------------------------------------
    def density(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None) -> float:
        """Fraction of the call's query-key pairs computed, text included, averaged over the
        calls seen at ``layout`` (the pattern depends on each call's q and k); raises
        ``NotImplementedError`` before any call at that layout."""
        video = self.observed_video_density(TokenLayout(*layout.grid))
        if video is None:
            video = self.observed_video_density(layout)
        if video is None:
            raise NotImplementedError("rectified's density depends on each call's q and k; run a call first")
        dense_pairs = layout.seq_len**2 - layout.video_len**2
        return (video * layout.video_len**2 + dense_pairs) / layout.seq_len**2

    def describe(self, layout: TokenLayout) -> str:
        c = self.config
        return (f"rectified p={c.p} drop={c.drop_rate} top_k={c.top_k} b={c.block_size} "
                f"rectify={c.rectify} gapr={c.gapr} order={c.order} on {layout}")
