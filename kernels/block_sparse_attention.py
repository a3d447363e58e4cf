"""Block-sparse attention forward in Triton.

FlashAttention-style forward pass (online softmax in base 2, one program per
``BLOCK_M`` query rows of one (batch, head)) that walks only the key blocks a
plan lists for its query block: ``plan.kv_indices[b, h, qb, :plan.kv_counts[b, h, qb]]``.
The kernel never decides the pattern; it is handed one.

Contract (shared with ``gen.attention.reference.block_sparse_attention``):

* ``q (B, H, Sq, D)``, ``k, v (B, H, Skv, D)``; fp16, bf16 or fp32; any ``Sq``/``Skv``
  (the ragged last blocks are masked in the kernel); ``D`` a multiple of 16 up to 256
  (non powers of two are padded in registers).
* ``kv_valid (B,)``: keys at positions ``>= kv_valid[b]`` are ignored (padding).
* ``kv_mask`` bool ``(Skv,)`` or ``(B, Skv)``: keys flagged False are ignored anywhere in
  the sequence (padding slots inside a permuted token order).
* A row that sees no valid key returns zeros and ``lse = -inf``.
* ``lse`` is the natural-log log-sum-exp of the scaled scores, fp32 ``(B, H, Sq)``.

Chunk variant (``CHUNKED``, :func:`chunk_sparse_attention`, for VMoBA): the plan's visits
are *chunks* of any length (a table of chunk bounds, not ``kb * block_n``), each walked as
``ceil(len / BLOCK_N)`` tiles with its ragged last tile masked, and a per-row bitmask
says which chunks each query row chose (rows of a query tile that did not choose a chunk
get ``-inf`` for it), so the kernel computes exactly a per-token selection. Same kernel,
same online softmax; only the visit walk differs.

Tiling: the kernel tile ``BLOCK_M x BLOCK_N`` divides the plan's ``block_m x block_n``,
so a plan's granularity and the kernel's tile are chosen separately. On CUDA the tile,
warps and stages are autotuned over ``HOPPER_CONFIGS`` (data, pruned by
``keep_config``); under ``TRITON_INTERPRET=1`` a fixed tile is used.

Caution: correctness is tested on the CPU through the Triton interpreter on small
shapes. The interpreter mis-computes ``tl.dot`` on bf16 operands (seen with Triton
3.9: errors ~1e10), so under the interpreter bf16 operands are upcast to fp32
before each dot (``UPCAST``); GPU runs keep native bf16 dots. fp32 inputs use IEEE
dots (no TF32) so fp32 means fp32.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import (
    BlockPlanLike,
    check_kv_mask,
    check_kv_valid,
    check_plan,
    check_plan_values,
    check_qkv,
    check_scale,
    check_triton_limits,
)
from ._common import (
    LN2,
    LOG2E,
    SMEM_LIMIT,
    estimate_shared_memory,
    fits_device,
    interpreting,
    shared_memory_limit,
    sm_count,
    triton_available_for,
)

__all__ = [
    "AUTOTUNE_KEY",
    "CHUNK_PLAN_BN",
    "HOPPER_CONFIGS",
    "LaunchSpec",
    "block_sparse_attention",
    "choose_kv_splits",
    "check_chunk_plan",
    "chunk_sparse_attention",
    "estimate_shared_memory",
    "fallback_config",
    "keep_config",
    "launch_spec",
    "tma_usable",
    "triton_available_for",
]


@triton.jit
def _count_visits_below(idx_base, stride_iv, cnt, bound, PLAN_BN: tl.constexpr, WHOLE: tl.constexpr):
    """How many of a row's ascending visits lie below ``bound`` keys: with ``WHOLE`` the
    visits whose whole block ends at or before ``bound``, else those that start before it.
    A binary search over the visit list (log2(cnt) scalar loads)."""
    lo = cnt * 0
    hi = cnt
    while lo < hi:
        mid = (lo + hi) // 2
        kb = tl.load(idx_base + mid * stride_iv)
        if WHOLE:
            below = (kb + 1) * PLAN_BN <= bound
        else:
            below = kb * PLAN_BN < bound
        if below:
            lo = mid + 1
        else:
            hi = mid
    return lo


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, idx_base, mask_base,  #
    stride_iv, stride_kn, stride_kd, stride_vn, stride_vd,  #
    offs_d, d_ok, kv_limit, qk_scale, t_begin, t_end,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
    PLAN_BN: tl.constexpr, BLOCK_N: tl.constexpr,  #
    MASKED: tl.constexpr, HAS_KV_MASK: tl.constexpr, USE_TMA: tl.constexpr,  #
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
):
    """Online softmax over the key tiles ``t_begin .. t_end`` of a row's visit list, one flat
    loop over (visit, sub-tile). ``MASKED`` tiles may be ragged or carry a key mask; the
    others are whole and load and score without any mask. ``USE_TMA``: K/V tiles come
    through tensor descriptors (Hopper's bulk copy engine; rows past the end read zeros)."""
    SUB: tl.constexpr = PLAN_BN // BLOCK_N
    for t in range(t_begin, t_end):
        kb = tl.load(idx_base + (t // SUB) * stride_iv)
        start_n = kb * PLAN_BN + (t % SUB) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # k is loaded transposed (D, BLOCK_N) so q @ k needs no permute
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            n_ok = offs_n < kv_limit
            if HAS_KV_MASK:
                n_ok = n_ok & (tl.load(mask_base + offs_n, mask=n_ok, other=0) != 0)
        if USE_TMA:
            kt = tl.trans(k_desc.load([start_n, 0]))
            vt = v_desc.load([start_n, 0])
            if MASKED:
                # masked keys score -inf below; zero their values too (0 * nan = nan)
                vt = tl.where(n_ok[:, None], vt, 0.0)
        elif MASKED:
            kt = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            vt = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            kt = tl.load(k_ptrs)
            vt = tl.load(v_ptrs)
        else:
            kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            vt = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if MASKED:
            qk = tl.where(n_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # a row that has seen only masked keys keeps m = -inf; subtracting 0 instead
            # keeps exp2 away from (-inf) - (-inf) = nan
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new  # a whole tile has a valid key in every row: finite
        # scale and running max fold into one FMA before exp2
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_chunks(
    acc, l_i, m_i, q, k_base, v_base, idx_base, bits_base, Bounds,  #
    stride_iv, stride_kn, stride_kd, stride_vn, stride_vd, stride_bw,  #
    m_ok, offs_d, d_ok, qk_scale, v_begin, v_end,  #
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
):
    """Online softmax over the chunks ``v_begin .. v_end`` of a row's visit list (chunk
    variant): chunk ``c`` holds keys ``Bounds[c] .. Bounds[c + 1]`` and is walked in
    ``BLOCK_N`` tiles, the last one masked at the chunk's end; row ``r`` of the tile scores
    it only when bit ``c`` of its row mask is set (``bits_base`` points at the tile's rows
    of word 0). A chunk no row of the tile chose is skipped."""
    for vi in range(v_begin, v_end):
        c = tl.load(idx_base + vi * stride_iv)
        c_start = tl.load(Bounds + c)
        c_end = tl.load(Bounds + c + 1)
        word = tl.load(bits_base + (c // 32) * stride_bw, mask=m_ok, other=0)
        row_ok = ((word >> (c % 32)) & 1) != 0
        t_end = tl.where(tl.max(row_ok.to(tl.int32), 0) > 0, c_end, c_start)
        for start_n in range(c_start, t_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < c_end
            k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
            kt = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            vt = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
            qk = tl.where(row_ok[:, None] & n_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
            m_i = m_new
    return acc, l_i, m_i


def _block_sparse_fwd_kernel(
    Q, K, V, Out, Lse, KvIdx, KvCnt, KvValid, KvMask, RowOrder, ChunkBounds, RowBits,  #
    qk_scale,  #
    stride_qb, stride_qh, stride_qm, stride_qd,  #
    stride_kb, stride_kh, stride_kn, stride_kd,  #
    stride_vb, stride_vh, stride_vn, stride_vd,  #
    stride_os, stride_ob, stride_oh, stride_om, stride_od,  #
    stride_ls,  #
    stride_ib, stride_ih, stride_im, stride_iv,  #
    stride_cb, stride_ch, stride_cm,  #
    stride_rb, stride_rh,  #
    stride_mb,  #
    stride_bb, stride_bh, stride_bw,  #
    H, Q_LEN, KV_LEN, N_SPLITS,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
    PLAN_BM: tl.constexpr, PLAN_BN: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    HAS_KV_VALID: tl.constexpr, HAS_KV_MASK: tl.constexpr, RETURN_LSE: tl.constexpr,  #
    USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, IO_DTYPE: tl.constexpr,  #
    CHUNKED: tl.constexpr,  #
):
    # grid: (batch * heads, query tiles, key splits). Query tiles are taken in RowOrder
    # (plan rows with the most visits first), so uneven plans do not leave a tail of long
    # programs starting last. IO_DTYPE only keys the autotuner (bf16 and fp16 differ).
    pid_bh = tl.program_id(0)
    rank = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    TILES_PER_ROW: tl.constexpr = PLAN_BM // BLOCK_M
    plan_row = tl.load(RowOrder + b * stride_rb + h * stride_rh + rank // TILES_PER_ROW)
    m_start = plan_row * PLAN_BM + (rank % TILES_PER_ROW) * BLOCK_M

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < Q_LEN

    # load q: it stays in registers for the whole walk
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    kv_limit = KV_LEN
    if HAS_KV_VALID:
        kv_limit = tl.minimum(tl.load(KvValid + b).to(tl.int32), KV_LEN)

    idx_base = KvIdx + b * stride_ib + h * stride_ih + plan_row * stride_im
    cnt = tl.load(KvCnt + b * stride_cb + h * stride_ch + plan_row * stride_cm)
    cnt = tl.where(m_start < Q_LEN, cnt, 0)  # the last row's spare tiles walk nothing
    # this program's share of the row's visits (N_SPLITS > 1 only for small grids)
    per_split = tl.cdiv(cnt, N_SPLITS)
    v_begin = tl.minimum(split * per_split, cnt)
    v_end = tl.minimum(v_begin + per_split, cnt)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if CHUNKED:
        # chunk variant: visits are chunks from the bounds table, rows filtered by their
        # chunk bitmask (S contiguous: the tile's rows of word w are consecutive)
        bits_base = RowBits + b * stride_bb + h * stride_bh + offs_m
        acc, l_i, m_i = _attend_chunks(
            acc, l_i, m_i, q, k_base, v_base, idx_base, bits_base, ChunkBounds,
            stride_iv, stride_kn, stride_kd, stride_vn, stride_vd, stride_bw,
            m_ok, offs_d, d_ok, qk_scale, v_begin, v_end, BLOCK_N, UPCAST, DOT_PRECISION,
        )
    else:
        # visits are ascending, so whole blocks come first, then the (at most few) blocks that
        # cross kv_limit, then blocks past it, which are skipped
        if HAS_KV_MASK:
            n_whole = cnt * 0
        else:
            n_whole = _count_visits_below(idx_base, stride_iv, cnt, kv_limit, PLAN_BN, True)
        n_any = _count_visits_below(idx_base, stride_iv, cnt, kv_limit, PLAN_BN, False)
        whole_end = tl.minimum(v_end, n_whole)
        masked_begin = tl.maximum(v_begin, n_whole)
        masked_end = tl.minimum(v_end, n_any)

        mask_base = KvMask + b * stride_mb
        if USE_TMA:
            # per-(batch, head) 2-D views [KV_LEN, D]; the launcher checked alignment and
            # that D is contiguous and a power of two
            k_desc = tl.make_tensor_descriptor(k_base, shape=[KV_LEN, HEAD_DIM], strides=[stride_kn, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
            v_desc = tl.make_tensor_descriptor(v_base, shape=[KV_LEN, HEAD_DIM], strides=[stride_vn, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
        else:
            k_desc = k_base
            v_desc = v_base
        SUB: tl.constexpr = PLAN_BN // BLOCK_N
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, idx_base, mask_base,
            stride_iv, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_d, d_ok, kv_limit, qk_scale, v_begin * SUB, whole_end * SUB,
            HEAD_DIM, HEAD_DIM_PAD, PLAN_BN, BLOCK_N, False, HAS_KV_MASK, USE_TMA, UPCAST, DOT_PRECISION,
        )
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, idx_base, mask_base,
            stride_iv, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_d, d_ok, kv_limit, qk_scale, masked_begin * SUB, masked_end * SUB,
            HEAD_DIM, HEAD_DIM_PAD, PLAN_BN, BLOCK_N, True, HAS_KV_MASK, USE_TMA, UPCAST, DOT_PRECISION,
        )

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = (Out + split * stride_os + b * stride_ob + h * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
        tl.store(Lse + split * stride_ls + pid_bh.to(tl.int64) * Q_LEN + offs_m, lse, mask=m_ok)


# Autotune space for Hopper (H100/H200) and Ampere, written as data. keep_config prunes
# what cannot tile the plan, would spill, or would not fit the device's shared memory.
HOPPER_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (64, 128)
    for bn in (32, 64, 128)
    for w in (4, 8)
    for s in (2, 3, 4)
]


def keep_config(conf: triton.Config, plan_bm: int, plan_bn: int, head_dim: int,
                elem_bytes: int = 2, smem_limit: int = SMEM_LIMIT[90]) -> bool:
    """True when ``conf`` can run a plan with blocks ``plan_bm x plan_bn`` at ``head_dim``
    with ``elem_bytes``-byte inputs on a device allowing ``smem_limit`` bytes per program."""
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    if plan_bm % bm or plan_bn % bn:
        return False
    return fits_device(conf, head_dim, elem_bytes, smem_limit)


def _prune(configs, named_args, **kwargs):
    # the autotuner hands positional arguments as ``named_args`` and the meta-parameters
    # (passed by keyword at launch) as ``kwargs``: read both
    named_args = {**named_args, **kwargs}
    q = named_args["Q"]
    limit = shared_memory_limit(q.device)
    plan_bm, plan_bn, head_dim = named_args["PLAN_BM"], named_args["PLAN_BN"], named_args["HEAD_DIM"]
    kept = [c for c in configs if keep_config(c, plan_bm, plan_bn, head_dim, q.element_size(), limit)]
    if kept:
        return kept
    # Plans with blocks smaller than every tuned tile (e.g. 16x16) get the plan's own tile.
    return [fallback_config(plan_bm, plan_bn)]


def fallback_config(plan_bm: int, plan_bn: int) -> triton.Config:
    """The config used when no tuned tile divides the plan's blocks."""
    return triton.Config({"BLOCK_M": plan_bm, "BLOCK_N": plan_bn}, num_warps=4, num_stages=2)


AUTOTUNE_KEY = ["HEAD_DIM", "PLAN_BM", "PLAN_BN", "HAS_KV_VALID", "HAS_KV_MASK", "RETURN_LSE", "USE_TMA", "IO_DTYPE",
                "CHUNKED"]

#: ``PLAN_BN`` of a chunk-variant launch: unused by its walk (chunk bounds come from a
#: table), set to a multiple of every tuned ``BLOCK_N`` so the pruning keeps them all
CHUNK_PLAN_BN = 128


@functools.cache
def _kernel(interpret: bool):
    # Built on first use: the autotuner is only wanted for compiled (CUDA) runs.
    jitted = triton.jit(_block_sparse_fwd_kernel)
    if interpret:
        return jitted
    return triton.autotune(
        configs=HOPPER_CONFIGS,
        key=AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _prune},
    )(jitted)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlanLike,
    *,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    kv_splits: int | None = None,
    tma: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward with the Triton kernel.

    Args:
        q: queries ``(B, H, Sq, D)``, fp16/bf16/fp32, any strides.
        k, v: keys and values ``(B, H, Skv, D)``, same dtype and device as ``q``.
        plan: a ``gen.attention.BlockPlan`` built for ``q_len=Sq``, ``kv_len=Skv``; its
            batch/head dims are ``B`` or 1 (broadcast).
        scale: softmax scale; default ``1/sqrt(D)``.
        kv_valid: optional int tensor ``(B,)``, the number of valid keys per sample;
            keys at positions ``>= kv_valid[b]`` are ignored.
        kv_mask: optional bool ``(Skv,)`` or ``(B, Skv)``; keys flagged False are ignored.
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.
        kv_splits: split each query row's visits over this many programs and merge the
            parts by log-sum-exp. None (default) decides per call: on CUDA, calls that
            launch fewer programs than the device has multiprocessors (few query rows,
            many keys: the text queries of a joint call) are split; elsewhere 1.
        tma: load K/V tiles through tensor descriptors (Hopper's bulk copy engine) instead
            of pointer loads. None (default) follows the environment variable
            ``GEN_TMA=1`` (off otherwise: the path compiles for sm_90 but has not yet been
            measured on a GPU) and falls back where it cannot run; True raises if it cannot
            (needs sm_90+, a power-of-two head dim, contiguous head dim, 16-byte aligned
            rows).

    Returns:
        ``out (B, H, Sq, D)`` in ``q.dtype`` (contiguous), and ``lse`` when asked.
        Rows that see no valid key get zeros and ``lse = -inf``.

    Raises:
        ValueError: on mismatched shapes/dtypes/devices, a plan for another length,
            out-of-range plan indices, unsupported head dim or block size, or a
            device Triton cannot run on.
    """
    bsz, heads, q_len, kv_len, head_dim = check_qkv(q, k, v)
    check_plan(plan, q, k)
    sm_scale = check_scale(scale, head_dim)
    check_triton_limits(head_dim, plan)
    if kv_splits is not None and (not isinstance(kv_splits, int) or kv_splits < 1):
        raise ValueError(f"kv_splits must be a positive int or None (automatic), got {kv_splits!r}.")
    if not torch.compiler.is_compiling():
        # value checks sync with the device; inside a compiled graph the op checks at run time
        check_kv_valid(kv_valid, bsz, kv_len, q.device)
        check_kv_mask(kv_mask, bsz, kv_len, q.device)
        ok, why = triton_available_for(q.device)
        if not ok:
            raise ValueError(why)
    splits = kv_splits or choose_kv_splits(q.device, bsz * heads, plan.kv_counts.shape[2],
                                           plan.kv_indices.shape[3])
    use_tma, why_not = tma_usable(q, k, v)
    if tma is True and not use_tma:
        raise ValueError(f"tma=True but tensor-descriptor loads cannot run here: {why_not}")
    if tma is None:
        use_tma = use_tma and os.environ.get("GEN_TMA", "0") not in ("", "0", "false", "False")
    else:
        use_tma = use_tma and tma
    out, lse = _block_sparse_attn_fwd(q, k, v, plan.kv_indices, plan.kv_counts, kv_valid, kv_mask,
                                      plan.block_m, plan.block_n, sm_scale, return_lse, splits, use_tma)
    return (out, lse) if return_lse else out


def tma_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[bool, str]:
    """Whether K/V can be read through tensor descriptors, and why not: a compute
    capability of 9.0 or more (or the interpreter), a power-of-two head dim, the head dim
    contiguous, and every (batch, head) row start and row stride 16-byte aligned."""
    if q.device.type == "cuda":
        if torch.cuda.get_device_capability(q.device)[0] < 9:
            return False, "tensor descriptors need sm_90 or newer"
    elif not interpreting():
        return False, "not a CUDA device"
    d = q.shape[-1]
    if d & (d - 1):
        return False, f"head_dim {d} is not a power of two"
    for name, t in (("k", k), ("v", v)):
        if t.stride(3) != 1:
            return False, f"{name}'s head dim is not contiguous (stride {t.stride(3)})"
        size = t.element_size()
        if t.data_ptr() % 16 or any((t.stride(i) * size) % 16 for i in range(3)):
            return False, f"{name}'s rows are not 16-byte aligned"
    return True, ""


def _allocate_descriptor_memory(size: int, alignment: int, stream) -> torch.Tensor:
    # device-side tensor descriptors live in a small global scratch buffer per launch
    return torch.empty(size, dtype=torch.int8, device="cuda")


def choose_kv_splits(device: torch.device, programs: int, q_blocks: int, max_visits: int) -> int:
    """Key splits for a call with ``programs`` (batch x heads) and ``q_blocks`` plan rows
    of up to ``max_visits`` visits: enough programs to fill the device's multiprocessors,
    at least 4 visits per split, at most 16 splits. 1 off CUDA."""
    sms = sm_count(device)
    rows = programs * q_blocks
    if sms == 0 or rows >= sms:
        return 1
    return max(1, min(-(-sms // rows), max_visits // 4, 16))


class LaunchSpec(NamedTuple):
    """Everything one kernel launch takes, built by :func:`launch_spec`."""

    args: tuple
    meta: dict
    out: torch.Tensor  # (B, H, Sq, D) in q.dtype, or fp32 (splits, B, H, Sq, D) partials
    lse: torch.Tensor  # (B, H, Sq) fp32, or (splits, B, H, Sq) partials, or (1,) unused
    row_tiles: int  # plan rows (query tiles come per row)
    splits: int


def launch_spec(q, k, v, kv_indices, kv_counts, kv_valid, kv_mask, block_m: int, block_n: int,
                sm_scale: float, return_lse: bool, splits: int = 1, use_tma: bool = False, *,
                interpret: bool = False, chunk_bounds: torch.Tensor | None = None,
                row_bits: torch.Tensor | None = None) -> LaunchSpec:
    """Kernel arguments for one call, allocating the outputs on ``q``'s device.

    Also used by the ahead-of-time compile check (``gen.check.kernels``) on ``meta``
    tensors, so the signature it compiles is exactly the one a real call specialises.
    ``chunk_bounds`` int32 ``(n_chunks + 1,)`` and ``row_bits`` int32 ``(B|1, H|1, words,
    Sq)`` (S contiguous) select the chunk variant (both or neither).
    """
    bsz, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    dev = q.device
    if splits > 1:
        out = torch.empty((splits, bsz, heads, q_len, head_dim), dtype=torch.float32, device=dev)
        lse = torch.empty((splits, bsz, heads, q_len), dtype=torch.float32, device=dev)
    else:
        out = torch.empty((1, bsz, heads, q_len, head_dim), dtype=q.dtype, device=dev)
        lse = torch.empty((1, bsz, heads, q_len) if return_lse else (1, 1), dtype=torch.float32, device=dev)
    idx, cnt = kv_indices, kv_counts
    # longest rows first; a stable sort keeps equal rows in order (K/V reuse in L2)
    order = torch.argsort(cnt, dim=-1, descending=True, stable=True).to(torch.int32)
    if kv_valid is not None:
        kv_valid = kv_valid.to(torch.int32)
    if kv_mask is not None:
        kv_mask = kv_mask.to(torch.uint8).contiguous()

    def bstride(t: torch.Tensor, dim: int) -> int:
        # broadcast dims (size 1) read the same plan row for every batch/head
        return 0 if t.shape[dim] == 1 else t.stride(dim)

    chunked = row_bits is not None
    if chunked != (chunk_bounds is not None):
        raise ValueError("the chunk variant takes both chunk_bounds and row_bits.")
    args = (
        q, k, v, out, lse, idx, cnt, kv_valid if kv_valid is not None else cnt,
        kv_mask if kv_mask is not None else cnt, order,
        chunk_bounds if chunked else cnt, row_bits if chunked else cnt,
        sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0) if splits > 1 else 0,
        bstride(idx, 0), bstride(idx, 1), idx.stride(2), idx.stride(3),
        bstride(cnt, 0), bstride(cnt, 1), cnt.stride(2),
        bstride(order, 0), bstride(order, 1),
        kv_mask.stride(0) if kv_mask is not None and kv_mask.dim() == 2 else 0,
        *((bstride(row_bits, 0), bstride(row_bits, 1), row_bits.stride(2)) if chunked else (0, 0, 0)),
        heads, q_len, kv_len, splits,
    )
    meta = dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        PLAN_BM=block_m,
        PLAN_BN=block_n,
        HAS_KV_VALID=kv_valid is not None,
        HAS_KV_MASK=kv_mask is not None,
        RETURN_LSE=return_lse or splits > 1,
        USE_TMA=use_tma,
        UPCAST=interpret and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        IO_DTYPE=str(q.dtype).removeprefix("torch."),
        CHUNKED=chunked,
    )
    return LaunchSpec(args, meta, out, lse, cnt.shape[2], splits)


def _merge_splits(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # out (S, B, H, Sq, D) normalised per split, lse (S, B, H, Sq); empty splits have lse -inf
    total = torch.logsumexp(lse, dim=0)
    weight = torch.exp(lse - total.masked_fill(torch.isneginf(total), 0.0))
    merged = (weight.unsqueeze(-1) * out).sum(0)
    return merged.to(dtype), total


# The launch is a custom op so torch.compile treats it as one opaque call (no tracing into
# the launcher's Python or the autotuner) with shapes given by the fake implementation.
@torch.library.custom_op("gen::block_sparse_attn_fwd", mutates_args=())
def _block_sparse_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor,
    kv_valid: torch.Tensor | None, kv_mask: torch.Tensor | None, block_m: int, block_n: int,
    sm_scale: float, return_lse: bool, splits: int, use_tma: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    ok, why = triton_available_for(q.device)
    if not ok:
        raise ValueError(why)
    interpret = interpreting()
    spec = launch_spec(q, k, v, kv_indices, kv_counts, kv_valid, kv_mask, block_m, block_n,
                       sm_scale, return_lse, splits, use_tma, interpret=interpret)
    if use_tma and not interpret:
        triton.set_allocator(_allocate_descriptor_memory)
    tiles = (min(64, block_m), min(64, block_n)) if interpret else None
    return launch_plan_walk(_kernel(interpret), spec, q, block_m, tiles, splits, return_lse)


def launch_plan_walk(kernel, spec, q: torch.Tensor, block_m: int, interpret_tiles: tuple[int, int] | None,
                     splits: int, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a plan-walking kernel (this file's plain and chunk variants, the INT8 variant of
    ``quant_attention``) on its launch spec and merge the key splits. Compiled, the
    autotuner picks ``BLOCK_M``/``BLOCK_N``; interpreted (``interpret_tiles`` given), those
    tiles are used, small to keep the CPU emulation fast."""
    bsz, heads = q.shape[:2]
    if interpret_tiles is not None:
        bm, bn = interpret_tiles
        grid = (bsz * heads, spec.row_tiles * (block_m // bm), splits)
        kernel[grid](*spec.args, **spec.meta, BLOCK_M=bm, BLOCK_N=bn)
    else:
        grid = lambda m: (bsz * heads, spec.row_tiles * (block_m // m["BLOCK_M"]), splits)
        with torch.cuda.device(q.device):
            kernel[grid](*spec.args, **spec.meta)
    if splits > 1:
        out, lse = _merge_splits(spec.out, spec.lse, q.dtype)
        return out, (lse if return_lse else lse.new_empty((1,)))
    return spec.out[0], (spec.lse[0] if return_lse else spec.lse.new_empty((1,)))


@_block_sparse_attn_fwd.register_fake
def _(q, k, v, kv_indices, kv_counts, kv_valid, kv_mask, block_m, block_n, sm_scale, return_lse, splits, use_tma):
    bsz, heads, q_len, head_dim = q.shape
    out = q.new_empty((bsz, heads, q_len, head_dim))
    lse = q.new_empty((bsz, heads, q_len) if return_lse else (1,), dtype=torch.float32)
    return out, lse


# ------------------------------------------------------------------ chunk variant (VMoBA)


def check_chunk_plan(plan, q: torch.Tensor, k: torch.Tensor) -> None:
    """Check that a chunk plan fits ``q (B, H, Sq, D)`` and ``k (B, H, Skv, D)``.

    A chunk plan is duck-typed (``gen.attention.chunk_sparse.ChunkPlan`` is one): ``block_m`` (query
    rows per plan row), ``q_len``, ``kv_len``, ``chunk_bounds`` int32 ``(n_chunks + 1,)``
    (chunk ``c`` is keys ``chunk_bounds[c] .. chunk_bounds[c + 1]``), ``kv_indices`` int32
    ``[B|1, H|1, n_q_blocks, max_visits]`` (chunk ids, ascending, padded), ``kv_counts``
    int32 ``[B|1, H|1, n_q_blocks]`` and ``row_bits`` int32 ``[B|1, H|1, words, Sq]``
    (bit ``c % 32`` of word ``c // 32`` of row ``s``: query ``s`` attends chunk ``c``).
    Index values are checked (one device sync) unless the plan says ``is_validated``."""
    for attr in ("block_m", "q_len", "kv_len", "chunk_bounds", "kv_indices", "kv_counts", "row_bits"):
        if not hasattr(plan, attr):
            raise ValueError(f"chunk plan has no attribute {attr!r}; pass a gen.attention.chunk_sparse.ChunkPlan.")
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    if plan.q_len != sq or plan.kv_len != skv:
        raise ValueError(
            f"the chunk plan was built for q_len={plan.q_len}, kv_len={plan.kv_len} but q has {sq} "
            f"tokens and k has {skv}; build a new plan for this length."
        )
    bm = plan.block_m
    if isinstance(bm, bool) or not isinstance(bm, int) or bm < 16 or bm > 256 or bm & (bm - 1):
        raise ValueError(f"chunk plan block_m={bm!r} must be a power of two in [16, 256] (query rows per plan row).")
    bounds, idx, cnt, bits = plan.chunk_bounds, plan.kv_indices, plan.kv_counts, plan.row_bits
    for name, t in (("chunk_bounds", bounds), ("kv_indices", idx), ("kv_counts", cnt), ("row_bits", bits)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise ValueError(f"chunk plan {name} must be an int32 tensor, got {getattr(t, 'dtype', type(t))}.")
        if t.device != q.device:
            raise ValueError(f"the chunk plan's {name} lives on {t.device} but q on {q.device}; call plan.to(q.device).")
    n_chunks = bounds.numel() - 1
    if bounds.dim() != 1 or n_chunks < 1:
        raise ValueError(f"chunk_bounds must be 1-D (n_chunks + 1,) with n_chunks >= 1, got {tuple(bounds.shape)}.")
    nq = -(-sq // bm)
    if idx.dim() != 4 or cnt.dim() != 3 or tuple(idx.shape[:3]) != tuple(cnt.shape) or cnt.shape[2] != nq:
        raise ValueError(
            f"chunk plan kv_indices {tuple(idx.shape)} / kv_counts {tuple(cnt.shape)} do not agree with "
            f"{nq} query blocks of {bm} rows."
        )
    words = -(-n_chunks // 32)
    if bits.dim() != 4 or tuple(bits.shape[2:]) != (words, sq) or bits.stride(3) != 1:
        raise ValueError(
            f"row_bits must be int32 [B|1, H|1, {words}, {sq}] with the rows contiguous, got "
            f"{tuple(bits.shape)} (strides {bits.stride()})."
        )
    for name, t in (("kv_counts", cnt), ("row_bits", bits)):
        if t.shape[0] not in (1, b) or t.shape[1] not in (1, h):
            raise ValueError(f"chunk plan {name} batch/head dims {tuple(t.shape[:2])} do not broadcast to "
                             f"batch={b}, heads={h}.")
    if getattr(plan, "is_validated", False) or torch.compiler.is_compiling():
        return
    if int(bounds[0]) != 0 or int(bounds[-1]) != skv or bool((bounds[1:] <= bounds[:-1]).any()):
        raise ValueError(f"chunk_bounds must rise strictly from 0 to kv_len={skv}; got {bounds.tolist()[:8]}...")
    check_plan_values(idx, cnt, n_chunks)


def chunk_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    kv_splits: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunk-sparse attention forward (the kernel's chunk variant): each query row attends
    the keys of the chunks its row bitmask selects.

    Same contract as ``gen.attention.chunk_reference.chunk_sparse_attention`` (the
    PyTorch oracle). The plan's visit lists (per ``block_m`` query rows) are the union of
    their rows' selections; the kernel walks each visited chunk in ``BLOCK_N`` tiles
    (chunks of any length: 208, 1040 and 2912 tokens are usual) and masks the rows that did
    not choose it.

    Args:
        q: ``(B, H, Sq, D)``, fp16/bf16/fp32, any strides.
        k, v: ``(B, H, Skv, D)``, same dtype and device.
        plan: a ``gen.attention.chunk_sparse.ChunkPlan`` (see :func:`check_chunk_plan`).
        scale: softmax scale; default ``1/sqrt(D)``.
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.
        kv_splits: split each row's visits over this many programs (None: automatic).

    Returns:
        ``out (B, H, Sq, D)`` in ``q.dtype`` (and ``lse``). Rows that select nothing get
        zeros and ``lse = -inf``.

    Raises:
        ValueError: mismatched shapes, dtypes or devices, a plan for another length, bad
            plan values, an unsupported head dim, or a device Triton cannot run on.
    """
    bsz, heads, q_len, kv_len, head_dim = check_qkv(q, k, v)
    check_chunk_plan(plan, q, k)
    sm_scale = check_scale(scale, head_dim)
    if head_dim % 16 != 0 or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim={head_dim} is not supported by the Triton kernel; it needs a multiple of 16 "
                         "in [16, 256]. Use backend='torch' for other head dims.")
    if kv_splits is not None and (not isinstance(kv_splits, int) or kv_splits < 1):
        raise ValueError(f"kv_splits must be a positive int or None (automatic), got {kv_splits!r}.")
    if not torch.compiler.is_compiling():
        ok, why = triton_available_for(q.device)
        if not ok:
            raise ValueError(why)
    splits = kv_splits or choose_kv_splits(q.device, bsz * heads, plan.kv_counts.shape[2],
                                           plan.kv_indices.shape[3])
    out, lse = _chunk_sparse_attn_fwd(q, k, v, plan.kv_indices, plan.kv_counts, plan.chunk_bounds,
                                      plan.row_bits, plan.block_m, sm_scale, return_lse, splits)
    return (out, lse) if return_lse else out


@torch.library.custom_op("gen::chunk_sparse_attn_fwd", mutates_args=())
def _chunk_sparse_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor,
    chunk_bounds: torch.Tensor, row_bits: torch.Tensor, block_m: int, sm_scale: float, return_lse: bool,
    splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    ok, why = triton_available_for(q.device)
    if not ok:
        raise ValueError(why)
    interpret = interpreting()
    spec = launch_spec(q, k, v, kv_indices, kv_counts, None, None, block_m, CHUNK_PLAN_BN, sm_scale,
                       return_lse, splits, False, interpret=interpret, chunk_bounds=chunk_bounds.contiguous(),
                       row_bits=row_bits)
    tiles = (min(64, block_m), 64) if interpret else None
    return launch_plan_walk(_kernel(interpret), spec, q, block_m, tiles, splits, return_lse)


@_chunk_sparse_attn_fwd.register_fake
def _(q, k, v, kv_indices, kv_counts, chunk_bounds, row_bits, block_m, sm_scale, return_lse, splits):
    bsz, heads, q_len, head_dim = q.shape
    out = q.new_empty((bsz, heads, q_len, head_dim))
    lse = q.new_empty((bsz, heads, q_len) if return_lse else (1,), dtype=torch.float32)
    return out, lse
