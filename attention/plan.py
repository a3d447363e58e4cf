"""``BlockPlan``: which key blocks each query block visits.

A plan is data, not code: the kernels walk it and never decide the pattern. The
format is BCSR-like (as flex_attention's ``BlockMask``): per query block, the count of
visited key blocks and their indices in ascending order.

Shapes (``B|1`` and ``H|1`` mean "the batch/head count, or 1 to share the plan"):

* ``kv_indices``: int32 ``[B|1, H|1, n_q_blocks, max_visits]``; entries past the
  count are padding (they repeat the last used index, or 0) and are never read.
* ``kv_counts``: int32 ``[B|1, H|1, n_q_blocks]``.
* ``visit_data``: optional per-visit tensors shaped like ``kv_indices`` (e.g. a
  pooling level), for method-specific kernel variants.

``n_q_blocks = ceil(q_len / block_m)`` and ``n_kv_blocks = ceil(kv_len / block_n)``;
the last block of each may be ragged (shorter), which kernels mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field

import torch

from gen.kernels._checks import check_plan_values

__all__ = ["BlockPlan", "block_lengths"]


def _pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


def block_lengths(n: int, b: int) -> torch.Tensor:
    """Tokens per block of ``n`` tokens cut into ``b``-token blocks, float64
    ``(ceil(n / b),)``: all ``b`` but a ragged last one."""
    nb = -(-n // b)
    lens = torch.full((nb,), float(b), dtype=torch.float64)
    lens[-1] = n - b * (nb - 1)
    return lens


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """Block-sparse visiting plan of one attention call.

    Build one with :meth:`from_block_mask` or :meth:`dense` rather than by hand; the
    direct constructor validates everything (one device sync) and raises
    ``ValueError`` with what to fix.

    Args:
        block_m: query rows per block (tokens).
        block_n: key columns per block (tokens).
        q_len: number of query tokens the plan was built for.
        kv_len: number of key tokens the plan was built for.
        kv_indices: int32 ``[B|1, H|1, n_q_blocks, max_visits]``, ascending per row.
        kv_counts: int32 ``[B|1, H|1, n_q_blocks]``.
        visit_data: optional per-visit tensors shaped like ``kv_indices``.
    """

    block_m: int
    block_n: int
    q_len: int
    kv_len: int
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    visit_data: Mapping[str, torch.Tensor] = field(default_factory=dict)
    check_values: InitVar[bool] = True

    def __post_init__(self, check_values: bool) -> None:
        if torch.compiler.is_compiling():
            # only PlanCache rebuilds plans inside a graph, from a plan checked eagerly
            return
        for name in ("block_m", "block_n", "q_len", "kv_len"):
            _pos_int(name, getattr(self, name))
        idx, cnt = self.kv_indices, self.kv_counts
        if not isinstance(idx, torch.Tensor) or not isinstance(cnt, torch.Tensor):
            raise ValueError("kv_indices and kv_counts must be torch tensors.")
        if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
            raise ValueError(
                f"kv_indices/kv_counts must be int32, got {idx.dtype}/{cnt.dtype}; "
                "call .to(torch.int32) or use BlockPlan.from_block_mask."
            )
        if idx.dim() != 4 or cnt.dim() != 3 or tuple(idx.shape[:3]) != tuple(cnt.shape):
            raise ValueError(
                "kv_indices must be [B|1, H|1, n_q_blocks, max_visits] and kv_counts "
                f"[B|1, H|1, n_q_blocks]; got {tuple(idx.shape)} and {tuple(cnt.shape)}."
            )
        if idx.device != cnt.device:
            raise ValueError(f"kv_indices on {idx.device} but kv_counts on {cnt.device}.")
        if cnt.shape[2] != self.n_q_blocks:
            raise ValueError(
                f"kv_counts has {cnt.shape[2]} query blocks but q_len={self.q_len} with "
                f"block_m={self.block_m} needs {self.n_q_blocks}."
            )
        for key, t in self.visit_data.items():
            if not isinstance(t, torch.Tensor) or t.shape != idx.shape:
                raise ValueError(
                    f"visit_data[{key!r}] must be a tensor shaped like kv_indices {tuple(idx.shape)}."
                )
        if check_values:
            check_plan_values(idx, cnt, self.n_kv_blocks)

    # -- what the kernels read -------------------------------------------------
    @property
    def is_validated(self) -> bool:
        """Always True: a ``BlockPlan``'s index values are checked (or correct by
        construction) when it is made, so kernels skip the per-call value check."""
        return True

    @property
    def n_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.block_m)

    @property
    def n_kv_blocks(self) -> int:
        return math.ceil(self.kv_len / self.block_n)

    @property
    def max_visits(self) -> int:
        return self.kv_indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    @property
    def is_full(self) -> bool | None:
        """Whether every query block visits every key block (the plan is dense). Computed
        once per plan (one device sync) and kept; inside a compiled graph it is what the
        plan cache recorded eagerly, or None (unknown)."""
        full = self.__dict__.get("_full")
        if full is None and not torch.compiler.is_compiling():
            full = bool((self.kv_counts == self.n_kv_blocks).all())
            object.__setattr__(self, "_full", full)  # frozen dataclass: a cache, not state
        return full

    def cached_density(self) -> float | None:
        """:meth:`density`, computed once per plan and kept (None inside a compiled graph
        unless recorded eagerly by the plan cache)."""
        dens = self.__dict__.get("_density")
        if dens is None and not torch.compiler.is_compiling():
            dens = self.density()
            object.__setattr__(self, "_density", dens)
        return dens

    # -- constructors ------------------------------------------------------------
    @classmethod
    def from_block_mask(
        cls,
        mask: torch.Tensor,
        block_m: int,
        block_n: int,
        q_len: int,
        kv_len: int,
        visit_data: Mapping[str, torch.Tensor] | None = None,
    ) -> BlockPlan:
        """Plan from a boolean block mask.

        Args:
            mask: bool ``[n_q_blocks, n_kv_blocks]``, ``[H, nq, nk]`` or ``[B, H, nq, nk]``;
                ``mask[..., i, j]`` means query block ``i`` visits key block ``j``.
            block_m, block_n: block sizes in tokens.
            q_len, kv_len: token counts; ``nq = ceil(q_len / block_m)``, ``nk = ceil(kv_len / block_n)``.
            visit_data: optional dense per-block data ``[..., nq, nk]`` (same leading shape
                as ``mask``), gathered to the visited blocks.
        """
        _pos_int("block_m", block_m), _pos_int("block_n", block_n)
        _pos_int("q_len", q_len), _pos_int("kv_len", kv_len)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError("mask must be a bool tensor [.., n_q_blocks, n_kv_blocks].")
        if not 2 <= mask.dim() <= 4:
            raise ValueError(f"mask must have 2 to 4 dims, got shape {tuple(mask.shape)}.")
        nq, nk = math.ceil(q_len / block_m), math.ceil(kv_len / block_n)
        if tuple(mask.shape[-2:]) != (nq, nk):
            raise ValueError(
                f"mask ends in {tuple(mask.shape[-2:])} but q_len={q_len}, kv_len={kv_len} with "
                f"blocks {block_m}x{block_n} need ({nq}, {nk}); the mask was likely made for "
                "another length or block size."
            )
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        counts = mask.sum(-1, dtype=torch.int32)
        max_visits = max(int(counts.max()), 1) if counts.numel() else 1
        # A stable sort of ~mask puts the visited block indices first, in ascending order.
        order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :max_visits]
        used = torch.arange(max_visits, device=mask.device) < counts.unsqueeze(-1)
        # Padding repeats the last used index (0 for empty rows): in range and non-decreasing.
        last = order.gather(-1, (counts.long() - 1).clamp(min=0).unsqueeze(-1))
        last = torch.where(counts.unsqueeze(-1) > 0, last, torch.zeros_like(last))
        indices = torch.where(used, order, last).to(torch.int32)
        extra = {}
        for key, dense in (visit_data or {}).items():
            while dense.dim() < 4:
                dense = dense.unsqueeze(0)
            extra[key] = dense.expand(*indices.shape[:2], nq, nk).gather(-1, indices.long())
        return cls(block_m, block_n, q_len, kv_len, indices.contiguous(), counts.contiguous(),
                   extra, check_values=False)

    @classmethod
    def dense(
        cls,
        q_len: int,
        kv_len: int | None = None,
        block_m: int = 128,
        block_n: int = 64,
        device: torch.device | str | None = None,
    ) -> BlockPlan:
        """Plan visiting every key block from every query block (one plan for all heads)."""
        kv_len = q_len if kv_len is None else kv_len
        _pos_int("q_len", q_len), _pos_int("kv_len", kv_len)
        _pos_int("block_m", block_m), _pos_int("block_n", block_n)
        nq, nk = math.ceil(q_len / block_m), math.ceil(kv_len / block_n)
        mask = torch.ones(nq, nk, dtype=torch.bool, device=device)
        return cls.from_block_mask(mask, block_m, block_n, q_len, kv_len)

    @classmethod
    def random(
        cls,
        q_len: int,
        kv_len: int | None = None,
        density: float = 0.25,
        *,
        batch: int = 1,
        heads: int = 1,
        block_m: int = 128,
        block_n: int = 64,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> BlockPlan:
        """Random plan for tests and benchmarks: every query block visits the same number
        of key blocks, ``round(density * n_kv_blocks)``, chosen uniformly per (batch, head,
        query block). ``density=0`` gives a plan that visits nothing."""
        kv_len = q_len if kv_len is None else kv_len
        _pos_int("q_len", q_len), _pos_int("kv_len", kv_len)
        _pos_int("block_m", block_m), _pos_int("block_n", block_n)
        _pos_int("batch", batch), _pos_int("heads", heads)
        if not 0.0 <= float(density) <= 1.0:
            raise ValueError(f"density must lie in [0, 1], got {density}.")
        nq, nk = math.ceil(q_len / block_m), math.ceil(kv_len / block_n)
        visits = min(nk, round(density * nk))
        scores = torch.rand(batch, heads, nq, nk, generator=generator)
        mask = torch.zeros(batch, heads, nq, nk, dtype=torch.bool)
        if visits:
            mask.scatter_(-1, scores.topk(visits, dim=-1).indices, True)
        return cls.from_block_mask(mask.to(device), block_m, block_n, q_len, kv_len)

    # -- conversions -------------------------------------------------------------
    def to(self, device: torch.device | str) -> BlockPlan:
        """The same plan on another device."""
        return BlockPlan(
            self.block_m, self.block_n, self.q_len, self.kv_len,
            self.kv_indices.to(device), self.kv_counts.to(device),
            {k: t.to(device) for k, t in self.visit_data.items()}, check_values=False,
        )

    def to_block_mask(self) -> torch.Tensor:
        """Bool ``[B|1, H|1, n_q_blocks, n_kv_blocks]``: True where a block is visited."""
        used = torch.arange(self.max_visits, device=self.device) < self.kv_counts.unsqueeze(-1)
        mask = torch.zeros(*self.kv_counts.shape, self.n_kv_blocks, dtype=torch.uint8, device=self.device)
        # Padding entries point at an index a used entry also sets (or 0), so a max-reduce
        # of `used` over the indices is exact.
        mask.scatter_reduce_(-1, self.kv_indices.long(), used.to(torch.uint8), reduce="amax")
        return mask.bool()

    def to_token_mask(self) -> torch.Tensor:
        """Bool ``[B|1, H|1, q_len, kv_len]``: which keys each query sees. O(S²) memory:
        for tests and pictures on small shapes."""
        mask = self.to_block_mask()
        mask = mask.repeat_interleave(self.block_m, dim=-2)[..., : self.q_len, :]
        return mask.repeat_interleave(self.block_n, dim=-1)[..., : self.kv_len]

    def block_sizes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token counts of each query block ``(n_q_blocks,)`` and key block ``(n_kv_blocks,)``
        (all full except a ragged last one)."""
        qs = torch.full((self.n_q_blocks,), self.block_m, dtype=torch.float64)
        ks = torch.full((self.n_kv_blocks,), self.block_n, dtype=torch.float64)
        qs[-1] = self.q_len - self.block_m * (self.n_q_blocks - 1)
        ks[-1] = self.kv_len - self.block_n * (self.n_kv_blocks - 1)
        return qs, ks

    def density_per_head(self) -> torch.Tensor:
        """Fraction of (query, key) token pairs computed, fp64 ``[B|1, H|1]``.
        Ragged last blocks count with their true size, so a dense plan has density 1."""
        qs, ks = self.block_sizes()
        mask = self.to_block_mask().to("cpu", torch.float64)
        pairs = torch.einsum("bhqk,q,k->bh", mask, qs, ks)
        return pairs / (self.q_len * self.kv_len)

    def density(self) -> float:
        """Mean fraction of (query, key) token pairs computed (1.0 = dense), over the
        plan's stored batch/head entries. Attention FLOPs scale with it."""
        return float(self.density_per_head().mean())

    # -- for humans --------------------------------------------------------------
    def __repr__(self) -> str:
        b, h, nq = self.kv_counts.shape
        extra = f", visit_data={sorted(self.visit_data)}" if self.visit_data else ""
        return (
            f"BlockPlan(q_len={self.q_len}, kv_len={self.kv_len}, blocks={self.block_m}x{self.block_n}, "
            f"grid={nq}x{self.n_kv_blocks}, batch={b}, heads={h}, max_visits={self.max_visits}, "
            f"density={self.density():.4f}, device={self.device}{extra})"
        )

    def to_string(self, batch: int = 0, head: int = 0, max_cells: int = 64) -> str:
        """ASCII picture of one (batch, head): ``█`` visited, ``░`` skipped. Grids wider
        than ``max_cells`` are pooled; pooled cells shade by density (`` ░▒▓█``)."""
        from .plan_pictures import plan_to_string

        return plan_to_string(self, batch=batch, head=head, max_cells=max_cells)

    def save_png(self, path, batch: int = 0, head: int = 0, title: str | None = None):
        """Write a PNG picture of one (batch, head) to ``path``; returns the path."""
        from .plan_pictures import save_plan_png

        return save_plan_png(self, path, batch=batch, head=head, title=title)
