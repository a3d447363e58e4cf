"""``psa``: Pyramid Sparse Attention, a dynamic method with pooled key levels.

Each call's plan comes from its own ``q`` and ``k``. Video tokens are put in a
space-filling order (the authors' Gilbert curve by default: a block of consecutive tokens
is then a compact spatio-temporal brick) and cut into query blocks of ``block_m`` and key
blocks of ``block_n`` tokens. Then, per (batch, head, query block):

1. **Importance** of every key block, a row that sums to 1:

   * ``"sampled"`` (default, the authors' statistic with a fixed sample): every 4th query
     and every 4th key (``block/4`` rows and columns per block, as the authors, but strided
     instead of drawn by an unseeded ``torch.rand``, so a call is reproducible); for each
     sampled query its largest scaled logit in each key block relative to its largest
     overall, ``exp(max_block − max_row)``; the maximum over the query block's sampled
     rows; normalised over the row.
   * ``"pooled"``: the softmax of pooled logits, ``softmax_j(q̄_i·k̄_j/√d + ln n_j)`` over
     block means (``n_j`` the tokens of block ``j``), gen's block-statistics op.

2. **Levels**: blocks sorted by importance (descending), ``levels`` (default 1, 2, 4, 8)
   are given out in order, each up to its cumulative bound in ``bounds``:

   * ``mode="threshold"`` (``thresholdbound``): level ``levels[i]`` takes the blocks up to
     and including the first whose cumulative importance passes ``bounds[i]`` (none when
     even the first remaining block passes it); the first level gets at least
     ``int(min_level1 · n_blocks) + 1`` blocks;
   * ``mode="topk"``: level ``levels[i]`` ends at block ``int(bounds[i] · n_blocks)`` of the
     sorted row (the first level gets at least one block), the same counts in every row;

   blocks past the last bound are skipped. The authors round each level's share up to
   a multiple of ``ceil(L / (block_n / tile_n))`` blocks so their kernel's tiles fill;
   gen's kernel packs any number of same-level visits into a tile and masks the rest, so
   no rounding is applied.

3. **Attention** (``gen.attention.pyramid``): a visit at level ``L`` attends the block's
   ``block_n / L`` pooled keys and values (means of ``L`` adjacent tokens of the order)
   with ``+ ln L`` on their logits, in one online softmax over all levels. A level-``L``
   visit costs ``1/L`` of a block pair: the density counts ``Σ 1/L``.

Text (HunyuanVideo, FLUX): video queries attend their pyramid video keys plus every
valid text key, merged by log-sum-exp (the authors force text blocks to level 1: the
same); text queries stay dense (the joint rule of :class:`SparseMethod`).

Estimation and attention run on the device without host synchronisation and trace into
``torch.compile(fullgraph=True)``: the Gilbert order comes out of a custom op inside a
graph, the importance and levels are tensor ops, the kernel is a custom op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..context import AttentionContext
from ..estimate import block_stats
from ..layout import TokenLayout
from ..plan import BlockPlan
from ..pyramid import pyramid_attention
from ..token_order import TokenPermutation, gilbert_order, tile_order
from ._observed import ObservedDensities
from .base import MethodConfig, SparseMethod

__all__ = ["PSAConfig", "PSA", "PSAEstimate", "allocate_levels", "plan_from_levels", "sampled_importance",
           "pooled_importance"]

ORDERS = ("gilbert", "tiled", "none")
MODES = ("threshold", "topk")
IMPORTANCE = ("sampled", "pooled")
#: stride of the sampled rows and columns (the authors sample block/4 of each)
SAMPLE_STRIDE = 4
# sampled scores held at once by the sampled importance (fp32 elements): 256 MiB on the
# CPU, 1 GiB on a GPU
_SAMPLE_BUDGET = 1 << 26
_SAMPLE_BUDGET_CUDA = 1 << 28


def _pow2(value, low: int, high: int) -> bool:
    return (not isinstance(value, bool) and isinstance(value, int) and low <= value <= high
            and not value & (value - 1))


@dataclass(frozen=True)
class PSAConfig(MethodConfig):
    """Config of ``psa``.

    Args:
        block_m: query tokens per block (a power of two in [16, 256]; authors: 128).
        block_n: key tokens per block, the unit of importance and levels (a power of two
            in [16, 256]; authors: 128 Wan 14B, 32 Wan 1.3B ``psa_topk`` and Wan 2.2).
        tile_n: pooled keys per tile of gen's kernel (a power of two in [16, 128];
            authors: 32). Speed only: the result does not depend on it.
        levels: pooling levels given out in order (strictly increasing powers of two, at
            most ``block_n``); level ``L`` keeps ``block_n / L`` keys of a block.
        bounds: cumulative upper bound of each level (one per level, non-decreasing, in
            [0, 1]): importance mass (``mode="threshold"``) or fraction of blocks
            (``"topk"``); blocks past the last are skipped. Also ``"0.4,0.5,0.6,0.8"``.
        mode: ``"threshold"`` (cumulative importance, the authors' ``thresholdbound``) or
            ``"topk"`` (fixed fractions of the blocks).
        min_level1: share of blocks the first level gets at least in threshold mode:
            ``int(min_level1 · n_blocks) + 1`` (authors: 0.06).
        importance: ``"sampled"`` (every 4th query and key, the authors' max-probability
            statistic) or ``"pooled"`` (softmax of block means).
        order: video token order: ``"gilbert"`` (generalized Hilbert curve, the authors'),
            ``"tiled"`` (``tile``-sized bricks in raster order) or ``"none"`` (frame-major).
        tile: brick ``(frames, rows, columns)`` of ``order="tiled"`` (authors: 2, 8, 8).
    """

    block_m: int = 128
    block_n: int = 64
    tile_n: int = 32
    levels: tuple[int, ...] = (1, 2, 4, 8)
    bounds: tuple[float, ...] | str = (0.4, 0.5, 0.6, 0.8)
    mode: str = "threshold"
    min_level1: float = 0.06
    importance: str = "sampled"
    order: str = "gilbert"
    tile: tuple[int, ...] = (2, 8, 8)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("block_m", "block_n"):
            if not _pow2(getattr(self, name), 16, 256):
                raise ValueError(f"{name} must be a power of two in [16, 256], got {getattr(self, name)!r}.")
        if not _pow2(self.tile_n, 16, 128):
            raise ValueError(f"tile_n must be a power of two in [16, 128], got {self.tile_n!r}.")
        levels = self.levels
        if isinstance(levels, list):
            levels = tuple(levels)
            object.__setattr__(self, "levels", levels)
        if (not isinstance(levels, tuple) or not levels or not all(_pow2(x, 1, self.block_n) for x in levels)
                or any(b <= a for a, b in zip(levels, levels[1:]))):
            raise ValueError(f"levels must be strictly increasing powers of two in [1, block_n={self.block_n}], "
                             f"got {levels!r}.")
        bounds = self.bounds
        if isinstance(bounds, str):
            try:
                bounds = tuple(float(x) for x in bounds.strip("()[] ").split(",") if x.strip())
            except ValueError:
                raise ValueError(f"bounds must be numbers separated by commas, got {self.bounds!r}.") from None
        if isinstance(bounds, list):
            bounds = tuple(bounds)
        if (not isinstance(bounds, tuple) or len(bounds) != len(levels)
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b <= 1 for b in bounds)
                or any(b < a for a, b in zip(bounds, bounds[1:]))):
            raise ValueError(f"bounds must hold one cumulative bound in [0, 1] per level ({len(levels)}), "
                             f"non-decreasing, got {self.bounds!r}.")
        object.__setattr__(self, "bounds", tuple(float(b) for b in bounds))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        m = self.min_level1
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1:
            raise ValueError(f"min_level1 must be a share in [0, 1], got {m!r}.")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}.")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}.")
        tile = tuple(self.tile) if isinstance(self.tile, list) else self.tile
        if (not isinstance(tile, tuple) or len(tile) != 3
                or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in tile)):
            raise ValueError(f"tile must be three positive ints (frames, rows, columns), got {self.tile!r}.")
        object.__setattr__(self, "tile", tile)


@dataclass(frozen=True, eq=False)
class PSAEstimate:
    """What the estimation decided for one call (video tokens in the method's order).

    Attributes:
        plan: ``BlockPlan`` with ``visit_data["level"]``, ``kv_indices (B, H, nq, nk)`` (as
            wide as the key-block count: no host sync to learn the longest row).
        importance: fp32 ``(B, H, nq, nk)``, each row summing to 1.
        level: int32 ``(B, H, nq, nk)``: the level of each block pair, 0 = skipped.
    """

    plan: BlockPlan
    importance: torch.Tensor
    level: torch.Tensor


def sampled_importance(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, *,
                       stride: int = SAMPLE_STRIDE, budget: int | None = None) -> torch.Tensor:
    """Importance of every (query block, key block) from strided samples, fp32
    ``(B, H, nq, nk)``, rows summing to 1.

    ``q (B, H, Sq, D)``, ``k (B, H, Skv, D)``: tokens ``0, stride, 2·stride, ..`` are
    sampled (``block/stride`` per block; every block holds its first token, so every
    block has samples). For a sampled query ``r`` and key block ``j``, ``m_rj`` is the
    largest scaled logit ``q_r·k_c/√D`` over the block's sampled keys ``c``; the entry
    is ``max_r exp(m_rj − max_j' m_rj')`` over the query block's sampled rows, then each
    row is divided by its sum. Chunked over query blocks (about ``budget`` scores at once,
    default 2**26 on the CPU, 2**28 on CUDA); tensor ops only. Cost: ``(S/stride)² · D``
    multiply-adds per head, 1/16 of dense attention's ``QKᵀ`` at stride 4, in PyTorch
    matmuls (``importance="pooled"`` is the cheap alternative).
    """
    bsz, heads, sq, d = q.shape
    nq, nk = -(-sq // block_m), -(-k.shape[2] // block_n)
    rows, cols = block_m // stride, block_n // stride
    ks = k[:, :, ::stride].float()
    n_cols = ks.shape[2]
    col_pad = nk * cols - n_cols
    qs = q[:, :, ::stride]
    scale = 1.0 / math.sqrt(d)
    if budget is None:
        budget = _SAMPLE_BUDGET_CUDA if q.device.type == "cuda" else _SAMPLE_BUDGET
    chunk = max(1, budget // max(1, bsz * heads * rows * nk * cols))
    parts = []
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        qc = qs[:, :, start * rows: stop * rows].float()
        s = (qc @ ks.transpose(-1, -2)) * scale  # (B, H, r, n_cols)
        if col_pad:
            s = torch.nn.functional.pad(s, (0, col_pad), value=float("-inf"))
        blk = s.view(bsz, heads, qc.shape[2], nk, cols).amax(-1)  # (B, H, r, nk)
        rel = torch.exp(blk - blk.amax(-1, keepdim=True))
        row_pad = (stop - start) * rows - qc.shape[2]
        if row_pad:
            rel = torch.nn.functional.pad(rel, (0, 0, 0, row_pad))  # probability 0: no effect on the max
        parts.append(rel.view(bsz, heads, stop - start, rows, nk).amax(3))
    imp = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return imp / imp.sum(-1, keepdim=True).clamp_min(1e-30)


def pooled_importance(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, *,
                      backend: str | None = None) -> torch.Tensor:
    """Importance as the softmax of pooled logits, fp32 ``(B, H, nq, nk)``:
    ``softmax_j(q̄_i·k̄_j/√D + ln n_j)`` with ``q̄, k̄`` block means (gen's ``block_stats``:
    Triton on CUDA) and ``n_j`` the tokens of key block ``j``."""
    d = q.shape[-1]
    qm, _, _ = block_stats(q, block_m, None, False, backend=backend)
    km, _, count = block_stats(k, block_n, None, False, backend=backend)
    logits = (qm @ km.transpose(-1, -2)) / math.sqrt(d) + torch.log(count).view(1, 1, 1, -1)
    return torch.softmax(logits, dim=-1)


def _segment_ends(importance: torch.Tensor, cfg: PSAConfig) -> list:
    """Per level, where its segment of the sorted row ends: threshold mode int64
    ``(B, H, nq)`` tensors, topk mode Python ints."""
    nk = importance.shape[-1]
    floor = min(nk, int(nk * cfg.min_level1) + 1)
    if cfg.mode == "topk":
        ends, prev = [], 0
        for i, bound in enumerate(cfg.bounds):
            end = max(prev, min(nk, int(nk * bound)))
            if i == 0:
                end = max(end, 1)
            ends.append(end)
            prev = end
        return ends
    vals = torch.sort(importance, dim=-1, descending=True, stable=True).values
    cum = vals.cumsum(-1)
    ratio = cum / cum[..., -1:].clamp_min(1e-30)
    ends, prev = [], torch.zeros(importance.shape[:-1], dtype=torch.long, device=importance.device)
    for i, bound in enumerate(cfg.bounds):
        # blocks whose cumulative share (inclusive) stays within the bound, plus the one
        # that crosses it; none when even the first remaining block crosses
        inside = (ratio <= bound + 1e-6).sum(-1)
        end = torch.where(inside > 0, inside + 1, prev).clamp(max=nk)
        end = torch.maximum(end, prev)
        if i == 0:
            end = end.clamp(min=floor)
        ends.append(end)
        prev = end
    return ends


def allocate_levels(importance: torch.Tensor, cfg: PSAConfig) -> torch.Tensor:
    """Int32 ``(B, H, nq, nk)``: each block pair's level, 0 = skipped, from the importance
    rows (see the module docstring, step 2). Tensor ops only (no host sync)."""
    nk = importance.shape[-1]
    order = torch.sort(importance, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(nk, device=importance.device)
    level_sorted = torch.zeros(importance.shape, dtype=torch.int32, device=importance.device)
    for lv, end in reversed(list(zip(cfg.levels, _segment_ends(importance, cfg)))):
        end = end.unsqueeze(-1) if isinstance(end, torch.Tensor) else end
        level_sorted = torch.where(rank < end, torch.tensor(lv, dtype=torch.int32, device=importance.device),
                                   level_sorted)
    return torch.zeros_like(level_sorted).scatter(-1, order, level_sorted)


def plan_from_levels(level: torch.Tensor, block_m: int, block_n: int, q_len: int, kv_len: int) -> BlockPlan:
    """``BlockPlan`` visiting the pairs with ``level > 0`` (int ``(B|1, H|1, nq, nk)``), with
    ``visit_data["level"]``; ``nk`` wide (no host sync), ascending, padded by repeating the
    last visit (level 0 on padding)."""
    mask = level > 0
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
    counts = mask.sum(-1, dtype=torch.int32)
    used = torch.arange(level.shape[-1], device=level.device) < counts.unsqueeze(-1)
    last = order.gather(-1, (counts.long() - 1).clamp(min=0).unsqueeze(-1))
    idx = torch.where(used, order, last).to(torch.int32)
    lv = torch.where(used, level.gather(-1, order), 0).to(torch.int32)
    return BlockPlan(block_m, block_n, q_len, kv_len, idx.contiguous(), counts.contiguous(),
                     {"level": lv.contiguous()}, check_values=False)


class PSA(SparseMethod):
    name = "psa"
    config_cls = PSAConfig
    static = False
    summary = "Pyramid Sparse Attention: per-call block importance, key blocks pooled 1/2/4/8x or skipped"

    def __init__(self, config: PSAConfig | None = None, *, model: str | None = None) -> None:
        super().__init__(config, model=model)
        # per layout: [sum of computed video pair fractions (a device scalar), calls]
        self._observed = ObservedDensities()

    # -- order --------------------------------------------------------------------------
    def token_order(self, layout: TokenLayout) -> TokenPermutation | None:
        if self.config.order == "gilbert":
            return gilbert_order(layout.grid)
        if self.config.order == "tiled":
            return tile_order(layout.grid, self.config.tile, pad=False)
        return None

    # -- estimation ------------------------------------------------------------------------
    def estimate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None,
                 layout: TokenLayout | None = None) -> PSAEstimate:
        """Importance, levels and plan of one call. ``q, k (B, H, Sv, D)``: video tokens
        already in :meth:`token_order` (``v`` is not read; ``layout`` keys the observed
        density)."""
        cfg = self.config
        n = q.shape[2]
        if cfg.importance == "sampled":
            imp = sampled_importance(q, k, cfg.block_m, cfg.block_n)
        else:
            backend = None if cfg.backend is None else ("triton" if cfg.backend == "triton" else "torch")
            imp = pooled_importance(q, k, cfg.block_m, cfg.block_n, backend=backend)
        level = allocate_levels(imp, cfg)
        plan = plan_from_levels(level, cfg.block_m, cfg.block_n, n, k.shape[2])
        if layout is not None and not torch.compiler.is_compiling():
            self._observe(TokenLayout(*layout.grid), plan, level)
        return PSAEstimate(plan, imp, level)

    def _observe(self, layout: TokenLayout, plan: BlockPlan, level: torch.Tensor) -> None:
        # computed video pairs of this call as a fraction of dense (level L counts 1/L), on the device
        rows, cols = plan.block_sizes()
        rows, cols = rows.to(level.device), cols.to(level.device)
        weight = torch.where(level > 0, 1.0 / level.clamp(min=1).to(torch.float64), 0.0)
        frac = torch.einsum("bhqk,q,k->bh", weight, rows, cols).mean() / (plan.q_len * plan.kv_len)
        self._observed.add(layout, frac)

    def observed_video_density(self, layout: TokenLayout) -> float | None:
        """Mean level-weighted fraction of video-video pairs over the calls estimated at
        ``layout`` so far (None before any; one device sync)."""
        return self._observed.mean(layout)

    def reset_observed(self) -> None:
        """Forget the densities observed so far."""
        self._observed.clear()

    def static_video_density(self, n_tokens: int) -> float | None:
        """``mode="topk"``: every row has the same level counts, so the video density is
        known without a call: ``Σ_L count_L / (L · n_blocks)`` (a ragged last block counts
        as a whole one). None in threshold mode."""
        cfg = self.config
        if cfg.mode != "topk":
            return None
        nk = -(-n_tokens // cfg.block_n)
        ends = _segment_ends(torch.zeros(1, 1, 1, nk), cfg)
        counts = [e - p for e, p in zip(ends, [0, *ends[:-1]])]
        return sum(c / lv for c, lv in zip(counts, cfg.levels)) / nk

    # -- attention ---------------------------------------------------------------------------
    def _perm(self, layout: TokenLayout) -> TokenPermutation | None:
        return self._order(layout)

    def plan(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None, *,
             q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> BlockPlan:
        """The pyramid plan of one real call: ``q, k (B, H, Sv, D)`` are its video queries
        and keys in frame-major order (``gen masks --capture``). Without them there is no
        plan: the pattern depends on the inputs."""
        if q is None or k is None:
            raise NotImplementedError("psa plans depend on each call's q and k; pass q= and k=")
        perm = self._perm(layout)
        if perm is not None:
            q, k = perm.apply(q, dim=2), perm.apply(k, dim=2)
        return self.estimate(q, k, None, layout).plan

    def video_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                        ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Video queries against video keys at pyramid levels, ``(B, H, Sv, D)`` each in
        frame-major order; returns ``(out, lse)`` (``lse`` None when ``ctx.need_lse`` is
        False). The base class merges the dense text part by log-sum-exp."""
        cfg = self.config
        perm = self._perm(layout)
        if perm is not None:
            q, k, v = (perm.apply(x, dim=2) for x in (q, k, v))
        plan = self.estimate(q, k, v, layout).plan
        res = pyramid_attention(q, k, v, plan, return_lse=ctx.need_lse, backend=cfg.backend, tile_n=cfg.tile_n,
                                max_level=max(cfg.levels))
        out, lse = res if ctx.need_lse else (res, None)
        if perm is not None:
            out = perm.invert(out, dim=2)
            if lse is not None:
                lse = perm.invert(lse.unsqueeze(-1), dim=2).squeeze(-1)
        return out, lse

    # -- for pictures and reports ------------------------------------------------------------
    def density(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None) -> float:
        """Fraction of the call's query-key score pairs computed (a level-``L`` visit counts
        ``1/L``), text included. ``mode="topk"``: known from the layout; threshold mode: the
        mean over the calls seen at ``layout`` (raises ``NotImplementedError`` before any)."""
        video = self.static_video_density(layout.video_len)
        if video is None:
            video = self.observed_video_density(TokenLayout(*layout.grid))
        if video is None:
            raise NotImplementedError("psa's density depends on each call's q and k; run a call first")
        dense_pairs = layout.seq_len**2 - layout.video_len**2
        return (video * layout.video_len**2 + dense_pairs) / layout.seq_len**2

    def describe(self, layout: TokenLayout) -> str:
        c = self.config
        return (f"psa {c.mode} levels={c.levels} bounds={c.bounds} blocks={c.block_m}x{c.block_n} "
                f"tile_n={c.tile_n} importance={c.importance} order={c.order} on {layout}")
