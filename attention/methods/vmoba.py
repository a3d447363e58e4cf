"""``vmoba``: VMoBA, a mixture of chunk attention with per-query-token gating.

The video tokens of a layer are cut into chunks, the partition cycling with the layer:
``(layer − first_full_layer) mod 3`` picks temporal (1-D: ``chunks_1d`` whole frames),
spatial (2-D: a ``chunks_2d = (rows, cols)`` patch across all frames) or spatio-temporal
(3-D: a ``chunks_3d = (frames, rows, cols)`` cube) chunks; layers before
``first_full_layer`` run dense. Each query token gates every chunk with ``q · mean(K_c)``
(fp32, no softmax scale, the mean over the chunk's tokens), always attends its own chunk,
and adds chunks by ``select``:

* ``topk``: the ``topk − 1`` other chunks with the largest gates (``topk`` counts the own
  chunk, as the authors' +1e9 boost does; an int, or one per partition 1-D/2-D/3-D);
* ``threshold``: gates min-max normalised over the chunks; the own chunk's share first,
  then other chunks in descending order until the cumulative share reaches ``tau``
  (inclusive), at least one other chunk when there are two or more. ``tau >= 1`` selects
  every chunk: the authors' code, when ``tau`` cannot be reached, takes only the top two
  other chunks (a boolean ``full_like`` reads as 1); gen does not copy that.

``mode="query_head"`` decides per query token and head (both FastVideo configs);
``mode="global"`` per head over all (query, chunk) gates (the paper's global selection;
a query may then get no other chunk). Ties with the last chunk taken are taken too.

Execution: tokens are put in chunk order (:func:`chunk_order`, the order of
:func:`gen.attention.tile_order` with ragged edge tiles, so every chunk is a contiguous run; chunks that do not divide the grid are
kept short, not padded, and their lengths come from a bounds table), the gate runs on the
device without host synchronisation (gen's Triton kernels on CUDA, the PyTorch reference
elsewhere), and the chunk variant of gen's block-sparse kernel walks, per 64 query rows,
the union of the rows' chunks in kernel tiles, masking the rows that did not choose a
chunk: the output is exactly dense attention masked by {own chunk ∪ chosen chunks} per
row. Joint text (HunyuanVideo, FLUX): video queries attend their chunks plus every valid
text key, text queries attend everything (the base class's rule).

``density()`` is the fraction of query-key pairs *attended* (the method's sparsity),
averaged over the calls seen; the kernel's tiles cover :meth:`VMoBA.observed_tile_density`
of them (rows of a 64-row tile that did not choose a chunk are masked, not skipped).

Facts from ``KwaiVGI/VMoBA`` and FastVideo's port; the stored Wan 2.1 1.3B config (77
frames, 448x832, grid 20x28x52): threshold 0.25, ``query_head``, chunks 2 / [4, 13] /
[4, 4, 13] = 2,912 / 1,040 / 208 tokens. The authors require chunks that divide the grid;
gen allows ragged ones.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..chunk_sparse import MODES, SELECTS, ChunkPlan, chunk_sparse_attention, plan_chunks
from ..context import AttentionContext
from ..layout import TokenLayout
from ..plan import BlockPlan
from ..token_order import TokenPermutation
from ._observed import ObservedDensities
from .base import MethodConfig, SparseMethod

__all__ = ["VMoBA", "VMoBAConfig", "VMoBAEstimate", "chunk_bounds", "chunk_order", "PARTITIONS"]

#: partition names, in the authors' cycle order: temporal, spatial, spatio-temporal
PARTITIONS = ("1d", "2d", "3d")


def _pos_tuple(name: str, value, n: int) -> tuple[int, ...]:
    if isinstance(value, list):
        value = tuple(value)
    if (not isinstance(value, tuple) or len(value) != n
            or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in value)):
        raise ValueError(f"{name} must be {n} positive ints, got {value!r}.")
    return value


@dataclass(frozen=True)
class VMoBAConfig(MethodConfig):
    """Config of ``vmoba`` (defaults: FastVideo's stored Wan 2.1 1.3B config).

    Args:
        chunks_1d: frames per temporal chunk (1-D partition: ``chunks_1d · H · W`` tokens).
        chunks_2d: ``(rows, cols)`` of a spatial chunk, across all frames (2-D partition).
        chunks_3d: ``(frames, rows, cols)`` of a spatio-temporal chunk (3-D partition).
        select: ``"threshold"`` (cumulative share of min-max normalised gates) or ``"topk"``.
        tau: the threshold, > 0 (authors: 0.25); ``>= 1`` selects every chunk.
        topk: chunks each query attends with ``select="topk"``, its own included: one int,
            or one per partition ``(1-D, 2-D, 3-D)``.
        mode: ``"query_head"`` (per query token and head) or ``"global"`` (per head).
        first_full_layer: layers before it run dense; the partition of layer ``l`` is
            ``partitions[(l − first_full_layer) mod len(partitions)]``.
        partitions: the partition cycle over layers, comma-separated from ``1d``, ``2d``,
            ``3d`` (authors: ``1d,2d,3d``; FLUX: ``2d``).
        query_block: query rows per plan row of the kernel (a power of two in [16, 256]):
            the rows whose chunk choices are walked together.
    """

    chunks_1d: int = 2
    chunks_2d: tuple[int, int] = (4, 13)
    chunks_3d: tuple[int, int, int] = (4, 4, 13)
    select: str = "threshold"
    tau: float = 0.25
    topk: int | tuple[int, int, int] = (2, 6, 18)
    mode: str = "query_head"
    first_full_layer: int = 0
    partitions: str = "1d,2d,3d"
    query_block: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        c1 = self.chunks_1d
        if isinstance(c1, bool) or not isinstance(c1, int) or c1 <= 0:
            raise ValueError(f"chunks_1d must be a positive int (frames per chunk), got {c1!r}.")
        object.__setattr__(self, "chunks_2d", _pos_tuple("chunks_2d", self.chunks_2d, 2))
        object.__setattr__(self, "chunks_3d", _pos_tuple("chunks_3d", self.chunks_3d, 3))
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {', '.join(SELECTS)}, got {self.select!r}.")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau > 0 or math.isnan(self.tau):
            raise ValueError(f"tau must be a number > 0 (0.25 in the authors' config; >= 1 selects all), got {self.tau!r}.")
        tk = self.topk
        if isinstance(tk, list):
            tk = tuple(tk)
            object.__setattr__(self, "topk", tk)
        if isinstance(tk, tuple):
            _pos_tuple("topk", tk, 3)
        elif isinstance(tk, bool) or not isinstance(tk, int) or tk < 1:
            raise ValueError(f"topk must be an int >= 1 or three of them (1-D, 2-D, 3-D), got {tk!r}.")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        f = self.first_full_layer
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"first_full_layer must be an int >= 0, got {f!r}.")
        parts = self.partition_cycle
        if not parts or any(p not in PARTITIONS for p in parts):
            raise ValueError(f"partitions must list some of {', '.join(PARTITIONS)} (comma-separated), "
                             f"got {self.partitions!r}.")
        qb = self.query_block
        if isinstance(qb, bool) or not isinstance(qb, int) or qb < 16 or qb > 256 or qb & (qb - 1):
            raise ValueError(f"query_block must be a power of two in [16, 256], got {qb!r}.")

    @property
    def partition_cycle(self) -> tuple[str, ...]:
        """The partitions of consecutive layers, from :attr:`partitions`."""
        if not isinstance(self.partitions, str):
            return ()
        return tuple(p.strip() for p in self.partitions.split(",") if p.strip())


def chunk_bounds(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> list[int]:
    """Token bounds of the chunks of ``grid (t, h, w)`` cut into tiles ``tile``, in the
    order of ``tile_order(grid, tile, pad=False)`` (tiles in raster order, edge tiles
    short): ``n_chunks + 1`` ints from 0 to ``t·h·w``."""
    extents = []
    for g, t in zip(grid, tile):
        n = -(-g // t)
        extents.append([min(t, g - i * t) for i in range(n)])
    sizes = [a * b * c for a, b, c in itertools.product(*extents)]
    return [0, *itertools.accumulate(sizes)]


def chunk_order(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> TokenPermutation:
    """The chunk order of ``grid (t, h, w)`` cut into tiles ``tile``: equal to
    ``tile_order(grid, tile, pad=False)`` (tiles in raster order, raster order inside a
    tile, edge tiles short), computed as an argsort of a per-token key, so its shape does
    not depend on data (it traces into a compiled graph)."""
    coords = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    n = [-(-g // t) for g, t in zip(grid, tile)]
    tid = ((coords[0] // tile[0]) * n[1] + coords[1] // tile[1]) * n[2] + coords[2] // tile[2]
    inner = ((coords[0] % tile[0]) * tile[1] + coords[1] % tile[1]) * tile[2] + coords[2] % tile[2]
    key = (tid * math.prod(tile) + inner).flatten()
    return TokenPermutation(torch.argsort(key), math.prod(grid))


@dataclass(frozen=True, eq=False)
class VMoBAEstimate:
    """What the gate decided for one call.

    Attributes:
        plan: the :class:`gen.attention.chunk_sparse.ChunkPlan` over the video tokens in
            the partition's chunk order.
        partition: ``"1d"``, ``"2d"`` or ``"3d"``.
    """

    plan: ChunkPlan
    partition: str


class VMoBA(SparseMethod):
    name = "vmoba"
    config_cls = VMoBAConfig
    static = False
    summary = "VMoBA: per-token chunk gating (q · mean K), 1D/2D/3D chunks cycling over layers"

    def __init__(self, config: VMoBAConfig | None = None, *, model: str | None = None) -> None:
        super().__init__(config, model=model)
        # per (grid, partition): (chunk order or None, bounds, longest chunk), built eagerly
        self._chunkings: dict[tuple, tuple[TokenPermutation | None, list[int], int]] = {}
        # the same per device: (order or None, bounds, bounds as an int32 device tensor)
        self._on_devices: dict[tuple, tuple[TokenPermutation | None, list[int], torch.Tensor]] = {}
        # per layout: [attended pair fraction sum, tile pair fraction sum (device scalars), calls]
        self._observed = ObservedDensities()

    # -- schedule and partition -----------------------------------------------------------
    def is_dense_layer(self, layer_index: int | None) -> bool:
        """Layers before ``first_full_layer`` run dense, as do ``dense_layers``."""
        if layer_index is not None and layer_index < self.config.first_full_layer:
            return True
        return super().is_dense_layer(layer_index)

    def partition(self, layer_index: int | None) -> str:
        """The partition of a layer: ``"1d"``, ``"2d"`` or ``"3d"`` (the first of the cycle
        when the layer is unknown)."""
        cycle = self.config.partition_cycle
        if layer_index is None:
            return cycle[0]
        return cycle[(layer_index - self.config.first_full_layer) % len(cycle)]

    def chunk_tile(self, layout: TokenLayout, partition: str) -> tuple[int, int, int]:
        """The chunk of ``partition`` at ``layout``, ``(frames, rows, cols)`` in tokens
        (clipped to the grid)."""
        t, h, w = layout.grid
        c = self.config
        if partition == "1d":
            tile = (c.chunks_1d, h, w)
        elif partition == "2d":
            tile = (t, *c.chunks_2d)
        elif partition == "3d":
            tile = c.chunks_3d
        else:
            raise ValueError(f"partition must be one of {', '.join(PARTITIONS)}, got {partition!r}.")
        return tuple(min(a, g) for a, g in zip(tile, layout.grid))

    def chunking(self, layout: TokenLayout, partition: str) -> tuple[TokenPermutation | None, list[int], int]:
        """``(order, bounds, longest chunk)`` of ``partition`` at ``layout``: the chunk order
        of the video tokens (None when it is frame-major: temporal chunks), the chunk token
        bounds in that order, and the longest chunk's length. Kept per layout eagerly;
        rebuilt (data-independent) inside a compiled graph."""
        key = (layout.grid, partition)
        if not torch.compiler.is_compiling() and key in self._chunkings:
            return self._chunkings[key]
        tile = self.chunk_tile(layout, partition)
        bounds = chunk_bounds(layout.grid, tile)
        perm = None
        if tile[1:] != layout.grid[1:]:  # whole frames keep the frame-major order
            perm = chunk_order(layout.grid, tile)
        got = (perm, bounds, max(b - a for a, b in zip(bounds[:-1], bounds[1:])))
        if not torch.compiler.is_compiling():
            self._chunkings[key] = got
        return got

    def _on_device(self, layout: TokenLayout, partition: str, device: torch.device
                   ) -> tuple[TokenPermutation | None, list[int], torch.Tensor]:
        """:meth:`chunking` with the order and an int32 bounds tensor on ``device``, kept per
        device eagerly (a call then copies nothing from the host)."""
        key = (layout.grid, partition, str(device))
        if not torch.compiler.is_compiling() and key in self._on_devices:
            return self._on_devices[key]
        perm, bounds, _ = self.chunking(layout, partition)
        if perm is not None and perm.index.device != device:
            perm = TokenPermutation(perm.index.to(device), perm.n_in)
        got = (perm, bounds, torch.tensor(bounds, dtype=torch.int32, device=device))
        if not torch.compiler.is_compiling():
            self._on_devices[key] = got
        return got

    def _topk(self, partition: str) -> int:
        tk = self.config.topk
        return tk if isinstance(tk, int) else tk[PARTITIONS.index(partition)]

    # -- estimation -------------------------------------------------------------------------
    def estimate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layout: TokenLayout, *,
                 layer_index: int | None = None) -> VMoBAEstimate:
        """The chunk plan of one call. ``q, k (B, H, Sv, D)``: video tokens already in the
        chunk order of the layer's partition (:meth:`chunking`); ``v`` is unused (kept for
        the dynamic-method signature)."""
        part = self.partition(layer_index)
        _, bounds, on_device = self._on_device(TokenLayout(*layout.grid), part, q.device)
        c = self.config
        plan = plan_chunks(q, k, bounds, select=c.select, tau=float(c.tau), topk=self._topk(part), mode=c.mode,
                           query_block=c.query_block, backend=c.backend, bounds=on_device)
        if not torch.compiler.is_compiling():
            self._observe(TokenLayout(*layout.grid), plan)
        return VMoBAEstimate(plan, part)

    def _observe(self, layout: TokenLayout, plan: ChunkPlan) -> None:
        # attended and tile-covered pair fractions of this call, kept on the device (no sync)
        n = plan.q_len * plan.kv_len
        attended = plan.keys.double().sum(-1).mean() / n
        sizes = (plan.chunk_bounds[1:] - plan.chunk_bounds[:-1]).double()
        used = torch.arange(plan.max_visits, device=plan.device) < plan.kv_counts.unsqueeze(-1)
        per_row = (sizes[plan.kv_indices.long()] * used).sum(-1)  # (B, H, nq)
        rows = torch.full((plan.n_q_blocks,), float(plan.block_m), dtype=torch.float64, device=plan.device)
        rows[-1] = plan.q_len - plan.block_m * (plan.n_q_blocks - 1)
        tiles = (per_row * rows).sum(-1).mean() / n
        self._observed.add(layout, attended, tiles)

    def observed_video_density(self, layout: TokenLayout) -> float | None:
        """Mean fraction of video-video pairs attended over the calls seen at ``layout``
        (None before any; one device sync)."""
        return self._observed.mean(TokenLayout(*layout.grid), 0)

    def observed_tile_density(self, layout: TokenLayout) -> float | None:
        """Mean fraction of video-video pairs the kernel's tiles cover (query tiles against
        every key of their visited chunks) over the calls seen at ``layout``."""
        return self._observed.mean(TokenLayout(*layout.grid), 1)

    def reset_observed(self) -> None:
        """Forget the densities observed so far."""
        self._observed.clear()

    def _estimate_call(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: AttentionContext | None
                       ) -> tuple[VMoBAEstimate, TokenPermutation | None]:
        layer = None if ctx is None else ctx.layer_index
        perm, _, _ = self._on_device(TokenLayout(*layout.grid), self.partition(layer), q.device)
        if perm is not None:
            q, k = perm.apply(q, dim=2), perm.apply(k, dim=2)
        return self.estimate(q, k, None, layout, layer_index=layer), perm

    def plan(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None, *,
             q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> BlockPlan:
        """A picture of one real call's plan (``gen masks --capture``): ``q, k (B, H, Sv, D)``
        its video queries and keys in frame-major order; plan rows of ``query_block`` tokens
        against key blocks, in chunk order (:meth:`ChunkPlan.block_picture`). Without them
        there is no plan: the pattern depends on the inputs."""
        if q is None or k is None:
            raise NotImplementedError("vmoba plans depend on each call's q and k; pass q= and k=")
        est, _ = self._estimate_call(q, k, layout, ctx)
        return est.plan.block_picture()

    def token_order(self, layout: TokenLayout) -> TokenPermutation | None:
        """The chunk order of the first partition of the cycle (pictures; each call uses its
        layer's own order)."""
        return self.chunking(TokenLayout(*layout.grid), self.partition(None))[0]

    def video_token_mask_of_call(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor,
                                 ctx: AttentionContext | None = None) -> torch.Tensor:
        """Bool ``(H, Sv, Sv)``: exactly which video keys each video query of a real call
        attends (``q, k (B, H, Sv, D)`` frame-major, batch 0), frame-major order. O(S²)."""
        est, perm = self._estimate_call(q, k, layout, ctx)
        mask = est.plan.to_token_mask()[0]
        if perm is not None:
            inv = perm.inverse.to(mask.device)
            mask = mask[:, inv][:, :, inv]
        return mask

    # -- attention --------------------------------------------------------------------------
    def video_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                        ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Video queries against video keys (frame-major in and out): chunk order of the
        layer's partition, the gate, chunk-sparse attention, the order undone."""
        perm, _, _ = self._on_device(TokenLayout(*layout.grid), self.partition(ctx.layer_index), q.device)
        if perm is not None:
            q, k, v = (perm.apply(x, dim=2) for x in (q, k, v))
        est = self.estimate(q, k, v, layout, layer_index=ctx.layer_index)
        if not ctx.need_lse:
            out = chunk_sparse_attention(q, k, v, est.plan, backend=self.config.backend)
            return (out if perm is None else perm.invert(out, dim=2)), None
        out, lse = chunk_sparse_attention(q, k, v, est.plan, return_lse=True, backend=self.config.backend)
        if perm is None:
            return out, lse
        return perm.invert(out, dim=2), perm.invert(lse.unsqueeze(-1), dim=2).squeeze(-1)

    # -- for pictures and reports -----------------------------------------------------------------
    def density(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None) -> float:
        """Fraction of the call's query-key pairs attended, text included, averaged over the
        calls seen at ``layout`` (the pattern depends on each call's q and k); raises
        ``NotImplementedError`` before any call at that layout."""
        video = self.observed_video_density(layout)
        if video is None:
            raise NotImplementedError("vmoba's density depends on each call's q and k; run a call first")
        dense_pairs = layout.seq_len**2 - layout.video_len**2
        return (video * layout.video_len**2 + dense_pairs) / layout.seq_len**2

    def describe(self, layout: TokenLayout) -> str:
        c = self.config
        parts = []
        for p in c.partition_cycle:
            _, bounds, longest = self.chunking(TokenLayout(*layout.grid), p)
            parts.append(f"{p} {'x'.join(map(str, self.chunk_tile(layout, p)))}: {len(bounds) - 1} chunks "
                         f"(longest {longest})")
        rule = f"tau={c.tau}" if c.select == "threshold" else f"topk={c.topk}"
        return f"vmoba {c.select} {rule} {c.mode}, first_full_layer={c.first_full_layer}; " + "; ".join(parts) + f" on {layout}"
