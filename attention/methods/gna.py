"""``gna``: Generalized Neighborhood Attention (NATTEN's GNA) on gen's block-sparse kernels.

Every query attends to a window of keys around it on the token grid, decided per axis
(``t, h, w`` for video; ``h, w`` for images, i.e. layouts with ``frames == 1``; a 1-D
sequence is a ``(t, 1, 1)`` layout) and ANDed over the axes. Per axis of extent ``n``
with window ``w``, stride ``s``, dilation ``d`` and causal flag ``c`` (coordinates ``x``):

* dilation: a query only sees keys of its dilation group (``x_q % d == x_k % d``); inside
  a group, positions are ``x // d`` and the group's extent is ``n_g = ceil((n - g) / d)``
  for group ``g``. All rules below use these group positions.
* non-causal: ``wl = w // 2`` keys left, ``wr = w // 2 + w % 2 - 1`` right (an even
  window ``2r`` covers ``r`` left, the token, ``r - 1`` right). Queries come in stride
  groups ``[s·m, s·m + s)``; each group uses the window of its leader, the centre query
  ``min(s·m + s // 2, n_g - 1)``. The window centre is the leader clamped to
  ``[wl, n_g - 1 - wr]``: at the borders the window shifts instead of shrinking, so
  every query sees exactly ``w`` keys. Keep ``centre - wl <= x_k <= centre + wr``.
* causal: the leader is the last query of the group, ``min(s·m + s - 1, n_g - 1)``; keep
  ``x_k <= x_q`` and ``leader - x_k < w``.

Special cases: ``s = 1`` is standard neighborhood attention, ``s = w`` blocked (Swin-like)
attention, ``w = n`` dense on that axis (``window=-1`` means exactly that).

Blocks and plans: the video tokens are permuted into tiles (:func:`tile_order`, padded
when a tile does not divide the grid; padding slots are masked as keys and dropped from
the output); one tile is one kernel block (``block_m = block_n = prod(tile)``, a power of
two in [16, 256] for the Triton backend). A (query tile, key tile) pair is visited when
any of its token pairs is allowed. Tiles are products of per-axis ranges and the mask a
product of per-axis masks, so the tile-pair mask is the Kronecker product (an AND of
outer products) of small per-axis ``(n_tiles, n_tiles)`` matrices: plans are built
without ever forming the ``S x S`` token mask. A visited pair is *full* when every
(valid) token pair in it is allowed and *partial* otherwise; a configuration whose
visited pairs are all full is *fully block-sparse* and runs at the ideal cost
``1 / density`` (NATTEN's condition: strides a multiple of the tile and window edges on
tile boundaries, at the borders too).

Partial blocks (choice (a) of the design): the output is always the exact GNA mask.
When a layout has partial pairs, the kernel runs the full pairs only, and the partial
pairs are computed in PyTorch on gathered tiles with the token-level mask rebuilt from
the per-axis masks (never an ``S x S`` tensor; memory is bounded by chunking); the two
parts are merged by log-sum-exp (:func:`merge_attention`). The correction is exact but
slower than the kernel, so it is logged once per layout at INFO on ``gen.attention``.
The presets in ``presets.py`` are fully block-sparse at their models' native grids, so
the correction never runs there. With no partial pairs the method is the plain
permuted block-sparse path of :class:`SparseMethod` (torch.compile friendly).

Text follows the joint rule of :class:`SparseMethod` (video queries: GNA over video keys
plus all valid text keys; text queries: dense), as NATTEN's ``additional_keys``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch

from ..context import AttentionContext
from ..dispatch import block_sparse_attention
from ..layout import TokenLayout
from ..merge import merge_attention
from ..plan import BlockPlan
from ..plan_cache import PlanCache
from ..token_order import TokenPermutation, tile_order
from .base import MethodConfig, SparseMethod

__all__ = [
    "GNAConfig",
    "GNAAttention",
    "GNAGeometry",
    "GNAStats",
    "gna_axis_mask",
    "gna_mask",
]

logger = logging.getLogger("gen.attention")

# Score + gathered key/value elements held at once by the partial-block correction
# (2**24 fp32 = 64 MiB): bounded memory on any layout.
_CORRECTION_BUDGET = 1 << 24


# -- the definition, per axis --------------------------------------------------------------


def _check_axis(n: int, window: int, stride: int, dilation: int) -> None:
    if n < 1:
        raise ValueError(f"axis extent must be >= 1, got {n}.")
    if not 1 <= window <= n:
        raise ValueError(f"window must lie in [1, {n}] (the axis extent), got {window}.")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must lie in [1, window={window}], got {stride}.")
    if dilation < 1 or window * dilation > n:
        raise ValueError(
            f"window * dilation must not exceed the axis extent: {window} * {dilation} > {n}; "
            "use a smaller window or dilation."
        )


def gna_axis_mask(n: int, window: int, stride: int = 1, dilation: int = 1,
                  causal: bool = False) -> torch.Tensor:
    """The GNA mask of one axis: bool ``(n, n)``, ``[x_q, x_k]`` True where allowed.

    Args:
        n: axis extent in tokens.
        window: window size in tokens, ``1 <= window <= n`` (clamping ``-1`` or larger
            windows to ``n`` is the config's job, see :class:`GNAConfig`).
        stride: stride-group size, ``1 <= stride <= window``.
        dilation: dilation, ``window * dilation <= n``.
        causal: causal along this axis.
    """
    _check_axis(n, window, stride, dilation)
    x = torch.arange(n)
    group, pos = x % dilation, x // dilation
    group_len = (n - group + dilation - 1) // dilation  # extent of each token's group
    q, k, n_g = pos[:, None], pos[None, :], group_len[:, None]
    if causal:
        leader = torch.minimum((q // stride) * stride + stride - 1, n_g - 1)
        keep = (k <= q) & (leader - k < window)
    else:
        left, right = window // 2, window // 2 + window % 2 - 1
        leader = torch.minimum((q // stride) * stride + stride // 2, n_g - 1)
        # window * dilation <= n keeps left <= n_g - 1 - right, so the clamp is well posed
        centre = torch.minimum(leader.clamp(min=left), n_g - 1 - right)
        keep = (k >= centre - left) & (k <= centre + right)
    return keep & (group[:, None] == group[None, :])


def _kron_and(mats: list[torch.Tensor]) -> torch.Tensor:
    """AND of outer products of per-axis bool matrices ``(a_i, b_i)``: bool
    ``(prod a_i, prod b_i)`` with raster (last axis fastest) rows and columns."""
    r = len(mats)
    out = None
    for i, m in enumerate(mats):
        shape = [1] * (2 * r)
        shape[i], shape[r + i] = m.shape
        part = m.view(shape)
        out = part if out is None else out & part
    rows = math.prod(m.shape[0] for m in mats)
    return out.reshape(rows, -1)


def gna_mask(grid, window, stride=None, dilation=None, causal=None) -> torch.Tensor:
    """The GNA token mask of a grid in raster order: bool ``(N, N)``, ``N = prod(grid)``.

    All arguments are per-axis tuples of the grid's length (1, 2 or 3 axes); ``stride``
    and ``dilation`` default to 1, ``causal`` to False. O(N²) memory: small grids only.
    """
    grid = tuple(grid)
    r = len(grid)
    stride = (1,) * r if stride is None else tuple(stride)
    dilation = (1,) * r if dilation is None else tuple(dilation)
    causal = (False,) * r if causal is None else tuple(causal)
    if not all(len(x) == r for x in (window, stride, dilation, causal)):
        raise ValueError(f"window, stride, dilation and causal need one entry per grid axis {grid}.")
    mats = [gna_axis_mask(*args) for args in zip(grid, window, stride, dilation, causal)]
    return _kron_and(mats)


@functools.lru_cache(maxsize=256)
def _axis_tiles(n: int, window: int, stride: int, dilation: int, causal: bool,
                tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis data, cached: the mask padded to whole tiles (bool ``(p, p)``, padding
    coordinates never allowed), and the tile-pair matrices ``any`` (some allowed pair)
    and ``all`` (every valid pair allowed), bool ``(n_tiles, n_tiles)``."""
    mask = gna_axis_mask(n, window, stride, dilation, causal)
    nt = -(-n // tile)
    p = nt * tile
    padded = torch.zeros(p, p, dtype=torch.bool)
    padded[:n, :n] = mask
    valid = torch.arange(p) < n
    blocks = padded.view(nt, tile, nt, tile)
    any_ = blocks.any(3).any(1)
    # padding rows/columns do not count against "all": the kernel masks padding keys and
    # padding query rows are dropped
    ok = padded | ~(valid[:, None] & valid[None, :])
    all_ = ok.view(nt, tile, nt, tile).all(3).all(1)
    return padded, any_, all_


def _cached(fn):
    """``fn`` (an ``lru_cache``), or the plain function while torch.compile traces: dynamo
    traces through cache wrappers anyway (with a warning); these are pure functions."""
    return fn.__wrapped__ if torch.compiler.is_compiling() else fn


# -- config ----------------------------------------------------------------------------------


def _as_axes(name: str, value, kind: type) -> int | bool | tuple:
    """Normalise a per-axis field: a scalar or a tuple/list of 2 or 3 entries."""
    if isinstance(value, list):
        value = tuple(value)
    scalar = (kind is bool and isinstance(value, (bool, int))) or (
        kind is int and isinstance(value, int) and not isinstance(value, bool)
    )
    if scalar:
        return bool(value) if kind is bool else value
    if not isinstance(value, tuple) or len(value) not in (2, 3):
        raise ValueError(
            f"{name} must be one {kind.__name__} for every axis or a tuple of 3 ((t, h, w)) or "
            f"2 ((h, w)) entries, got {value!r}."
        )
    if kind is bool:
        if not all(isinstance(v, (bool, int)) and v in (0, 1) for v in value):
            raise ValueError(f"{name} entries must be booleans, got {value!r}.")
        return tuple(bool(v) for v in value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} entries must be ints, got {value!r}.")
    return value


def _for_rank(name: str, value, rank: int, grid: tuple[int, ...]) -> tuple:
    if not isinstance(value, tuple):
        return (value,) * rank
    if len(value) == rank:
        return value
    if len(value) == 3 and rank == 2:
        return value[1:]  # images: the (h, w) entries of a (t, h, w) tuple
    raise ValueError(
        f"{name}={value!r} does not fit the {rank}-axis token grid {grid}: give {rank} entries "
        "((t, h, w) for video; (h, w) or (t, h, w) for images, whose last two are used)."
    )


@dataclass(frozen=True)
class GNAConfig(MethodConfig):
    """Config of ``gna``. Per-axis fields take one value for every axis or a tuple
    ``(t, h, w)``; for images (``frames == 1``) a tuple ``(h, w)`` or the last two entries
    of a ``(t, h, w)`` tuple are used. Sizes are in tokens after patchify.

    Args:
        window: neighbourhood size per axis (default ``(9, 24, 24)``: ±4 latent frames
            and a 24x24 spatial window). ``-1``, or a value larger than the axis extent,
            means the whole axis (dense on it); the stride of such an axis is irrelevant
            and clamped with it.
        stride: stride-group size per axis, ``1 <= stride <= window`` (default 1:
            standard neighborhood attention; ``stride = window`` is blocked attention).
            Queries of one group share their leader's window; strides that are multiples
            of the tile (with aligned windows) make the plan fully block-sparse.
        dilation: dilation per axis (default 1); ``window * dilation`` must not exceed the
            axis extent.
        causal: causal per axis (default False): a query only sees keys at or before it.
        tile: token tile per axis (default ``(1, 8, 8)``: 64-token blocks of 8x8 tokens of
            one frame; one frame deep so any temporal window stays block-aligned). One
            tile is one kernel block; its volume must be a power of two in [16, 256]
            for the Triton backend (e.g. ``(2, 8, 8)`` or ``(1, 16, 8)`` = 128).
        dense_steps, dense_layers, backend: see :class:`MethodConfig`.
    """

    window: int | tuple[int, ...] = (9, 24, 24)
    stride: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False
    tile: int | tuple[int, ...] = (1, 8, 8)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, kind in (("window", int), ("stride", int), ("dilation", int), ("causal", bool), ("tile", int)):
            object.__setattr__(self, name, _as_axes(name, getattr(self, name), kind))
        entries = lambda v: v if isinstance(v, tuple) else (v,)
        if any(v == 0 or v < -1 for v in entries(self.window)):
            raise ValueError(f"window entries must be >= 1, or -1 for the whole axis; got {self.window!r}.")
        for name in ("stride", "dilation", "tile"):
            if any(v < 1 for v in entries(getattr(self, name))):
                raise ValueError(f"{name} entries must be >= 1, got {getattr(self, name)!r}.")
        # stride <= window where both are known now (-1 windows are checked per layout)
        rank = max((len(v) for v in (self.window, self.stride) if isinstance(v, tuple)), default=3)
        win = self.window if isinstance(self.window, tuple) else (self.window,) * rank
        st = self.stride if isinstance(self.stride, tuple) else (self.stride,) * rank
        if len(win) == len(st):
            for i, (w, s) in enumerate(zip(win, st)):
                if w != -1 and s > w:
                    raise ValueError(
                        f"stride must not exceed the window on any axis; axis {i} has stride {s} > "
                        f"window {w} (window={self.window!r}, stride={self.stride!r})."
                    )


# -- geometry of one layout ----------------------------------------------------------------


@dataclass(frozen=True)
class GNAGeometry:
    """A :class:`GNAConfig` resolved for one token grid: one entry per axis, windows
    clamped to the extents (see :meth:`GNAAttention.geometry`)."""

    grid: tuple[int, ...]
    window: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    tile: tuple[int, ...]

    @property
    def block(self) -> int:
        """Tokens per tile = kernel block size."""
        return math.prod(self.tile)

    @property
    def n_tiles(self) -> tuple[int, ...]:
        return tuple(-(-n // t) for n, t in zip(self.grid, self.tile))

    @property
    def n_slots(self) -> int:
        """Tokens in the padded tile order (``TokenPermutation.n_out``)."""
        return math.prod(self.n_tiles) * self.block

    def axes(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per axis: ``(padded mask, any, all)`` (see ``_axis_tiles``)."""
        return [_cached(_axis_tiles)(*a) for a in zip(self.grid, self.window, self.stride, self.dilation,
                                             self.causal, self.tile)]

    def axis_masks(self) -> list[torch.Tensor]:
        """Per axis: the exact mask, bool ``(n, n)``."""
        return [p[:n, :n] for (p, _, _), n in zip(self.axes(), self.grid)]


@functools.lru_cache(maxsize=256)
def _resolve(window, stride, dilation, causal, tile, grid: tuple[int, ...]) -> GNAGeometry:
    rank = len(grid)
    per = {name: _for_rank(name, v, rank, grid) for name, v in
           (("window", window), ("stride", stride), ("dilation", dilation), ("causal", causal), ("tile", tile))}
    axes = "thw"[-rank:] if rank <= 3 else [str(i) for i in range(rank)]
    win, st = [], []
    for i, n in enumerate(grid):
        w, s, d = per["window"][i], per["stride"][i], per["dilation"][i]
        clamped = w == -1 or w > n
        if clamped:
            # the whole axis: dense there for any stride, so the stride is clamped too
            w, s = n, min(s, n)
            if d != 1:
                raise ValueError(
                    f"axis {axes[i]} (extent {n}): a window covering the whole axis needs dilation 1, "
                    f"got dilation {d}; use a window <= {n // d} to keep the dilation."
                )
        if s > w:
            raise ValueError(f"axis {axes[i]} (extent {n}): stride {s} exceeds window {w}.")
        if w * d > n:
            raise ValueError(
                f"axis {axes[i]} (extent {n}): window {w} * dilation {d} exceeds the extent; "
                f"use a window <= {n // d} or a smaller dilation."
            )
        win.append(w)
        st.append(s)
    return GNAGeometry(grid, tuple(win), tuple(st), per["dilation"], per["causal"], per["tile"])


@dataclass(frozen=True)
class GNAStats:
    """Cost of a GNA configuration on one layout (video tokens only), computed per axis.

    Attributes:
        mask_density: fraction of allowed (query, key) token pairs (NATTEN's FLOP
            bound: ``1 - sparsity``).
        block_size: tokens per tile (= kernel block).
        block_pairs: all (query tile, key tile) pairs of the padded tile order.
        visited_blocks: pairs with any allowed token pair (what the kernel computes).
        full_blocks: visited pairs whose valid token pairs are all allowed.
        block_density: ``visited_blocks / block_pairs``: the plan's density over the
            padded slots.
        compute_ratio: computed token pairs (visited blocks, padding included) over the
            ``Sv²`` of dense attention: the cost relative to dense.
    """

    mask_density: float
    block_size: int
    block_pairs: int
    visited_blocks: int
    full_blocks: int
    block_density: float
    compute_ratio: float

    @property
    def partial_blocks(self) -> int:
        """Visited pairs that are only partly allowed (need the token-level mask)."""
        return self.visited_blocks - self.full_blocks

    @property
    def fully_block_sparse(self) -> bool:
        return self.partial_blocks == 0


@torch.compiler.assume_constant_result
def _has_partial(window, stride, dilation, causal, tile, grid: tuple[int, ...]) -> bool:
    # the tile-pair masks are Kronecker products: their counts are products of per-axis counts
    geom = _resolve(window, stride, dilation, causal, tile, grid)
    visited = math.prod(int(a.sum()) for _, a, _ in geom.axes())
    full = math.prod(int(f.sum()) for _, _, f in geom.axes())
    return visited != full


# -- the method ----------------------------------------------------------------------------


class GNAAttention(SparseMethod):
    """Generalized Neighborhood Attention; see the module docstring for the definition,
    the block plan and how partial blocks stay exact."""

    name = "gna"
    config_cls = GNAConfig
    families = ("wan", "hunyuan", "flux")
    static = True
    summary = "Generalized Neighborhood Attention (NATTEN): per-axis window, stride, dilation, causal on tiles"

    def __init__(self, config: GNAConfig | None = None, *, model: str | None = None) -> None:
        super().__init__(config, model=model)
        # the split used when a layout has partial tile pairs (see video_attention)
        self._full_plans = PlanCache(lambda key: self._plan_from(key, "full"))
        self._partial_plans = PlanCache(lambda key: self._plan_from(key, "partial"))
        self._logged: set[TokenLayout] = set()

    # -- geometry ----------------------------------------------------------------------
    @staticmethod
    def _grid(layout: TokenLayout) -> tuple[int, ...]:
        return (layout.height, layout.width) if layout.frames == 1 else layout.grid

    def _cfg_key(self) -> tuple:
        c = self.config
        return (c.window, c.stride, c.dilation, c.causal, c.tile)

    def geometry(self, layout: TokenLayout) -> GNAGeometry:
        """The config resolved for ``layout``'s grid (``(h, w)`` when ``frames == 1``,
        else ``(t, h, w)``); raises ``ValueError`` saying what to change when it does
        not fit (lengths, stride > window, window * dilation > extent)."""
        return _cached(_resolve)(*self._cfg_key(), self._grid(layout))

    def stats(self, layout: TokenLayout) -> GNAStats:
        """Densities and block counts of ``layout``, from per-axis counts (no ``S x S``
        or block-pair tensor is built: fine at any resolution)."""
        geom = self.geometry(layout)
        axes = geom.axes()
        allowed = math.prod(int(m.sum()) for m in geom.axis_masks())
        visited = math.prod(int(a.sum()) for _, a, _ in axes)
        full = math.prod(int(f.sum()) for _, _, f in axes)
        pairs = math.prod(geom.n_tiles) ** 2
        sv = layout.video_len
        return GNAStats(
            mask_density=allowed / sv**2, block_size=geom.block, block_pairs=pairs,
            visited_blocks=visited, full_blocks=full, block_density=visited / pairs,
            compute_ratio=visited * geom.block**2 / sv**2,
        )

    def token_order(self, layout: TokenLayout) -> TokenPermutation:
        """Tiles of the resolved ``tile`` (padded where a tile does not divide the grid)."""
        geom = self.geometry(layout)
        return tile_order(geom.grid, geom.tile, pad=True)

    # -- plans -------------------------------------------------------------------------
    def _block_mask(self, layout: TokenLayout, part: str) -> torch.Tensor:
        """Bool ``(n_tiles, n_tiles)`` over tiles in tile order: ``visit`` (any allowed
        pair), ``full`` or ``partial``."""
        axes = self.geometry(layout).axes()
        if part == "visit":
            return _kron_and([a for _, a, _ in axes])
        full = _kron_and([f for _, _, f in axes])
        if part == "full":
            return full
        return _kron_and([a for _, a, _ in axes]) & ~full

    def _plan_from(self, key: tuple, part: str) -> BlockPlan:
        layout, _, device = self.key_layout(key)
        geom = self.geometry(layout)
        n = geom.n_slots
        plan = BlockPlan.from_block_mask(self._block_mask(layout, part), geom.block, geom.block, n, n)
        return plan.to(device)

    def build_plan(self, key: tuple) -> BlockPlan:
        """Visited tiles (any allowed token pair), one plan for all heads."""
        return self._plan_from(key, "visit")

    # -- attention ---------------------------------------------------------------------
    def video_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                        ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` of the video queries over the video keys, ``(B, H, Sv, D)`` /
        ``(B, H, Sv)``, frame-major. Fully block-sparse layouts take the plain kernel
        path; otherwise full tiles run in the kernel and partial tiles in PyTorch with
        the token mask, merged by log-sum-exp."""
        if not _has_partial(*self._cfg_key(), self._grid(layout)):
            return super().video_attention(q, k, v, layout, ctx)
        if layout not in self._logged and not torch.compiler.is_compiling():
            self._logged.add(layout)
            s = self.stats(layout)
            logger.info(
                "gna: %d of %d visited tile pairs are partial at %s; they run in PyTorch with the "
                "token mask (exact but slower). Strides that are multiples of the tile %s with "
                "tile-aligned windows avoid this.", s.partial_blocks, s.visited_blocks, layout,
                self.geometry(layout).tile,
            )
        perm = self._order(layout)
        q, k, v = (perm.apply(x, dim=2) for x in (q, k, v))
        key = self.plan_key(layout, q.shape[1], q.device)
        kv_mask = perm.valid.to(q.device) if perm.n_out != perm.n_in else None
        out_f, lse_f = block_sparse_attention(q, k, v, self._full_plans.get(key), kv_mask=kv_mask,
                                              return_lse=True, backend=self.config.backend)
        out_p, lse_p = self._partial_attention(q, k, v, layout, self._partial_plans.get(key))
        out, lse = merge_attention(out_f, lse_f, out_p.to(out_f.dtype), lse_p)
        return perm.invert(out, dim=2), perm.invert(lse.unsqueeze(-1), dim=2).squeeze(-1)

    def _slot_coords(self, layout: TokenLayout, device: torch.device) -> torch.Tensor:
        """Long ``(rank, n_slots)``: each slot's coordinate per axis in the padded tile
        order (padding slots have coordinates past the extent)."""
        geom = self.geometry(layout)
        padded = [nt * t for nt, t in zip(geom.n_tiles, geom.tile)]
        r = len(padded)
        split = [s for nt, t in zip(geom.n_tiles, geom.tile) for s in (nt, t)]
        order = [2 * i for i in range(r)] + [2 * i + 1 for i in range(r)]
        coords = torch.meshgrid(*[torch.arange(p, device=device) for p in padded], indexing="ij")
        return torch.stack([c.reshape(split).permute(order).flatten() for c in coords])

    def _partial_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                           plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of every query tile over its partial key tiles only, with the exact
        token mask, on tensors in the padded tile order ``(B, H, n_slots, D)``.
        Returns ``(out, lse)`` in fp32 (fp64 for fp64 inputs); rows that see nothing
        give zeros and ``lse = -inf``."""
        geom = self.geometry(layout)
        bsz, heads, n, d = q.shape
        bs = geom.block
        nt = n // bs
        dev = q.device
        cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        qb, kb, vb = (x.to(cdtype).reshape(bsz, heads, nt, bs, d) for x in (q, k, v))
        idx = plan.kv_indices[0, 0].long()  # (nt, P): one plan for all batches and heads
        cnt = plan.kv_counts[0, 0].long()
        visits = idx.shape[1]
        coords = self._slot_coords(layout, dev).view(len(geom.grid), nt, bs)
        masks = [p.to(dev) for p, _, _ in geom.axes()]
        scale = d**-0.5
        out = torch.zeros(bsz, heads, nt, bs, d, dtype=cdtype, device=dev)
        lse = torch.full((bsz, heads, nt, bs), float("-inf"), dtype=cdtype, device=dev)
        per_tile = bsz * heads * visits * bs * (bs + 2 * d)
        chunk = max(1, _CORRECTION_BUDGET // per_tile)
        for start in range(0, nt, chunk):
            sl = slice(start, min(nt, start + chunk))
            ci = idx[sl]  # (c, P)
            # token mask of each (query tile, visited key tile): AND of per-axis lookups
            ok = (torch.arange(visits, device=dev) < cnt[sl, None])[:, None, :, None]  # (c, 1, P, 1)
            for axis, mask in enumerate(masks):
                qc = coords[axis, sl][:, :, None, None]  # (c, bs, 1, 1)
                kc = coords[axis][ci][:, None, :, :]  # (c, 1, P, bs)
                ok = ok & mask[qc, kc]
            kg, vg = kb[:, :, ci], vb[:, :, ci]  # (B, H, c, P, bs, D)
            s = torch.einsum("bhcmd,bhcpnd->bhcmpn", qb[:, :, sl], kg) * scale
            s = s.masked_fill(~ok, float("-inf")).flatten(-2)  # (B, H, c, bs, P*bs)
            row_lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
            out[:, :, sl] = torch.einsum("bhcmk,bhckd->bhcmd", p, vg.flatten(3, 4))
            lse[:, :, sl] = row_lse
        return out.reshape(bsz, heads, n, d), lse.reshape(bsz, heads, n).float()

    # -- for tests and pictures ----------------------------------------------------------
    def video_token_mask(self, layout: TokenLayout, num_heads: int,
                         ctx: AttentionContext | None = None) -> torch.Tensor:
        """The exact GNA mask over the video tokens, bool ``(1, Sv, Sv)`` frame-major
        (the same for every head). O(Sv²) memory: small layouts only."""
        return _kron_and(self.geometry(layout).axis_masks()).unsqueeze(0)
