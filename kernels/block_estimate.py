"""Block estimation in Triton: block statistics and cumulative-mass block selection.

Dynamic methods (Rectified SpaAttn first) build each call's plan from block means of
``q`` and ``k``. Two kernels, each with exactly the contract of its pure-PyTorch twin in
``gen.attention.estimate_reference`` (the oracle in tests and the CPU path):

* :func:`block_stats` (``_block_stats_kernel``): per block of ``block`` consecutive
  tokens of ``x (B, H, S, D)``, the mean of the valid tokens and the mean absolute
  deviation from that mean. One program per (block, head-dim chunk, batch x head); the
  block's rows are held in registers between the two passes when the block has at most
  ``MAX_TILE_ROWS`` rows, and re-read (from L1/L2) in chunks otherwise.
* :func:`select_blocks` (``_block_select_kernel``): per query block, the softmax of its
  pooled logits against every key block (and an optional text column), the top-p
  selection with a floor of ``top_k`` blocks, the union with forced blocks, the
  rectification terms ``r`` and ``weights``, and the selection written as a plan index
  (ascending, padded by repeating the last entry). One program per (query block,
  batch x head); the row is sorted in registers (``tl.sort``, a bitonic network), so the
  number of key blocks is bounded by :data:`MAX_KEY_BLOCKS`.

Both launches are torch custom ops (``gen::block_stats``, ``gen::select_blocks``) with
fake implementations, so they run inside ``torch.compile(fullgraph=True)`` as one opaque
call; neither reads a device value on the host (no ``.item()``, no sync).
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
    "MAX_KEY_BLOCKS",
    "MAX_TILE_ROWS",
    "SelectSpec",
    "StatsSpec",
    "block_stats",
    "select_blocks",
    "select_launch_spec",
    "select_shared_memory",
    "stats_launch_spec",
    "stats_shared_memory",
]

# Rows of x one stats program holds in registers at once (a power of two). A longer block
# is read in chunks of this many rows, twice when the deviation is asked for.
MAX_TILE_ROWS = 128
# Head-dim columns per stats program: 128 rows x 64 fp32 columns is 64 registers a thread
# with 4 warps, and D = 128/256 become 2/4 programs per block instead of one that spills.
D_CHUNK = 64
# Longest key-block row select_blocks sorts in registers (a power of two): HunyuanVideo
# 720p has 930 key blocks of 128 tokens, Wan 2.1 14B 720p 591. Checked by the compile test.
MAX_KEY_BLOCKS = 2048

_STATS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _jitted(kernel):
    # jitted on first use, as the other kernel files do: the kernel functions stay plain
    # so the ahead-of-time check reads their signatures and compiles them itself
    return triton.jit(kernel)


# --------------------------------------------------------------------------- block stats


def _block_stats_kernel(
    X, Valid, Mean, AbsDev, Count,  #
    stride_xb, stride_xh, stride_xs, stride_xd,  #
    H, SEQ, N_BLOCKS,  #
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, D_CHUNK: tl.constexpr,  #
    HAS_VALID: tl.constexpr, DEVIATION: tl.constexpr,  #
):
    # grid: (blocks x head-dim chunks, batch x heads); a block's chunks are neighbours so
    # they read the same rows of x close together in time.
    N_DCH: tl.constexpr = (HEAD_DIM + D_CHUNK - 1) // D_CHUNK
    N_CHUNKS: tl.constexpr = (BLOCK + ROWS - 1) // ROWS
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    blk = pid // N_DCH
    dch = pid % N_DCH
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_d = dch * D_CHUNK + tl.arange(0, D_CHUNK)
    d_ok = offs_d < HEAD_DIM
    offs_r = tl.arange(0, ROWS)
    row0 = blk * BLOCK  # first token of the block (int32: SEQ < 2**31)
    # 64-bit base: batch x heads x tokens x head dim may pass 2**31 elements
    x_base = X + b * stride_xb + h * stride_xh + row0.to(tl.int64) * stride_xs

    if N_CHUNKS == 1:
        # the whole block in registers: one read of x for both passes
        r_ok = (offs_r < BLOCK) & (row0 + offs_r < SEQ)
        if HAS_VALID:
            r_ok = r_ok & (tl.load(Valid + row0 + offs_r, mask=r_ok, other=0) != 0)
        ptrs = x_base + offs_r.to(tl.int64)[:, None] * stride_xs + offs_d[None, :] * stride_xd
        x = tl.load(ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        cnt = tl.sum(r_ok.to(tl.float32), 0)
        denom = tl.maximum(cnt, 1.0)  # a block with no valid token gets mean 0, absdev 0
        mean = tl.sum(x, 0) / denom
        if DEVIATION:
            dev = tl.where(r_ok[:, None], tl.abs(x - mean[None, :]), 0.0)
            absdev = tl.sum(dev, 0) / denom
    else:
        acc = tl.zeros([D_CHUNK], dtype=tl.float32)
        cnt = tl.sum(tl.zeros([ROWS], dtype=tl.float32), 0)
        for c in range(N_CHUNKS):
            rows = c * ROWS + offs_r
            r_ok = (rows < BLOCK) & (row0 + rows < SEQ)
            if HAS_VALID:
                r_ok = r_ok & (tl.load(Valid + row0 + rows, mask=r_ok, other=0) != 0)
            ptrs = x_base + rows.to(tl.int64)[:, None] * stride_xs + offs_d[None, :] * stride_xd
            x = tl.load(ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x, 0)
            cnt += tl.sum(r_ok.to(tl.float32), 0)
        denom = tl.maximum(cnt, 1.0)
        mean = acc / denom
        if DEVIATION:
            # second pass re-reads the block (it was just read: mostly cache hits)
            dacc = tl.zeros([D_CHUNK], dtype=tl.float32)
            for c in range(N_CHUNKS):
                rows = c * ROWS + offs_r
                r_ok = (rows < BLOCK) & (row0 + rows < SEQ)
                if HAS_VALID:
                    r_ok = r_ok & (tl.load(Valid + row0 + rows, mask=r_ok, other=0) != 0)
                ptrs = x_base + rows.to(tl.int64)[:, None] * stride_xs + offs_d[None, :] * stride_xd
                x = tl.load(ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                dacc += tl.sum(tl.where(r_ok[:, None], tl.abs(x - mean[None, :]), 0.0), 0)
            absdev = dacc / denom

    out_off = (pid_bh.to(tl.int64) * N_BLOCKS + blk) * HEAD_DIM + offs_d
    tl.store(Mean + out_off, mean, mask=d_ok)
    if DEVIATION:
        tl.store(AbsDev + out_off, absdev, mask=d_ok)
    if (pid_bh == 0) & (dch == 0):
        # the count depends on the block only: one program per block writes it
        tl.store(Count + blk, cnt)


def stats_shared_memory(block: int, head_dim: int, num_warps: int = 4) -> int:
    """Upper estimate, in bytes, of the shared memory one stats program uses: the
    cross-warp scratch of the column sums, one fp32 ``D_CHUNK`` row per warp, doubled for
    margin (ptxas: 0.5 KiB bf16, 1 KiB fp32 at 4 warps; checked by the compile test)."""
    _, dch = _stats_tile(block, head_dim)
    return 2 * num_warps * dch * 4


def _stats_tile(block: int, head_dim: int) -> tuple[int, int]:
    rows = min(triton.next_power_of_2(block), MAX_TILE_ROWS)
    return rows, min(D_CHUNK, triton.next_power_of_2(head_dim))


class StatsSpec(NamedTuple):
    """Everything one stats launch takes, built by :func:`stats_launch_spec`."""

    args: tuple
    meta: dict
    grid: tuple[int, int]
    num_warps: int
    mean: torch.Tensor  # (B, H, nb, D) fp32
    absdev: torch.Tensor  # (B, H, nb, D) fp32, or (0,) when not asked
    count: torch.Tensor  # (nb,) fp32


def stats_launch_spec(x: torch.Tensor, block: int, valid: torch.Tensor | None, deviation: bool) -> StatsSpec:
    """Kernel arguments, grid and outputs (allocated on ``x``'s device) for one
    :func:`block_stats` call. Also used by the ahead-of-time compile check on ``meta``
    tensors (``gen.kernels.aot``), so what it compiles is what a call specialises."""
    bsz, heads, seq, head_dim = x.shape
    nb = -(-seq // block)
    dev = x.device
    mean = torch.empty((bsz, heads, nb, head_dim), dtype=torch.float32, device=dev)
    absdev = torch.empty_like(mean) if deviation else mean.new_empty((0,))
    count = torch.empty((nb,), dtype=torch.float32, device=dev)
    if valid is not None:
        valid = valid.view(torch.uint8)  # same bytes; Triton reads u8
    rows, dch = _stats_tile(block, head_dim)
    args = (
        x, valid if valid is not None else count, mean, absdev if deviation else mean, count,
        *x.stride(), heads, seq, nb,
    )
    meta = dict(HEAD_DIM=head_dim, BLOCK=block, ROWS=rows, D_CHUNK=dch,
                HAS_VALID=valid is not None, DEVIATION=deviation)
    grid = (nb * triton.cdiv(head_dim, dch), bsz * heads)
    return StatsSpec(args, meta, grid, 4, mean, absdev, count)


@torch.library.custom_op("gen::block_stats", mutates_args=())
def _block_stats_op(x: torch.Tensor, block: int, valid: torch.Tensor | None,
                    deviation: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = stats_launch_spec(x, block, valid, deviation)
    if spec.grid[0] and spec.grid[1]:
        kernel = _jitted(_block_stats_kernel)
        if interpreting():
            kernel[spec.grid](*spec.args, **spec.meta, num_warps=spec.num_warps)
        else:
            with torch.cuda.device(x.device):
                kernel[spec.grid](*spec.args, **spec.meta, num_warps=spec.num_warps)
    elif spec.count.numel():
        # no batch x heads: nothing to launch, but the counts are still defined
        seq = x.shape[2]
        w = valid.to(torch.float32) if valid is not None else x.new_ones(seq, dtype=torch.float32)
        w = torch.nn.functional.pad(w, (0, spec.count.numel() * block - seq))
        spec.count.copy_(w.view(-1, block).sum(-1))
    return spec.mean, spec.absdev, spec.count


@_block_stats_op.register_fake
def _(x, block, valid, deviation):
    bsz, heads, seq, head_dim = x.shape
    nb = -(-seq // block)
    mean = x.new_empty((bsz, heads, nb, head_dim), dtype=torch.float32)
    absdev = torch.empty_like(mean) if deviation else x.new_empty((0,), dtype=torch.float32)
    return mean, absdev, x.new_empty((nb,), dtype=torch.float32)


def block_stats(x: torch.Tensor, block: int, valid: torch.Tensor | None = None,
                deviation: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Block means (and mean absolute deviations) of ``x`` over valid tokens (Triton).

    Same contract as ``gen.attention.estimate_reference.block_stats``.

    Args:
        x: ``(B, H, S, D)``, fp16/bf16/fp32, any strides (a ``(B, S, H, D)`` tensor seen
            through ``.transpose(1, 2)`` is read in place); CUDA, or CPU under
            ``TRITON_INTERPRET=1``.
        block: tokens per block (> 0); ``nb = ceil(S / block)``, the last block may be short.
        valid: optional bool ``(S,)`` on ``x``'s device; tokens flagged False (padding
            slots) are left out of the mean, the deviation and the count.
        deviation: also return the mean absolute deviation.

    Returns:
        ``mean`` fp32 ``(B, H, nb, D)``: mean of the block's valid tokens (0 for a block
        with none); ``absdev`` fp32 ``(B, H, nb, D)`` or None: mean over the block's valid
        tokens of ``|x - mean|`` (0 for a block with none); ``count`` fp32 ``(nb,)``:
        valid tokens per block. All contiguous.

    Raises:
        ValueError: ``x`` not a 4-dim fp16/bf16/fp32 tensor, ``block`` not a positive int,
            ``valid`` not bool ``(S,)`` on ``x``'s device, sizes past the kernel's limits,
            or a device Triton cannot run on.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"x must be a 4-dim tensor (batch, heads, seq_len, head_dim), got {shape}; "
            "diffusers processors hold (batch, seq_len, heads, head_dim): pass .transpose(1, 2)."
        )
    if x.dtype not in _STATS_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; block_stats takes float16, bfloat16 or float32.")
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int (tokens per block), got {block!r}.")
    bsz, heads, seq, head_dim = x.shape
    if head_dim == 0:
        raise ValueError(f"x has head_dim 0 (shape {tuple(x.shape)}).")
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != (seq,):
            got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise ValueError(f"valid must be a bool tensor of shape ({seq},) (one flag per token), got {got}.")
        if valid.device != x.device:
            raise ValueError(f"valid lives on {valid.device} but x on {x.device}; move it to x's device.")
        valid = valid.contiguous()
    if seq >= 2**31 or bsz * heads >= 65536:
        raise ValueError(
            f"x {tuple(x.shape)} is past the kernel's limits (seq_len < 2**31, batch x heads < 65536)."
        )
    if not torch.compiler.is_compiling():
        ok, why = triton_available_for(x.device)
        if not ok:
            raise ValueError(why)
    mean, absdev, count = _block_stats_op(x, block, valid, bool(deviation))
    return mean, (absdev if deviation else None), count


# ------------------------------------------------------------------------ block select


def _block_select_kernel(
    Logits, Text, Rect, Forced, KvIdx, KvCnt, R, W,  #
    stride_lb, stride_lh, stride_lq, stride_lk,  #
    stride_tb, stride_th, stride_tq,  #
    stride_rb, stride_rh, stride_rq, stride_rk,  #
    stride_fq, stride_fk,  #
    H, NQ, NK, p, k_floor,  #
    NK_P2: tl.constexpr, HAS_TEXT: tl.constexpr,  #
):
    # grid: (query blocks, batch x heads); one program holds one row of NK key blocks.
    qb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs = tl.arange(0, NK_P2)
    ok = offs < NK

    logit = tl.load(Logits + b * stride_lb + h * stride_lh + qb * stride_lq + offs * stride_lk,
                    mask=ok, other=float("-inf"))
    if HAS_TEXT:
        t_logit = tl.load(Text + b * stride_tb + h * stride_th + qb * stride_tq)
    else:
        t_logit = float("-inf")
    top = tl.maximum(tl.max(logit, 0), t_logit)
    top = tl.where(top == float("-inf"), 0.0, top)  # a row with no key: every P is 0
    e = tl.exp(logit - top)
    e_text = tl.exp(t_logit - top)
    total = tl.maximum(tl.sum(e, 0) + e_text, 1.1754943508222875e-38)  # finfo(fp32).tiny
    prob = e / total  # padding columns: exp(-inf) = 0
    p_text = e_text / total

    # mass before each block in descending order; padding sorts last (P = 0) and is not
    # counted, so ranks < NK are exactly the reference's sorted row
    ordered = tl.sort(prob, descending=True)
    before = p_text + tl.cumsum(ordered, 0) - ordered
    kept = tl.sum(((before <= p) & ok).to(tl.int32), 0)  # p = inf when p >= 1: all NK
    count = tl.maximum(kept, k_floor)
    # the count-th largest P; +inf when count is 0, so nothing is chosen (P <= 1)
    thresh = tl.max(tl.where(offs == count - 1, ordered, float("-inf")), 0)
    thresh = tl.where(count > 0, thresh, float("inf"))
    chosen = (prob >= thresh) & ok

    forced = tl.load(Forced + qb * stride_fq + offs * stride_fk, mask=ok, other=0) != 0
    rect = tl.load(Rect + b * stride_rb + h * stride_rh + qb * stride_rq + offs * stride_rk,
                   mask=ok, other=0) != 0
    selected = (chosen | forced) & ok
    in_e = selected | ~rect  # padding: rect reads 0, so in E, but its P is 0 anyway
    r = p_text + tl.sum(tl.where(in_e, prob, 0.0), 0)

    row = pid_bh.to(tl.int64) * NQ + qb
    tl.store(W + row * NK + offs, tl.where(in_e, 0.0, prob), mask=ok)
    tl.store(R + row, r)
    sel = selected.to(tl.int32)
    n_sel = tl.sum(sel, 0)
    tl.store(KvCnt + row, n_sel)
    # selected indices ascending at the front (slot = how many selected come before),
    # then the rest of the row repeats the last selected index (0 for an empty row); the
    # two stores write disjoint slots
    idx_base = KvIdx + row * NK
    slot = tl.cumsum(sel, 0) - sel
    tl.store(idx_base + slot, offs, mask=selected)
    last = tl.maximum(tl.max(tl.where(selected, offs, -1), 0), 0)
    tl.store(idx_base + offs, tl.zeros_like(offs) + last, mask=ok & (offs >= n_sel))


def select_shared_memory(n_key_blocks: int) -> int:
    """Upper estimate, in bytes, of the shared memory one select program uses: the sort's
    and the scans' layout exchanges, at most four fp32 rows of ``NK_P2`` (ptxas: 2 KiB at
    1024 key blocks, 16 KiB at 2048; checked by the compile test)."""
    return 4 * triton.next_power_of_2(n_key_blocks) * 4


def _select_warps(nk_p2: int) -> int:
    # one row per program: about 8 elements a thread keeps the sort network in registers
    return max(1, min(8, nk_p2 // 256))


class SelectSpec(NamedTuple):
    """Everything one select launch takes, built by :func:`select_launch_spec`."""

    args: tuple
    meta: dict
    grid: tuple[int, int]
    num_warps: int
    kv_indices: torch.Tensor  # (B, H, nq, nk) int32
    kv_counts: torch.Tensor  # (B, H, nq) int32
    r: torch.Tensor  # (B, H, nq) fp32
    weights: torch.Tensor  # (B, H, nq, nk) fp32


def select_launch_spec(logits: torch.Tensor, text_logit: torch.Tensor | None, rectifiable: torch.Tensor,
                       forced: torch.Tensor, p: float, top_k: int) -> SelectSpec:
    """Kernel arguments, grid and outputs (allocated on ``logits``' device) for one
    :func:`select_blocks` call. Also used by the ahead-of-time compile check on ``meta``
    tensors (``gen.kernels.aot``)."""
    bsz, heads, nq, nk = logits.shape
    dev = logits.device
    if nk == 0:
        raise ValueError(f"logits {tuple(logits.shape)} has no key blocks; there is nothing to select.")
    kv_indices = torch.empty((bsz, heads, nq, nk), dtype=torch.int32, device=dev)
    kv_counts = torch.empty((bsz, heads, nq), dtype=torch.int32, device=dev)
    r = torch.empty((bsz, heads, nq), dtype=torch.float32, device=dev)
    weights = torch.empty((bsz, heads, nq, nk), dtype=torch.float32, device=dev)
    rect = rectifiable.view(torch.uint8)  # same bytes; Triton reads u8
    forced = forced.view(torch.uint8)
    text = text_logit if text_logit is not None else r
    # p >= 1 keeps every block; inf says so without a second code path (before <= inf)
    p_eff = math.inf if p >= 1 else float(p)
    args = (
        logits, text, rect, forced, kv_indices, kv_counts, r, weights,
        *logits.stride(),
        *(text.stride() if text_logit is not None else (0, 0, 0)),
        *rect.stride(), *forced.stride(),
        heads, nq, nk, p_eff, min(max(int(top_k), 0), nk),
    )
    nk_p2 = triton.next_power_of_2(nk)
    meta = dict(NK_P2=nk_p2, HAS_TEXT=text_logit is not None)
    return SelectSpec(args, meta, (nq, bsz * heads), _select_warps(nk_p2), kv_indices, kv_counts, r, weights)


@torch.library.custom_op("gen::select_blocks", mutates_args=())
def _select_blocks_op(logits: torch.Tensor, text_logit: torch.Tensor | None, rectifiable: torch.Tensor,
                      forced: torch.Tensor, p: float, top_k: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = select_launch_spec(logits, text_logit, rectifiable, forced, p, top_k)
    if spec.grid[0] and spec.grid[1]:
        kernel = _jitted(_block_select_kernel)
        if interpreting():
            kernel[spec.grid](*spec.args, **spec.meta, num_warps=spec.num_warps)
        else:
            with torch.cuda.device(logits.device):
                kernel[spec.grid](*spec.args, **spec.meta, num_warps=spec.num_warps)
    return spec.kv_indices, spec.kv_counts, spec.r, spec.weights


@_select_blocks_op.register_fake
def _(logits, text_logit, rectifiable, forced, p, top_k):
    bsz, heads, nq, nk = logits.shape
    return (logits.new_empty((bsz, heads, nq, nk), dtype=torch.int32),
            logits.new_empty((bsz, heads, nq), dtype=torch.int32),
            logits.new_empty((bsz, heads, nq), dtype=torch.float32),
            logits.new_empty((bsz, heads, nq, nk), dtype=torch.float32))


def select_blocks(logits: torch.Tensor, text_logit: torch.Tensor | None, rectifiable: torch.Tensor,
                  forced: torch.Tensor, p: float, top_k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cumulative-mass block selection with rectification terms, per query block (Triton).

    Same contract as ``gen.attention.estimate_reference.select_blocks``: with
    ``P = softmax([logits, text_logit])`` over each row (the text column always selected
    and first in the cumulative mass), video blocks sorted by ``P`` descending are kept
    while the mass before them is ``<= p``, at least ``top_k`` of them, ties at the
    threshold all kept; selected = kept ∪ forced; ``E`` = selected ∪ ¬rectifiable.

    Args:
        logits: fp32 ``(B, H, nq, nk)``, any strides: pooled logit of query block ``i``
            against key block ``j`` (``-inf`` for a key block with no valid token).
            ``nk <= MAX_KEY_BLOCKS``.
        text_logit: fp32 ``(B, H, nq)`` or None: log-sum-exp of the query block against
            the valid text keys (``-inf`` when none is valid).
        rectifiable: bool ``(B, H, nq, nk)``: dropped blocks whose mass may move to the
            compensation term; the others join ``E``.
        forced: bool ``(nq, nk)``: blocks always selected (neighbours, first frame).
        p: cumulative-mass threshold, a float > 0 (``>= 1`` selects every block).
        top_k: least number of key blocks selected per query block (beyond ``forced``),
            an int >= 0.

    Returns:
        ``kv_indices`` int32 ``(B, H, nq, nk)``: the selected key blocks ascending, then
        the last one repeated (0 for an empty row); ``kv_counts`` int32 ``(B, H, nq)``;
        ``r`` fp32 ``(B, H, nq)``: ``P_text + Σ_{j∈E} P_j``; ``weights`` fp32
        ``(B, H, nq, nk)``: ``P_j`` for ``j ∉ E``, else 0. All contiguous.

    Raises:
        ValueError: wrong shapes, dtypes or devices, ``p`` or ``top_k`` out of range,
            ``nk > MAX_KEY_BLOCKS``, or a device Triton cannot run on.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 4-dim tensor (batch, heads, query blocks, key blocks), got {shape}.")
    if logits.dtype != torch.float32:
        raise ValueError(f"logits has dtype {logits.dtype}; select_blocks takes float32 (call .float()).")
    bsz, heads, nq, nk = logits.shape
    dev = logits.device
    if nk == 0:
        raise ValueError(f"logits {tuple(logits.shape)} has no key blocks; there is nothing to select.")
    if text_logit is not None:
        if not isinstance(text_logit, torch.Tensor) or text_logit.shape != (bsz, heads, nq):
            got = tuple(text_logit.shape) if isinstance(text_logit, torch.Tensor) else type(text_logit).__name__
            raise ValueError(f"text_logit must be ({bsz}, {heads}, {nq}) (one per query block) or None, got {got}.")
        if text_logit.dtype != torch.float32:
            raise ValueError(f"text_logit has dtype {text_logit.dtype}; pass float32 (call .float()).")
    for name, t, shape in (("rectifiable", rectifiable, (bsz, heads, nq, nk)), ("forced", forced, (nq, nk))):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.shape != shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a bool tensor of shape {shape}, got {got}.")
    for name, t in (("text_logit", text_logit), ("rectifiable", rectifiable), ("forced", forced)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} lives on {t.device} but logits on {dev}; move it to logits' device.")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0 or math.isnan(p):
        raise ValueError(f"p must be a float > 0 (cumulative-mass threshold; >= 1 selects all), got {p!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (least blocks selected per row), got {top_k!r}.")
    if nk > MAX_KEY_BLOCKS:
        raise ValueError(
            f"{nk} key blocks per row is more than the Triton select kernel sorts in registers "
            f"({MAX_KEY_BLOCKS}); use a larger block size (fewer, longer key blocks) or the "
            "PyTorch backend (gen.attention.estimate_reference.select_blocks)."
        )
    if nq >= 2**31 or bsz * heads >= 65536:
        raise ValueError(f"logits {tuple(logits.shape)} is past the kernel's limits (batch x heads < 65536).")
    if not torch.compiler.is_compiling():
        ok, why = triton_available_for(dev)
        if not ok:
            raise ValueError(why)
    return _select_blocks_op(logits, text_logit, rectifiable, forced, float(p), int(top_k))
