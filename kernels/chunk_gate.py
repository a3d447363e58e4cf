"""Chunk gating in Triton (VMoBA): chunk key means, and a per-query-token chunk selection.

VMoBA lets each query token choose which chunks of keys it attends: the gate of query
``s`` for chunk ``c`` is ``q_s · mean(K_c)`` (fp32, no softmax scale). Two kernels, each
with exactly the contract of its PyTorch twin in ``gen.attention.chunk_reference`` (the
oracle in tests and the CPU path):

* :func:`chunk_means` (``_chunk_mean_kernel``): the mean of each chunk's keys, chunks of
  any length given by a bounds table (chunks of a 2-D/3-D partition are ragged at the
  grid's edges). One program per (chunk, head-dim chunk, batch x head), the chunk read in
  ``ROWS``-row tiles.
* :func:`chunk_gate` (``_chunk_gate_kernel``): per query token, the gates against every
  chunk (an outer-product loop over the head dim: a row of means is contiguous in the
  ``(B, H, D, n_chunks)`` layout :func:`chunk_means` writes), the selection (``topk`` or
  the cumulative ``threshold`` rule on min-max normalised gates, the own chunk always),
  and three outputs: the selection as a bitmask per row, the union of the selections of
  each ``query_block`` rows (the plan's visits), and the keys each row attends. One
  program per ``ROWS`` query tokens of one (batch, head); a row's gates are held in
  registers and its cut-off found by a 32-step bisection over their bit patterns (no
  sort), so the chunk count is bounded by :data:`MAX_CHUNKS`.

Both launches are torch custom ops (``gen::chunk_means``, ``gen::chunk_gate``) with fake
implementations, so they run inside ``torch.compile(fullgraph=True)`` as opaque calls;
neither reads a device value on the host.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import interpreting, triton_available_for

__all__ = [
    "MAX_CHUNKS",
    "GateSpec",
    "MeanSpec",
    "chunk_gate",
    "chunk_means",
    "gate_launch_spec",
    "gate_rows",
    "gate_shared_memory",
    "mean_launch_spec",
    "mean_shared_memory",
]

#: Most chunks one gate program holds in registers (a power of two). Wan 2.1 1.3B 480p with
#: 4x4x13 chunks has 192, Wan 14B 720p with 4x9x20 120; checked by the compile test.
MAX_CHUNKS = 1024
# Rows of x one mean program sums at once, and head-dim columns per program.
_MEAN_ROWS = 64
_D_CHUNK = 64
# Gate-tile elements (rows x padded chunks) one gate program holds per live tensor.
_GATE_TILE = 2048

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _jitted(kernel):
    # jitted on first use: the plain functions stay readable for the ahead-of-time check
    return triton.jit(kernel)


# ----------------------------------------------------------------------------- chunk means


def _chunk_mean_kernel(
    X, Bounds, Mean,  #
    stride_xb, stride_xh, stride_xs, stride_xd,  #
    stride_mb, stride_mh, stride_md, stride_mc,  #
    H,  #
    HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, D_CHUNK: tl.constexpr,  #
):
    # grid: (chunks x head-dim chunks, batch x heads)
    N_DCH: tl.constexpr = (HEAD_DIM + D_CHUNK - 1) // D_CHUNK
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    c = pid // N_DCH
    dch = pid % N_DCH
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start = tl.load(Bounds + c)
    end = tl.load(Bounds + c + 1)
    offs_d = dch * D_CHUNK + tl.arange(0, D_CHUNK)
    d_ok = offs_d < HEAD_DIM
    offs_r = tl.arange(0, ROWS)
    x_base = X + b * stride_xb + h * stride_xh
    acc = tl.zeros([D_CHUNK], dtype=tl.float32)
    for r0 in range(start, end, ROWS):
        rows = r0 + offs_r
        r_ok = rows < end
        ptrs = x_base + rows.to(tl.int64)[:, None] * stride_xs + offs_d[None, :] * stride_xd
        acc += tl.sum(tl.load(ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32), 0)
    mean = acc / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(Mean + b * stride_mb + h * stride_mh + offs_d * stride_md + c * stride_mc, mean, mask=d_ok)


def mean_shared_memory(head_dim: int, num_warps: int = 4) -> int:
    """Upper estimate, in bytes, of the shared memory one means program uses: the
    cross-warp scratch of its column sums, one fp32 ``D_CHUNK`` row per warp, doubled for
    margin (checked against ptxas by the compile test)."""
    return 2 * num_warps * min(_D_CHUNK, triton.next_power_of_2(head_dim)) * 4


class MeanSpec(NamedTuple):
    """Everything one means launch takes, built by :func:`mean_launch_spec`."""

    args: tuple
    meta: dict
    grid: tuple[int, int]
    num_warps: int
    mean: torch.Tensor  # (B, H, n_chunks, D) fp32, a view of (B, H, D, n_chunks) storage


def mean_launch_spec(x: torch.Tensor, bounds: torch.Tensor) -> MeanSpec:
    """Kernel arguments, grid and output for one :func:`chunk_means` call (also used by
    the ahead-of-time compile check on ``meta`` tensors)."""
    bsz, heads, _, head_dim = x.shape
    n_chunks = bounds.numel() - 1
    store = torch.empty((bsz, heads, head_dim, n_chunks), dtype=torch.float32, device=x.device)
    dch = min(_D_CHUNK, triton.next_power_of_2(head_dim))
    args = (x, bounds, store, *x.stride(), *store.stride(), heads)
    meta = dict(HEAD_DIM=head_dim, ROWS=_MEAN_ROWS, D_CHUNK=dch)
    grid = (n_chunks * triton.cdiv(head_dim, dch), bsz * heads)
    return MeanSpec(args, meta, grid, 4, store.transpose(2, 3))


@torch.library.custom_op("gen::chunk_means", mutates_args=())
def _chunk_means_op(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    spec = mean_launch_spec(x, bounds)
    if spec.grid[0] and spec.grid[1]:
        kernel = _jitted(_chunk_mean_kernel)
        if interpreting():
            kernel[spec.grid](*spec.args, **spec.meta, num_warps=spec.num_warps)
        else:
            with torch.cuda.device(x.device):
                kernel[spec.grid](*spec.args, **spec.meta, num_warps=spec.num_warps)
    return spec.mean.transpose(2, 3)  # a custom op returns its storage's own layout


@_chunk_means_op.register_fake
def _(x, bounds):
    bsz, heads, _, head_dim = x.shape
    return x.new_empty((bsz, heads, head_dim, bounds.shape[0] - 1), dtype=torch.float32)


def _check_bounds(bounds, seq: int, device: torch.device) -> int:
    if not isinstance(bounds, torch.Tensor) or bounds.dtype != torch.int32 or bounds.dim() != 1 or bounds.numel() < 2:
        got = f"{bounds.dtype} {tuple(bounds.shape)}" if isinstance(bounds, torch.Tensor) else type(bounds).__name__
        raise ValueError(f"bounds must be an int32 tensor (n_chunks + 1,) with n_chunks >= 1, got {got}.")
    if bounds.device != device:
        raise ValueError(f"bounds lives on {bounds.device} but the inputs on {device}; move it.")
    # values are checked where reading them is free (a CPU tensor); on a GPU that would be
    # a device sync per call, and gen's callers build the bounds on the host, checked
    if bounds.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(bounds[0]) != 0 or int(bounds[-1]) != seq or bool((bounds[1:] <= bounds[:-1]).any()):
            raise ValueError(f"bounds must rise strictly from 0 to the sequence length {seq}.")
    return bounds.numel() - 1


def _check_x(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 4-dim tensor (batch, heads, seq_len, head_dim), got {shape}; "
                         "diffusers processors hold (batch, seq_len, heads, head_dim): pass .transpose(1, 2).")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; the chunk kernels take float16, bfloat16 or float32.")
    if x.shape[3] == 0 or x.shape[2] >= 2**31 or x.shape[0] * x.shape[1] >= 65536:
        raise ValueError(f"{name} {tuple(x.shape)} is empty or past the kernels' limits "
                         "(seq_len < 2**31, batch x heads < 65536).")


def chunk_means(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Mean of each chunk's tokens (Triton).

    Same contract as ``gen.attention.chunk_reference.chunk_means``.

    Args:
        x: ``(B, H, S, D)`` keys, fp16/bf16/fp32, any strides; CUDA, or CPU under
            ``TRITON_INTERPRET=1``.
        bounds: int32 ``(n_chunks + 1,)`` on ``x``'s device, rising strictly from 0 to
            ``S``: chunk ``c`` is tokens ``bounds[c] .. bounds[c + 1]``.

    Returns:
        fp32 ``(B, H, n_chunks, D)``: the chunk means (a transposed view of a contiguous
        ``(B, H, D, n_chunks)`` tensor, the layout :func:`chunk_gate` reads fastest).

    Raises:
        ValueError: bad shapes, dtypes or devices, bounds that do not cover ``S``, or a
            device Triton cannot run on.
    """
    _check_x("x", x)
    _check_bounds(bounds, x.shape[2], x.device)
    if not torch.compiler.is_compiling():
        ok, why = triton_available_for(x.device)
        if not ok:
            raise ValueError(why)
    return _chunk_means_op(x, bounds).transpose(2, 3)


# ------------------------------------------------------------------------------ chunk gate


def _chunk_gate_kernel(
    Q, Means, Bounds, Bits, Union, Keys,  #
    stride_qb, stride_qh, stride_qs, stride_qd,  #
    stride_mb, stride_mh, stride_md, stride_mc,  #
    H, SEQ, NC, N_WORDS, N_QB, tau, k_other,  #
    HEAD_DIM: tl.constexpr, NC_P2: tl.constexpr, ROWS: tl.constexpr, QBLOCK: tl.constexpr,  #
    TOPK: tl.constexpr,  #
):
    # grid: (query tiles of ROWS tokens, batch x heads); a tile lies inside one plan row
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    r_ok = rows < SEQ
    offs_c = tl.arange(0, NC_P2)
    c_ok = offs_c < NC
    starts = tl.load(Bounds + offs_c, mask=c_ok, other=0)
    ends = tl.load(Bounds + offs_c + 1, mask=c_ok, other=0)
    size = ends - starts
    # own chunk: the one whose [start, end) holds the row
    own = tl.sum(((starts[None, :] <= rows[:, None]) & c_ok[None, :]).to(tl.int32), 1) - 1
    own_m = offs_c[None, :] == own[:, None]
    other = c_ok[None, :] & ~own_m

    # gates q_s . mean(K_c) in fp32: outer products over the head dim (a means row is
    # contiguous over chunks)
    g = tl.zeros([ROWS, NC_P2], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh + rows.to(tl.int64) * stride_qs
    m_base = Means + b * stride_mb + h * stride_mh + offs_c * stride_mc
    for d in range(HEAD_DIM):
        qd = tl.load(q_base + d * stride_qd, mask=r_ok, other=0.0).to(tl.float32)
        md = tl.load(m_base + d * stride_md, mask=c_ok, other=0.0)
        g += qd[:, None] * md[None, :]

    n_other = NC - 1
    # The cut-off among the other chunks is found by bisection over the values' fp32 bit
    # patterns (ints ordered like the floats), 32 steps, instead of a sort: the chunks
    # taken are exactly those at or above it (ties included), as in the reference's sorted
    # rule. Padding columns and the own chunk are not "other".
    if TOPK:
        val = g
        raw = g.to(tl.int32, bitcast=True)
        key = raw ^ ((raw >> 31) & 0x7FFFFFFF)  # order-preserving for signed floats
        kcnt = tl.minimum(k_other, n_other)
        # largest t with #{others >= t} >= kcnt: the kcnt-th largest value
        lo = tl.min(tl.where(other, key, 2147483647), 1)
        hi = tl.max(tl.where(other, key, -2147483647), 1)
        for _ in range(32):
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor average, no overflow
            enough = tl.sum((other & (key >= mid[:, None])).to(tl.int32), 1) >= kcnt
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        lo = tl.where(tl.sum((other & (key >= hi[:, None])).to(tl.int32), 1) >= kcnt, hi, lo)
        cut = tl.where(kcnt > 0, lo, 2147483647)
        taken = other & (key >= cut[:, None]) & (kcnt > 0)
    else:
        # min-max normalised over the row's chunks (all equal: every chunk 1)
        gmax = tl.max(tl.where(c_ok[None, :], g, float("-inf")), 1)
        gmin = tl.min(tl.where(c_ok[None, :], g, float("inf")), 1)
        rng = gmax - gmin
        safe = tl.where(rng > 0, rng, 1.0)
        val = tl.where(rng[:, None] > 0, (g - gmin[:, None]) / safe[:, None], 1.0)
        val = tl.where(c_ok[None, :], val, 0.0)
        total = tl.sum(val, 1)
        own_share = tl.sum(tl.where(own_m, val, 0.0), 1)
        room = tau * total - own_share
        key = val.to(tl.int32, bitcast=True)  # values >= 0: bit patterns ordered like them
        # chunk j is taken when the others strictly above it hold less than `room`: the
        # least such t over the values (monotone), found between -2 and the largest value
        # (which always qualifies when room > 0; when room <= 0 only the top is taken)
        lo = tl.zeros([ROWS], dtype=tl.int32) - 2
        hi = tl.max(tl.where(other, key, -1), 1)
        for _ in range(32):
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
            above = tl.sum(tl.where(other & (key > mid[:, None]), val, 0.0), 1)
            fits = above < room
            hi = tl.where(fits, mid, hi)
            lo = tl.where(fits, lo, mid)
        taken = other & (key >= hi[:, None])
    chosen = (taken | (own_m & c_ok[None, :])) & r_ok[:, None]
    ch = chosen.to(tl.int32)

    # the selection as 32-bit words per row, (B, H, words, S): bits are disjoint, so their
    # sum is their OR (bit 31 wraps to the sign bit, as intended)
    shift = ch << (offs_c % 32)[None, :]
    bits_base = Bits + pid_bh.to(tl.int64) * N_WORDS * SEQ + rows
    for w in tl.static_range((NC_P2 + 31) // 32):
        in_w = (offs_c >= w * 32) & (offs_c < w * 32 + 32)
        word = tl.sum(tl.where(in_w[None, :], shift, 0), 1)
        tl.store(bits_base + w * SEQ, word, mask=r_ok & ((tl.zeros_like(rows) + w) < N_WORDS))
    # union over the plan row's tokens: every program of the row stores 1 for what it chose
    qb = (pid * ROWS) // QBLOCK
    hit = tl.max(ch, 0) > 0
    tl.store(Union + (pid_bh.to(tl.int64) * N_QB + qb) * NC + offs_c, tl.full([NC_P2], 1, tl.uint8),
             mask=hit & c_ok)
    keys = tl.sum(ch * size[None, :], 1)
    tl.store(Keys + pid_bh.to(tl.int64) * SEQ + rows, keys, mask=r_ok)


def gate_rows(n_chunks: int, query_block: int) -> int:
    """Query tokens per gate program: as many as keep ``rows x next_pow2(n_chunks)`` at
    :data:`_GATE_TILE` elements (at least 2, at most 64 and ``query_block``)."""
    nc_p2 = triton.next_power_of_2(max(n_chunks, 2))
    return max(2, min(64, query_block, _GATE_TILE // nc_p2))


def gate_shared_memory(rows: int, nc_p2: int, num_warps: int = 4) -> int:
    """Upper estimate, in bytes, of the shared memory one gate program uses: the layout
    exchanges of its row reductions and the union's column reduction, at most two fp32
    ``rows x nc_p2`` tiles (checked against ptxas by the compile test)."""
    return 2 * rows * nc_p2 * 4


class GateSpec(NamedTuple):
    """Everything one gate launch takes, built by :func:`gate_launch_spec`."""

    args: tuple
    meta: dict
    grid: tuple[int, int]
    num_warps: int
    bits: torch.Tensor  # (B, H, words, S) int32
    union: torch.Tensor  # (B, H, n_q_blocks, n_chunks) uint8, zero-filled
    keys: torch.Tensor  # (B, H, S) int32


def gate_launch_spec(q: torch.Tensor, means: torch.Tensor, bounds: torch.Tensor, *, topk: bool, tau: float,
                     k_other: int, query_block: int) -> GateSpec:
    """Kernel arguments, grid and outputs for one :func:`chunk_gate` call (also used by the
    ahead-of-time compile check on ``meta`` tensors)."""
    bsz, heads, seq, head_dim = q.shape
    nc = bounds.numel() - 1
    words = -(-nc // 32)
    nqb = -(-seq // query_block)
    dev = q.device
    bits = torch.empty((bsz, heads, words, seq), dtype=torch.int32, device=dev)
    union = torch.zeros((bsz, heads, nqb, nc), dtype=torch.uint8, device=dev)
    keys = torch.empty((bsz, heads, seq), dtype=torch.int32, device=dev)
    rows = gate_rows(nc, query_block)
    nc_p2 = triton.next_power_of_2(max(nc, 2))
    args = (q, means, bounds, bits, union, keys, *q.stride(), means.stride(0), means.stride(1), means.stride(3),
            means.stride(2), heads, seq, nc, words, nqb, float(tau), int(k_other))
    meta = dict(HEAD_DIM=head_dim, NC_P2=nc_p2, ROWS=rows, QBLOCK=query_block, TOPK=bool(topk))
    warps = 4
    return GateSpec(args, meta, (triton.cdiv(seq, rows), bsz * heads), warps, bits, union, keys)


@torch.library.custom_op("gen::chunk_gate", mutates_args=())
def _chunk_gate_op(q: torch.Tensor, means: torch.Tensor, bounds: torch.Tensor, topk: bool, tau: float,
                   k_other: int, query_block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = gate_launch_spec(q, means, bounds, topk=topk, tau=tau, k_other=k_other, query_block=query_block)
    if spec.grid[0] and spec.grid[1]:
        kernel = _jitted(_chunk_gate_kernel)
        if interpreting():
            kernel[spec.grid](*spec.args, **spec.meta, num_warps=spec.num_warps)
        else:
            with torch.cuda.device(q.device):
                kernel[spec.grid](*spec.args, **spec.meta, num_warps=spec.num_warps)
    return spec.bits, spec.union, spec.keys


@_chunk_gate_op.register_fake
def _(q, means, bounds, topk, tau, k_other, query_block):
    bsz, heads, seq, _ = q.shape
    nc = bounds.shape[0] - 1
    return (q.new_empty((bsz, heads, -(-nc // 32), seq), dtype=torch.int32),
            q.new_empty((bsz, heads, -(-seq // query_block), nc), dtype=torch.uint8),
            q.new_empty((bsz, heads, seq), dtype=torch.int32))


def chunk_gate(q: torch.Tensor, means: torch.Tensor, bounds: torch.Tensor, *, select: str = "threshold",
               tau: float = 0.25, topk: int = 3, query_block: int = 64
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query-token chunk selection (Triton), ``query_head`` scope.

    Same contract as ``gen.attention.chunk_reference.chunk_gate``: gates
    ``g[s, c] = q_s · means_c`` in fp32; the own chunk (the one holding token ``s``) is
    always selected; ``select="topk"`` adds the ``topk − 1`` other chunks with the largest
    gates; ``select="threshold"`` min-max normalises the row's gates (``n_c``), counts the
    own chunk's share first and adds other chunks in descending order while the share
    before them is below ``tau`` (so the one that reaches ``tau`` is included), at least
    one when there are two chunks or more; ``tau >= 1`` selects every chunk. Other chunks
    equal to the last one taken are taken too.

    Args:
        q: ``(B, H, S, D)`` queries in chunk order, fp16/bf16/fp32, any strides.
        means: fp32 ``(B, H, n_chunks, D)`` (from :func:`chunk_means`; any strides, the
            transposed view it returns reads fastest).
        bounds: int32 ``(n_chunks + 1,)``, rising from 0 to ``S``.
        select: ``"threshold"`` or ``"topk"``.
        tau: the threshold (> 0).
        topk: chunks attended per query including its own (>= 1).
        query_block: plan rows (tokens, a power of two in [16, 256]) the union is taken over.

    Returns:
        ``bits`` int32 ``(B, H, ceil(n_chunks / 32), S)``: bit ``c % 32`` of word ``c //
        32`` set when query ``s`` attends chunk ``c``; ``union`` uint8 ``(B, H,
        ceil(S / query_block), n_chunks)``: 1 where some query of the plan row attends the
        chunk; ``keys`` int32 ``(B, H, S)``: keys each query attends.

    Raises:
        ValueError: bad shapes, dtypes, devices or parameters, more than
            :data:`MAX_CHUNKS` chunks, or a device Triton cannot run on.
    """
    _check_x("q", q)
    bsz, heads, seq, head_dim = q.shape
    nc = _check_bounds(bounds, seq, q.device)
    if not isinstance(means, torch.Tensor) or means.dtype != torch.float32 or tuple(means.shape) != (bsz, heads, nc, head_dim):
        got = f"{means.dtype} {tuple(means.shape)}" if isinstance(means, torch.Tensor) else type(means).__name__
        raise ValueError(f"means must be fp32 ({bsz}, {heads}, {nc}, {head_dim}), got {got}.")
    if means.device != q.device:
        raise ValueError(f"means lives on {means.device} but q on {q.device}; move it.")
    if select not in ("threshold", "topk"):
        raise ValueError(f"select must be 'threshold' or 'topk', got {select!r}.")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0 or math.isnan(tau):
        raise ValueError(f"tau must be a number > 0 (>= 1 selects every chunk), got {tau!r}.")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1 (chunks per query, its own included), got {topk!r}.")
    qb = query_block
    if isinstance(qb, bool) or not isinstance(qb, int) or qb < 16 or qb > 256 or qb & (qb - 1):
        raise ValueError(f"query_block must be a power of two in [16, 256], got {qb!r}.")
    if nc > MAX_CHUNKS:
        raise ValueError(f"{nc} chunks is more than the gate kernel holds in registers ({MAX_CHUNKS}); use "
                         "larger chunks or the PyTorch backend.")
    if not torch.compiler.is_compiling():
        ok, why = triton_available_for(q.device)
        if not ok:
            raise ValueError(why)
    tau_eff = math.inf if tau >= 1 else float(tau)
    return _chunk_gate_op(q, means, bounds, select == "topk", tau_eff, topk - 1, qb)
