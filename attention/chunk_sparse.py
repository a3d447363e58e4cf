"""Chunk-sparse attention (VMoBA): ``ChunkPlan`` and the entry points over the backend
registry.

A chunk plan extends the block-sparse contract to chunk-granular, per-token selection:

* the key *blocks* are chunks of any length, contiguous in the plan's token order:
  chunk ``c`` is keys ``chunk_bounds[c] .. chunk_bounds[c + 1]`` (a bounds table rather
  than ``c * block_n``: chunks of a 2-D/3-D partition that does not divide the grid are
  ragged at its edges, and are kept short, not padded);
* each query *row* says which chunks it attends, a bitmask ``row_bits``;
* per ``block_m`` query rows, the visited chunks (``kv_indices``, ``kv_counts``, the
  union of the rows' selections) are what the kernel walks; rows that did not choose a
  visited chunk get ``-inf`` for it, so the result is exactly the per-token selection.

Entry points (``backend=None``: gen's Triton kernels on CUDA, the PyTorch reference
elsewhere; ``"triton"`` or ``"torch"`` asks for one and raises ``ValueError`` saying why
if it cannot run): :func:`chunk_means`, :func:`chunk_gate`, :func:`plan_chunks` (means,
gate and the plan in one call, no host synchronisation on CUDA) and
:func:`chunk_sparse_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import InitVar, dataclass
from types import SimpleNamespace

import torch

from . import chunk_reference
from .backends import choose
from .backends import chunk as _chunk_backends  # noqa: F401  (registers the chunk operations)
from .backends.chunk import describe
from .plan import BlockPlan

__all__ = ["ChunkPlan", "chunk_gate", "chunk_means", "chunk_sparse_attention", "plan_chunks"]

MODES = ("query_head", "global")
SELECTS = ("threshold", "topk")


@dataclass(frozen=True, eq=False)
class ChunkPlan:
    """Chunk-sparse visiting plan of one attention call (tokens in chunk order).

    Build one with :func:`plan_chunks` or :meth:`from_selection`; the direct constructor
    checks shapes and (``check_values``, one device sync) index values.

    Args:
        block_m: query rows per plan row (a power of two in [16, 256]).
        q_len, kv_len: query and key tokens.
        chunk_bounds: int32 ``(n_chunks + 1,)``, rising strictly from 0 to ``kv_len``.
        kv_indices: int32 ``[B|1, H|1, n_q_blocks, max_visits]``: chunks visited by each
            plan row, ascending, padded by repeating the last.
        kv_counts: int32 ``[B|1, H|1, n_q_blocks]``.
        row_bits: int32 ``[B|1, H|1, ceil(n_chunks / 32), q_len]``: bit ``c % 32`` of word
            ``c // 32`` of row ``s`` set when query ``s`` attends chunk ``c``; every chunk a
            row attends must be visited by its plan row.
        max_chunk: the longest chunk, in tokens.
        keys: optional int32 ``[B|1, H|1, q_len]``: keys each query attends (from the gate).
    """

    block_m: int
    q_len: int
    kv_len: int
    chunk_bounds: torch.Tensor
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    row_bits: torch.Tensor
    max_chunk: int
    keys: torch.Tensor | None = None
    check_values: InitVar[bool] = True

    def __post_init__(self, check_values: bool) -> None:
        if torch.compiler.is_compiling():
            return
        from gen.kernels.block_sparse_attention import check_chunk_plan

        for name in ("block_m", "q_len", "kv_len", "max_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ChunkPlan.{name} must be a positive int, got {v!r}.")
        b, h = self._bh()
        dev = self.chunk_bounds.device
        q = SimpleNamespace(shape=(b, h, self.q_len, 16), device=dev)  # what the check reads
        k = SimpleNamespace(shape=(b, h, self.kv_len, 16), device=dev)
        check_chunk_plan(_Unchecked(self) if check_values else self, q, k)
        if check_values:
            sizes = self.chunk_bounds[1:] - self.chunk_bounds[:-1]
            if int(sizes.max()) != self.max_chunk:
                raise ValueError(f"max_chunk={self.max_chunk} but the longest chunk has {int(sizes.max())} tokens.")
            visited = torch.zeros(*self.kv_counts.shape, self.n_chunks, dtype=torch.bool, device=dev)
            used = torch.arange(self.max_visits, device=dev) < self.kv_counts.unsqueeze(-1)
            visited.scatter_(-1, torch.where(used, self.kv_indices, 0).long(), used)
            sel = self.selection()
            pad = self.n_q_blocks * self.block_m - self.q_len
            sel = torch.nn.functional.pad(sel, (0, 0, 0, pad)).view(*sel.shape[:2], self.n_q_blocks, self.block_m, -1)
            if bool((sel & ~visited.unsqueeze(3)).any()):
                raise ValueError("row_bits select chunks their plan row does not visit; build the plan with "
                                 "ChunkPlan.from_selection.")

    def _bh(self) -> tuple[int, int]:
        return (max(self.kv_counts.shape[0], self.row_bits.shape[0]), max(self.kv_counts.shape[1], self.row_bits.shape[1]))

    # -- what the kernels read ---------------------------------------------------------------
    @property
    def is_validated(self) -> bool:
        """Always True: values are checked (or correct by construction) when made."""
        return True

    @property
    def n_chunks(self) -> int:
        return self.chunk_bounds.numel() - 1

    @property
    def n_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.block_m)

    @property
    def max_visits(self) -> int:
        return self.kv_indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_selection(cls, union: torch.Tensor, row_bits: torch.Tensor, chunk_bounds: Sequence[int] | torch.Tensor,
                       *, block_m: int, q_len: int, kv_len: int, max_chunk: int | None = None,
                       keys: torch.Tensor | None = None) -> ChunkPlan:
        """The plan of a gate's outputs (no host synchronisation on CUDA).

        Args:
            union: uint8/bool ``(B|1, H|1, n_q_blocks, n_chunks)``: chunks some row of each
                plan row attends. row_bits: as the field. keys: optional, as the field.
            chunk_bounds: the bounds, as a list of ints (copied to the device) or an int32
                tensor on ``union``'s device (used as is).
            block_m, q_len, kv_len: as the fields. max_chunk: the longest chunk (read from
                ``chunk_bounds`` when None: a device sync for a CUDA tensor).

        The visit lists are ``n_chunks`` wide (no sync to learn the longest row), except on
        the CPU, where they are cut to the longest row.
        """
        dev = union.device
        if isinstance(chunk_bounds, torch.Tensor):
            bounds = chunk_bounds.to(dev, torch.int32)
            if max_chunk is None:
                max_chunk = int((bounds[1:] - bounds[:-1]).max())
        else:
            if max_chunk is None:
                max_chunk = max(b - a for a, b in zip(chunk_bounds[:-1], chunk_bounds[1:]))
            bounds = torch.tensor(list(chunk_bounds), dtype=torch.int32, device=dev)
        sel = union.bool()
        counts = sel.sum(-1, dtype=torch.int32)
        # a stable sort of ~sel puts the visited chunk ids first, ascending
        order = torch.sort((~sel).to(torch.uint8), dim=-1, stable=True).indices
        width = order.shape[-1]
        if dev.type == "cpu" and not torch.compiler.is_compiling():
            width = max(1, int(counts.max()))  # free on the CPU: a narrower walk for the reference
            order = order[..., :width]
        used = torch.arange(width, device=dev) < counts.unsqueeze(-1)
        last = order.gather(-1, (counts.long() - 1).clamp(min=0).unsqueeze(-1))
        last = torch.where(counts.unsqueeze(-1) > 0, last, torch.zeros_like(last))
        indices = torch.where(used, order, last).to(torch.int32).contiguous()
        return cls(block_m, q_len, kv_len, bounds, indices, counts.contiguous(), row_bits, int(max_chunk), keys,
                   check_values=False)

    def to(self, device: torch.device | str) -> ChunkPlan:
        """The same plan on another device."""
        return ChunkPlan(self.block_m, self.q_len, self.kv_len, self.chunk_bounds.to(device),
                         self.kv_indices.to(device), self.kv_counts.to(device), self.row_bits.to(device),
                         self.max_chunk, None if self.keys is None else self.keys.to(device), check_values=False)

    # -- what it selects ---------------------------------------------------------------------
    def selection(self) -> torch.Tensor:
        """Bool ``[B|1, H|1, q_len, n_chunks]``: the chunks each query attends."""
        return chunk_reference.unpack_row_bits(self.row_bits, self.n_chunks)

    def to_token_mask(self) -> torch.Tensor:
        """Bool ``[B|1, H|1, q_len, kv_len]``: which keys each query sees, exactly. O(S²)
        memory: for tests and pictures on small shapes."""
        chunk = chunk_reference.chunk_of_token(self.chunk_bounds, self.kv_len)
        return self.selection()[..., chunk]

    def density_per_head(self) -> torch.Tensor:
        """Fraction of (query, key) pairs attended, fp64 ``[B|1, H|1]``."""
        if self.keys is not None:
            keys = self.keys.double()
        else:
            sizes = (self.chunk_bounds[1:] - self.chunk_bounds[:-1]).double()
            keys = (self.selection().double() * sizes).sum(-1)
        return (keys.sum(-1) / (self.q_len * self.kv_len)).cpu()

    def density(self) -> float:
        """Mean fraction of (query, key) pairs attended (1.0 = dense)."""
        return float(self.density_per_head().mean())

    def tile_density(self) -> float:
        """Fraction of (query, key) pairs the kernel's plan rows cover: every row of a plan
        row against every key of its visited chunks (>= :meth:`density`; rows that did
        not choose a visited chunk are masked, not skipped)."""
        sizes = (self.chunk_bounds[1:] - self.chunk_bounds[:-1]).double()
        used = torch.arange(self.max_visits, device=self.device) < self.kv_counts.unsqueeze(-1)
        per_row = (sizes[self.kv_indices.long()] * used).sum(-1)  # (B, H, nq)
        rows = torch.full((self.n_q_blocks,), float(self.block_m), dtype=torch.float64, device=self.device)
        rows[-1] = self.q_len - self.block_m * (self.n_q_blocks - 1)
        return float(((per_row * rows).sum(-1) / (self.q_len * self.kv_len)).mean())

    def block_picture(self, max_columns: int = 1024) -> BlockPlan:
        """A :class:`BlockPlan` for pictures (``gen masks``): plan rows of ``block_m`` queries
        against key blocks of equal length (the gcd of the chunk bounds, or coarser when that
        would give more than ``max_columns`` blocks), visited where they overlap a visited
        chunk."""
        bounds = [int(b) for b in self.chunk_bounds.tolist()]
        g = 0
        for b in bounds:
            g = math.gcd(g, b)
        g = max(g, math.ceil(self.kv_len / max_columns))
        ncol = math.ceil(self.kv_len / g)
        starts = torch.arange(ncol, dtype=torch.long) * g
        lo = torch.tensor(bounds[:-1]).view(-1, 1)
        hi = torch.tensor(bounds[1:]).view(-1, 1)
        overlap = ((lo < (starts + g).view(1, -1)) & (hi > starts.view(1, -1))).double()  # (nc, ncol)
        used = torch.arange(self.max_visits) < self.kv_counts.cpu().unsqueeze(-1)
        visited = torch.zeros(*self.kv_counts.shape, self.n_chunks, dtype=torch.float64)
        visited.scatter_reduce_(-1, self.kv_indices.cpu().long(), used.double(), reduce="amax")
        mask = (visited @ overlap) > 0
        return BlockPlan.from_block_mask(mask, self.block_m, g, self.q_len, self.kv_len)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
               return_lse: bool = False, backend: str | None = None):
        """:func:`chunk_sparse_attention` with this plan (what ``gen bench kernels`` times)."""
        return chunk_sparse_attention(q, k, v, self, scale=scale, return_lse=return_lse, backend=backend)

    def __repr__(self) -> str:
        b, h, nq = self.kv_counts.shape
        return (f"ChunkPlan(q_len={self.q_len}, kv_len={self.kv_len}, chunks={self.n_chunks} "
                f"(longest {self.max_chunk}), block_m={self.block_m}, grid={nq}x{self.n_chunks}, batch={b}, "
                f"heads={h}, max_visits={self.max_visits}, device={self.device})")


class _Unchecked:
    """A view of a plan that asks for its values to be checked."""

    is_validated = False

    def __init__(self, plan: ChunkPlan) -> None:
        self._plan = plan

    def __getattr__(self, name):
        return getattr(self._plan, name)


def _backend(backend: str | None) -> str | None:
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}.")
    return backend


def chunk_means(x: torch.Tensor, bounds: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Mean of each chunk's keys: fp32 ``(B, H, n_chunks, D)`` for ``x (B, H, S, D)`` and
    int32 ``bounds (n_chunks + 1,)`` rising from 0 to ``S`` (see
    :func:`gen.attention.chunk_reference.chunk_means`)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (B, H, S, D), got {getattr(x, 'shape', type(x))}.")
    choice = choose("chunk_means", describe(x, x.shape[2], bounds.numel() - 1), _backend(backend))
    return choice.backend.run(x, bounds)


def chunk_gate(q: torch.Tensor, means: torch.Tensor, bounds: torch.Tensor, *, select: str = "threshold",
               tau: float = 0.25, topk: int = 3, query_block: int = 64, mode: str = "query_head",
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query-token chunk selection: ``(bits, union, keys)`` (see
    :func:`gen.attention.chunk_reference.chunk_gate`). ``mode="global"`` decides per head
    (:func:`gen.attention.chunk_reference.select_chunks_global`) and always runs as fused
    torch ops (a sort over every (query, chunk) gate of a head), on any device."""
    if select not in SELECTS:
        raise ValueError(f"select must be one of {', '.join(SELECTS)}, got {select!r}.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not q.is_floating_point():
        raise ValueError(f"q must be a float tensor (B, H, S, D), got {getattr(q, 'shape', type(q))}.")
    kw = dict(select=select, tau=tau, topk=topk, query_block=query_block)
    if mode == "global":
        _backend(backend)
        return chunk_reference.chunk_gate_global(q, means, bounds, **kw)
    choice = choose("chunk_gate", describe(q, q.shape[2], bounds.numel() - 1), _backend(backend))
    return choice.backend.run(q, means, bounds, **kw)


def plan_chunks(q: torch.Tensor, k: torch.Tensor, chunk_bounds: Sequence[int], *, select: str = "threshold",
                tau: float = 0.25, topk: int = 3, mode: str = "query_head", query_block: int = 64,
                backend: str | None = None, bounds: torch.Tensor | None = None) -> ChunkPlan:
    """Chunk means of ``k``, the gate of every query of ``q`` and the :class:`ChunkPlan`,
    without host synchronisation on CUDA.

    Args:
        q, k: ``(B, H, S, D)`` in chunk order (each chunk a contiguous run).
        chunk_bounds: ints rising strictly from 0 to ``S`` (``n_chunks + 1`` of them),
            checked on the host.
        select, tau, topk, mode: the selection rule (:func:`chunk_gate`).
        query_block: query rows per plan row (a power of two in [16, 256]).
        backend: None, ``"triton"`` or ``"torch"``.
        bounds: the same bounds as an int32 tensor on ``q``'s device, when the caller keeps
            one (saves a host-to-device copy per call); built from ``chunk_bounds`` if None.
    """
    cb = [int(b) for b in chunk_bounds]
    if len(cb) < 2 or cb[0] != 0 or cb[-1] != k.shape[2] or any(b <= a for a, b in zip(cb[:-1], cb[1:])):
        raise ValueError(f"chunk_bounds must rise strictly from 0 to the key count {k.shape[2]}, got "
                         f"{cb[:4]}...{cb[-2:]} ({len(cb) - 1} chunks).")
    if bounds is None:
        bounds = torch.tensor(cb, dtype=torch.int32, device=q.device)
    elif bounds.dtype != torch.int32 or bounds.device != q.device or tuple(bounds.shape) != (len(cb),):
        raise ValueError(f"bounds must be int32 ({len(cb)},) on {q.device}, got {bounds.dtype} "
                         f"{tuple(bounds.shape)} on {bounds.device}.")
    means = chunk_means(k, bounds, backend=backend)
    bits, union, keys = chunk_gate(q, means, bounds, select=select, tau=tau, topk=topk, query_block=query_block,
                                   mode=mode, backend=backend)
    longest = max(b - a for a, b in zip(cb[:-1], cb[1:]))
    return ChunkPlan.from_selection(union, bits, bounds, block_m=query_block, q_len=q.shape[2], kv_len=k.shape[2],
                                    max_chunk=longest, keys=keys)


def chunk_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ChunkPlan, *,
                           scale: float | None = None, return_lse: bool = False, backend: str | None = None):
    """Each query row attends the keys of the chunks its row bits select: ``out (B, H, Sq,
    D)`` (and the fp32 ``lse (B, H, Sq)`` with ``return_lse``) for ``q (B, H, Sq, D)``,
    ``k, v (B, H, Skv, D)`` in the plan's chunk order. Rows that attend nothing give zeros
    and ``lse = -inf``. See :func:`gen.kernels.block_sparse_attention.chunk_sparse_attention`."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a tensor (B, H, S, D), got {getattr(q, 'shape', type(q))}.")
    choice = choose("chunk_sparse", describe(q, q.shape[2], k.shape[2], return_lse=return_lse), _backend(backend))
    return choice.backend.run(q, k, v, plan, scale=scale, return_lse=return_lse)
