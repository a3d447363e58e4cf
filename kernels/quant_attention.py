"""INT8 block-sparse attention forward in Triton (PARO's quantized kernel variant).

Two kernels:

1. ``_quantize_qkv_kernel``: one launch quantizes Q, K (and, for ``int8-pv``, V) to int8
   with fp32 scales, each program one group of rows of one (batch, head):

   * Q: one scale per :data:`Q_GROUP` (32) consecutive tokens, K: one per :data:`K_GROUP`
     (64), each over all ``D`` channels: ``scale = amax(|x|) / 127`` (fp32, correctly
     rounded division), ``x_int8 = rint(x / scale)`` clamped to ``[-127, 127]``, where rint
     rounds half to even (``torch.round``'s rule), computed as ``(y + 1.5·2^23) - 1.5·2^23``:
     adding the constant leaves no fraction bits, so IEEE round-to-nearest-even does the
     rounding; exact for ``|y| <= 2^22`` and identical under the interpreter and compiled
     (libdevice's ``rint`` does not exist in the interpreter).
   * V (``int8-pv`` only): one scale per :data:`V_GROUP` (64) keys *and per channel*
     (``(B, H, ceil(Skv/64), D)``): the scale of a channel is constant over the keys one
     ``tl.dot`` sums over (a tile never straddles two 64-key groups), so it factors out of
     the int32 product exactly, while an outlier channel or block does not coarsen the rest.
   * A group whose scale is 0 (all zeros, or so tiny that ``amax/127`` underflows) gets
     scale 1 and integers 0, so nothing ever divides by zero and dequantizes to exact 0.
   * Keys ignored by ``kv_valid``/``kv_mask`` are left out of their group's amax and
     quantize to 0 (they are masked in the attention anyway).

2. ``_quant_block_sparse_fwd_kernel``: the walk of ``block_sparse_attention`` (plan rows
   longest first, whole tiles without masks then the few ragged or key-masked ones, key
   splits merged by log-sum-exp) with ``tl.dot`` on int8 operands accumulating in int32
   (exact: ``|sum| <= 127·127·256 < 2^24``, so the fp32 conversion is exact too). The
   base-2 logits are ``int32 · (q_scale[row] · softmax_scale · log2 e) · k_scale[tile]``.
   Then either

   * ``int8``: ``P`` (fp32) is cast to V's dtype and multiplied with V (fp16/bf16, fp32
     with IEEE dots), accumulated in fp32; or
   * ``int8-pv``: ``P`` (``<= 1`` after subtracting the running max) is quantized with the
     fixed scale 1/127 (``P_int = rint(127·P)``, 0..127), ``tl.dot(P_int, V_int)`` in int32,
     times the tile's per-channel V scale, accumulated in fp32. The row sum ``l`` adds the
     *quantized* ``P_int``, so the output is exactly the average of the dequantized V rows
     under the quantized weights (a constant V comes back exactly; weights below 1/254
     round to 0). ``lse`` is ``m + ln(sum P_int / 127)``, consistent with that output when
     merged with other key sets.

Contract (shared with ``gen.attention.quant_reference``, the PyTorch emulation and
oracle): ``q (B, H, Sq, D)``, ``k, v (B, H, Skv, D)``, fp16/bf16/fp32, any lengths (ragged
last blocks masked), ``D`` a multiple of 16 in ``[32, 256]`` (int8 dots need a reduction of
at least 32), plan blocks ``block_m``/``block_n`` powers of two in ``[32, 256]`` (PARO
uses 64 x 64); ``kv_valid``/``kv_mask`` as in ``block_sparse_attention``; rows that see no
valid key give zeros and ``lse = -inf``.

On CUDA the tile, warps and stages are autotuned over :data:`HOPPER_CONFIGS` (key tiles of
32 or 64: an int8 ``tl.dot`` reduces over at least 32 and a key tile must stay inside one
64-key scale group); under ``TRITON_INTERPRET=1`` a fixed tile is used and bf16 V
operands are upcast before the P·V dot (the interpreter mis-computes bf16 dots; see
``block_sparse_attention``). Int8 dots are exact in the interpreter.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import (
    BlockPlanLike,
    check_kv_mask,
    check_kv_valid,
    check_plan,
    check_qkv,
    check_scale,
)
from ._common import (
    LN2,
    LOG2E,
    SMEM_LIMIT,
    estimate_shared_memory,
    fits_device,
    interpreting,
    shared_memory_limit,
    triton_available_for,
)
from .block_sparse_attention import (
    _count_visits_below,
    choose_kv_splits,
    launch_plan_walk,
)

__all__ = [
    "AUTOTUNE_KEY",
    "HOPPER_CONFIGS",
    "K_GROUP",
    "QUANT_MODES",
    "Q_GROUP",
    "QuantLaunchSpec",
    "QuantizeLaunchSpec",
    "V_GROUP",
    "check_quant_limits",
    "fallback_config",
    "keep_config",
    "launch_spec",
    "quant_block_sparse_attention",
    "quant_shared_memory",
    "quantize_launch_spec",
    "quantize_qkv",
    "quantize_shared_memory",
]

#: tokens per Q scale, per K scale, and keys per V scale (per channel)
Q_GROUP = 32
K_GROUP = 64
V_GROUP = 64
#: what ``quant`` may be in the kernel: INT8 QK with V in its dtype, or INT8 QK and PV
QUANT_MODES = ("int8", "int8-pv")

# 1.5 * 2**23: y + RINT_MAGIC has no fraction bits left for |y| <= 2**22, so the fp32 add
# rounds y to an integer half-to-even; subtracting it again is exact
RINT_MAGIC = tl.constexpr(12582912.0)
# log2(127): the int8-pv row sum counts P in units of 1/127
LOG2_127 = tl.constexpr(6.988684686772166)


@triton.jit
def _rint(y):
    """Round half to even (``torch.round``), for ``|y| <= 2**22``."""
    return (y + RINT_MAGIC) - RINT_MAGIC


@triton.jit
def _quantize_group(src, dst, scale_ptr, stride_s, stride_d, row0, n_rows, limit, mask_base, offs_d, d_ok,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PER_CHANNEL: tl.constexpr,
                    HAS_ROW_MASK: tl.constexpr):
    """Quantize rows ``row0 .. row0 + GROUP`` of one (batch, head): rows at or past
    ``limit`` (or flagged off in the row mask) count as zeros; rows past ``n_rows`` are not
    written. ``dst`` is int8 ``(n_rows, HEAD_DIM)`` contiguous; ``scale_ptr`` gets one fp32
    scale, or ``HEAD_DIM`` of them (``PER_CHANNEL``)."""
    offs = row0 + tl.arange(0, GROUP)
    ok = offs < limit
    if HAS_ROW_MASK:
        ok = ok & (tl.load(mask_base + offs, mask=ok, other=0) != 0)
    x = tl.load(src + offs[:, None] * stride_s + offs_d[None, :] * stride_d,
                mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if PER_CHANNEL:
        amax = tl.max(tl.abs(x), 0)
        scale = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
        scale = tl.where(scale == 0.0, 1.0, scale)  # nothing divides by zero; ints are 0
        y = tl.math.div_rn(x, tl.broadcast_to(scale[None, :], x.shape))
        tl.store(scale_ptr + offs_d, scale, mask=d_ok)
    else:
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        scale = tl.math.div_rn(amax, 127.0)
        scale = tl.where(scale == 0.0, 1.0, scale)
        y = tl.math.div_rn(x, tl.full(x.shape, 0.0, tl.float32) + scale)
        tl.store(scale_ptr, scale)
    y = tl.minimum(tl.maximum(_rint(y), -127.0), 127.0)
    tl.store(dst + offs[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], y.to(tl.int8),
             mask=(offs < n_rows)[:, None] & d_ok[None, :])


def _quantize_qkv_kernel(
    Q, K, V, Qi, Ki, Vi, Qs, Ks, Vs, KvValid, KvMask,  #
    stride_qb, stride_qh, stride_qm, stride_qd,  #
    stride_kb, stride_kh, stride_kn, stride_kd,  #
    stride_vb, stride_vh, stride_vn, stride_vd,  #
    stride_mb,  #
    H, Q_LEN, KV_LEN, N_QG, N_KG,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
    Q_GROUP: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,  #
    HAS_V: tl.constexpr, HAS_KV_VALID: tl.constexpr, HAS_KV_MASK: tl.constexpr,  #
):
    # grid: (batch * heads, Q groups + K groups [+ V groups]): one launch for all three
    pid_bh = tl.program_id(0)
    g = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    if g < N_QG:
        _quantize_group(Q + b * stride_qb + h * stride_qh, Qi + bh * Q_LEN * HEAD_DIM, Qs + bh * N_QG + g,
                        stride_qm, stride_qd, g * Q_GROUP, Q_LEN, Q_LEN, KvMask, offs_d, d_ok,
                        Q_GROUP, HEAD_DIM, False, False)
    else:
        kv_limit = KV_LEN
        if HAS_KV_VALID:
            kv_limit = tl.minimum(tl.load(KvValid + b).to(tl.int32), KV_LEN)
        mask_base = KvMask + b * stride_mb
        gk = g - N_QG
        if gk < N_KG:
            _quantize_group(K + b * stride_kb + h * stride_kh, Ki + bh * KV_LEN * HEAD_DIM, Ks + bh * N_KG + gk,
                            stride_kn, stride_kd, gk * K_GROUP, KV_LEN, kv_limit, mask_base, offs_d, d_ok,
                            K_GROUP, HEAD_DIM, False, HAS_KV_MASK)
        elif HAS_V:
            gv = gk - N_KG
            _quantize_group(V + b * stride_vb + h * stride_vh, Vi + bh * KV_LEN * HEAD_DIM,
                            Vs + (bh * N_KG + gv) * HEAD_DIM, stride_vn, stride_vd, gv * V_GROUP, KV_LEN,
                            kv_limit, mask_base, offs_d, d_ok, V_GROUP, HEAD_DIM, True, HAS_KV_MASK)


@triton.jit
def _attend_int8_tiles(
    acc, l_i, m_i, q, q_fac, k_base, v_base, ks_base, vs_base, idx_base, mask_base,  #
    stride_iv, stride_vn, stride_vd,  #
    offs_d, d_ok, kv_limit, t_begin, t_end,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
    PLAN_BN: tl.constexpr, BLOCK_N: tl.constexpr, K_GROUP: tl.constexpr,  #
    MASKED: tl.constexpr, HAS_KV_MASK: tl.constexpr, V_INT8: tl.constexpr,  #
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
):
    """Online softmax over the key tiles ``t_begin .. t_end`` of a row's visit list with
    int8 Q·K (and, ``V_INT8``, int8 P·V). ``q_fac``: per query row, its Q scale times the
    softmax scale times log2(e). A tile lies inside one K (and V) scale group."""
    SUB: tl.constexpr = PLAN_BN // BLOCK_N
    for t in range(t_begin, t_end):
        kb = tl.load(idx_base + (t // SUB) * stride_iv)
        start_n = kb * PLAN_BN + (t % SUB) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # int8 K (contiguous rows of HEAD_DIM) loaded transposed (D, BLOCK_N): q @ kt
        k_ptrs = k_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            n_ok = offs_n < kv_limit
            if HAS_KV_MASK:
                n_ok = n_ok & (tl.load(mask_base + offs_n, mask=n_ok, other=0) != 0)
            kt = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0)
            vt = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            kt = tl.load(k_ptrs)
            vt = tl.load(v_ptrs)
        else:
            kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0)
            vt = tl.load(v_ptrs, mask=d_ok[None, :], other=0)
        # one K scale for the whole tile (K_GROUP is a multiple of BLOCK_N, tiles aligned);
        # a masked tile may lie wholly past the keys (the ragged last block of a plan with
        # block_n > BLOCK_N), where no scale exists: it reads group 0's (finite; its keys
        # score -inf and its P is 0 anyway)
        group = start_n // K_GROUP
        if MASKED:
            group = tl.where(start_n < kv_limit, group, 0)
        r = q_fac * tl.load(ks_base + group)
        qk = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32)
        if MASKED:
            qk = tl.where(n_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * r)
            # rows that have seen only masked keys keep m = -inf: subtract 0, not -inf
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * r)  # r > 0: the row max scales
            m_sub = m_new
        p = tl.math.exp2(qk * r[:, None] - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        if V_INT8:
            # P <= 1 after the max is subtracted: fixed scale 1/127; the sum counts the
            # quantized weights so the output averages V with exactly those weights
            p_q = _rint(p * 127.0)
            l_i = l_i * alpha + tl.sum(p_q, 1)
            v_sc = tl.load(vs_base + group * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
            pv = tl.dot(p_q.to(tl.int8), vt, out_dtype=tl.int32).to(tl.float32)
            acc = acc * alpha[:, None] + pv * v_sc[None, :]
        else:
            if UPCAST:
                vt = vt.to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def _quant_block_sparse_fwd_kernel(
    Qi, Ki, V, Qs, Ks, Vs, Out, Lse, KvIdx, KvCnt, KvValid, KvMask, RowOrder,  #
    qk_scale,  #
    stride_vb, stride_vh, stride_vn, stride_vd,  #
    stride_os, stride_ob, stride_oh, stride_om, stride_od,  #
    stride_ls,  #
    stride_ib, stride_ih, stride_im, stride_iv,  #
    stride_cb, stride_ch, stride_cm,  #
    stride_rb, stride_rh,  #
    stride_mb,  #
    H, Q_LEN, KV_LEN, N_QG, N_KG, N_SPLITS,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
    PLAN_BM: tl.constexpr, PLAN_BN: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    Q_GROUP: tl.constexpr, K_GROUP: tl.constexpr,  #
    HAS_KV_VALID: tl.constexpr, HAS_KV_MASK: tl.constexpr, RETURN_LSE: tl.constexpr,  #
    V_INT8: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, IO_DTYPE: tl.constexpr,  #
):
    # grid: (batch * heads, query tiles in RowOrder, key splits), as block_sparse_attention.
    # Qi, Ki (and V when V_INT8) are int8 (B, H, S, HEAD_DIM) contiguous; Qs (B, H, N_QG),
    # Ks (B, H, N_KG), Vs (B, H, N_KG, HEAD_DIM) fp32. IO_DTYPE only keys the autotuner.
    tl.static_assert(K_GROUP % BLOCK_N == 0, "a key tile must lie inside one scale group")
    pid_bh = tl.program_id(0)
    rank = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    TILES_PER_ROW: tl.constexpr = PLAN_BM // BLOCK_M
    plan_row = tl.load(RowOrder + b * stride_rb + h * stride_rh + rank // TILES_PER_ROW)
    m_start = plan_row * PLAN_BM + (rank % TILES_PER_ROW) * BLOCK_M

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < Q_LEN
    q = tl.load(Qi + bh * Q_LEN * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0)
    q_fac = tl.load(Qs + bh * N_QG + offs_m // Q_GROUP, mask=m_ok, other=1.0) * qk_scale

    kv_limit = KV_LEN
    if HAS_KV_VALID:
        kv_limit = tl.minimum(tl.load(KvValid + b).to(tl.int32), KV_LEN)

    idx_base = KvIdx + b * stride_ib + h * stride_ih + plan_row * stride_im
    cnt = tl.load(KvCnt + b * stride_cb + h * stride_ch + plan_row * stride_cm)
    cnt = tl.where(m_start < Q_LEN, cnt, 0)  # the last row's spare tiles walk nothing
    per_split = tl.cdiv(cnt, N_SPLITS)
    v_begin = tl.minimum(split * per_split, cnt)
    v_end = tl.minimum(v_begin + per_split, cnt)

    # visits ascend: whole blocks first, then the few crossing kv_limit (masked), then none
    if HAS_KV_MASK:
        n_whole = cnt * 0
    else:
        n_whole = _count_visits_below(idx_base, stride_iv, cnt, kv_limit, PLAN_BN, True)
    n_any = _count_visits_below(idx_base, stride_iv, cnt, kv_limit, PLAN_BN, False)
    whole_end = tl.minimum(v_end, n_whole)
    masked_begin = tl.maximum(v_begin, n_whole)
    masked_end = tl.minimum(v_end, n_any)

    k_base = Ki + bh * KV_LEN * HEAD_DIM
    v_base = V + b * stride_vb + h * stride_vh
    ks_base = Ks + bh * N_KG
    vs_base = Vs + bh * N_KG * HEAD_DIM
    mask_base = KvMask + b * stride_mb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    SUB: tl.constexpr = PLAN_BN // BLOCK_N
    acc, l_i, m_i = _attend_int8_tiles(
        acc, l_i, m_i, q, q_fac, k_base, v_base, ks_base, vs_base, idx_base, mask_base,
        stride_iv, stride_vn, stride_vd, offs_d, d_ok, kv_limit, v_begin * SUB, whole_end * SUB,
        HEAD_DIM, HEAD_DIM_PAD, PLAN_BN, BLOCK_N, K_GROUP, False, HAS_KV_MASK, V_INT8, UPCAST, DOT_PRECISION,
    )
    acc, l_i, m_i = _attend_int8_tiles(
        acc, l_i, m_i, q, q_fac, k_base, v_base, ks_base, vs_base, idx_base, mask_base,
        stride_iv, stride_vn, stride_vd, offs_d, d_ok, kv_limit, masked_begin * SUB, masked_end * SUB,
        HEAD_DIM, HEAD_DIM_PAD, PLAN_BN, BLOCK_N, K_GROUP, True, HAS_KV_MASK, V_INT8, UPCAST, DOT_PRECISION,
    )

    empty = l_i == 0.0
    safe_l = tl.where(empty, 1.0, l_i)
    out = acc / safe_l[:, None]
    o_ptrs = (Out + split * stride_os + b * stride_ob + h * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        log_l = tl.math.log2(safe_l)
        if V_INT8:
            log_l = log_l - LOG2_127  # the sum counted P in units of 1/127
        lse = tl.where(empty, float("-inf"), (m_i + log_l) * LN2)
        tl.store(Lse + split * stride_ls + bh * Q_LEN + offs_m, lse, mask=m_ok)


# Autotune space (Hopper and Ampere) as data. Key tiles of 32 or 64 only: an int8 dot
# reduces over at least 32 (P·V reduces over the key tile), and a tile must lie inside one
# 64-key scale group. keep_config prunes what cannot tile the plan or fit the device.
HOPPER_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (64, 128)
    for bn in (32, 64)
    for w in (4, 8)
    for s in (2, 3, 4)
]

AUTOTUNE_KEY = ["HEAD_DIM", "PLAN_BM", "PLAN_BN", "HAS_KV_VALID", "HAS_KV_MASK", "RETURN_LSE", "V_INT8",
                "IO_DTYPE"]


def keep_config(conf: triton.Config, plan_bm: int, plan_bn: int, head_dim: int,
                smem_limit: int = SMEM_LIMIT[90], v_bytes: int = 2) -> bool:
    """True when ``conf`` can run a plan with blocks ``plan_bm x plan_bn`` at ``head_dim``
    with ``v_bytes``-byte V (1 for ``int8-pv``) on a device allowing ``smem_limit`` bytes
    per program (shared memory: :func:`quant_shared_memory`)."""
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    if plan_bm % bm or plan_bn % bn or K_GROUP % bn:
        return False
    return fits_device(conf, head_dim, max(2, v_bytes), smem_limit)


def fallback_config(plan_bm: int, plan_bn: int) -> triton.Config:
    """The config used when no tuned tile divides the plan's blocks (block_m = 32)."""
    return triton.Config({"BLOCK_M": min(plan_bm, 64), "BLOCK_N": min(plan_bn, 64)}, num_warps=4, num_stages=2)


def _prune(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}
    limit = shared_memory_limit(named_args["Qi"].device)
    plan_bm, plan_bn, head_dim = named_args["PLAN_BM"], named_args["PLAN_BN"], named_args["HEAD_DIM"]
    v_bytes = named_args["V"].element_size()
    kept = [c for c in configs if keep_config(c, plan_bm, plan_bn, head_dim, limit, v_bytes)]
    return kept or [fallback_config(plan_bm, plan_bn)]


@functools.cache
def _kernel(interpret: bool):
    jitted = triton.jit(_quant_block_sparse_fwd_kernel)
    if interpret:
        return jitted
    return triton.autotune(configs=HOPPER_CONFIGS, key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _prune})(jitted)


@functools.cache
def _quantizer():
    return triton.jit(_quantize_qkv_kernel)


def check_quant_limits(head_dim: int, plan: BlockPlanLike | None = None) -> None:
    """Limits of the INT8 kernels beyond the shared contract: ``head_dim`` a multiple of 16
    in ``[32, 256]``; plan blocks powers of two in ``[32, 256]``."""
    if head_dim % 16 or not 32 <= head_dim <= 256:
        raise ValueError(
            f"head_dim={head_dim} is not supported by the INT8 kernel; it needs a multiple of 16 in "
            "[32, 256] (an int8 dot reduces over at least 32). Use backend='torch' for other head dims."
        )
    if plan is None:
        return
    for name in ("block_m", "block_n"):
        size = getattr(plan, name)
        if size < 32 or size > 256 or size & (size - 1):
            raise ValueError(
                f"plan.{name}={size} is not supported by the INT8 kernel; use a power of two in [32, 256] "
                "(PARO plans use 64 x 64)."
            )


class QuantizeLaunchSpec(NamedTuple):
    """Arguments and outputs of one quantization launch (:func:`quantize_launch_spec`)."""

    args: tuple
    meta: dict
    grid: tuple
    outputs: tuple  # (q_int8, q_scale, k_int8, k_scale, v_int8, v_scale); v ones empty without v


def quantize_launch_spec(q, k, v=None, kv_valid=None, kv_mask=None) -> QuantizeLaunchSpec:
    """Kernel arguments for quantizing ``q`` and ``k`` (and ``v``) in one launch, the
    outputs allocated on ``q``'s device; used on ``meta`` tensors by the AOT check."""
    bsz, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    dev = q.device
    n_qg, n_kg = -(-q_len // Q_GROUP), -(-kv_len // K_GROUP)
    qi = torch.empty(bsz, heads, q_len, head_dim, dtype=torch.int8, device=dev)
    ki = torch.empty(bsz, heads, kv_len, head_dim, dtype=torch.int8, device=dev)
    qs = torch.empty(bsz, heads, n_qg, dtype=torch.float32, device=dev)
    ks = torch.empty(bsz, heads, n_kg, dtype=torch.float32, device=dev)
    has_v = v is not None
    if has_v:
        vi = torch.empty(bsz, heads, kv_len, head_dim, dtype=torch.int8, device=dev)
        vs = torch.empty(bsz, heads, -(-kv_len // V_GROUP), head_dim, dtype=torch.float32, device=dev)
    else:
        vi = torch.empty(0, dtype=torch.int8, device=dev)
        vs = torch.empty(0, dtype=torch.float32, device=dev)
    if kv_valid is not None:
        kv_valid = kv_valid.to(torch.int32)
    if kv_mask is not None:
        kv_mask = kv_mask.to(torch.uint8).contiguous()
    vv = v if has_v else k
    args = (
        q, k, vv, qi, ki, vi if has_v else qi, qs, ks, vs if has_v else qs,
        kv_valid if kv_valid is not None else qs, kv_mask if kv_mask is not None else qi,
        *q.stride(), *k.stride(), *vv.stride(),
        kv_mask.stride(0) if kv_mask is not None and kv_mask.dim() == 2 else 0,
        heads, q_len, kv_len, n_qg, n_kg,
    )
    meta = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), Q_GROUP=Q_GROUP,
                K_GROUP=K_GROUP, V_GROUP=V_GROUP, HAS_V=has_v, HAS_KV_VALID=kv_valid is not None,
                HAS_KV_MASK=kv_mask is not None)
    grid = (bsz * heads, n_qg + n_kg + (-(-kv_len // V_GROUP) if has_v else 0))
    return QuantizeLaunchSpec(args, meta, grid, (qi, qs, ki, ks, vi, vs))


#: warps of a quantization program (a 64 x 128 group is 8192 elements)
QUANT_WARPS = 4


def _run_quantize(q, k, v, kv_valid, kv_mask):
    spec = quantize_launch_spec(q, k, v, kv_valid, kv_mask)
    kernel = _quantizer()
    if interpreting():
        kernel[spec.grid](*spec.args, **spec.meta)
    else:
        with torch.cuda.device(q.device):
            kernel[spec.grid](*spec.args, **spec.meta, num_warps=QUANT_WARPS)
    return spec.outputs


@torch.library.custom_op("gen::quantize_qkv", mutates_args=())
def _quantize_qkv_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, kv_valid: torch.Tensor | None,
                     kv_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor]:
    ok, why = triton_available_for(q.device)
    if not ok:
        raise ValueError(why)
    return _run_quantize(q, k, v, kv_valid, kv_mask)


@_quantize_qkv_op.register_fake
def _(q, k, v, kv_valid, kv_mask):
    bsz, heads, q_len, d = q.shape
    kv_len = k.shape[2]
    out = [q.new_empty((bsz, heads, q_len, d), dtype=torch.int8),
           q.new_empty((bsz, heads, -(-q_len // Q_GROUP)), dtype=torch.float32),
           q.new_empty((bsz, heads, kv_len, d), dtype=torch.int8),
           q.new_empty((bsz, heads, -(-kv_len // K_GROUP)), dtype=torch.float32)]
    if v is None:
        out += [q.new_empty((0,), dtype=torch.int8), q.new_empty((0,), dtype=torch.float32)]
    else:
        out += [q.new_empty((bsz, heads, kv_len, d), dtype=torch.int8),
                q.new_empty((bsz, heads, -(-kv_len // V_GROUP), d), dtype=torch.float32)]
    return tuple(out)


def quantize_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Quantize Q and K (and V) to int8 with one kernel launch.

    Args:
        q: ``(B, H, Sq, D)``; k (and v) ``(B, H, Skv, D)``; fp16/bf16/fp32, any strides,
            ``D`` a multiple of 16 in [32, 256].
        v: optional; quantized per 64 keys and per channel when given.
        kv_valid: optional int ``(B,)``: keys at positions ``>= kv_valid[b]`` are left out
            of the scales and quantize to 0.
        kv_mask: optional bool ``(Skv,)`` or ``(B, Skv)``: keys flagged False likewise.

    Returns:
        ``(q_int8, q_scale, k_int8, k_scale, v_int8, v_scale)``: int8 ``(B, H, S, D)``
        contiguous, fp32 scales ``(B, H, ceil(Sq/32))``, ``(B, H, ceil(Skv/64))`` and
        ``(B, H, ceil(Skv/64), D)``; without ``v`` the last two are empty tensors.
    """
    if v is None:
        bsz, heads, _, kv_len, head_dim = check_qkv(q, k, k)
    else:
        bsz, heads, _, kv_len, head_dim = check_qkv(q, k, v)
    check_quant_limits(head_dim)
    if not torch.compiler.is_compiling():
        check_kv_valid(kv_valid, bsz, kv_len, q.device)
        check_kv_mask(kv_mask, bsz, kv_len, q.device)
        ok, why = triton_available_for(q.device)
        if not ok:
            raise ValueError(why)
    return _quantize_qkv_op(q, k, v, kv_valid, kv_mask)


class QuantLaunchSpec(NamedTuple):
    """Everything one attention launch takes, built by :func:`launch_spec`."""

    args: tuple
    meta: dict
    out: torch.Tensor  # (1, B, H, Sq, D) in the output dtype, or fp32 (splits, ...) partials
    lse: torch.Tensor
    row_tiles: int
    splits: int


def launch_spec(qi, qs, ki, ks, v, vs, kv_indices, kv_counts, kv_valid, kv_mask, block_m: int, block_n: int,
                sm_scale: float, return_lse: bool, splits: int, out_dtype: torch.dtype, *,
                interpret: bool = False) -> QuantLaunchSpec:
    """Kernel arguments for one INT8 attention call on quantized inputs (``v`` int8 with
    per-channel scales ``vs`` selects ``int8-pv``; otherwise ``v`` is fp16/bf16/fp32 and
    ``vs`` unused). Also used on ``meta`` tensors by the ahead-of-time compile check."""
    bsz, heads, q_len, head_dim = qi.shape
    kv_len = ki.shape[2]
    dev = qi.device
    v_int8 = v.dtype == torch.int8
    if splits > 1:
        out = torch.empty((splits, bsz, heads, q_len, head_dim), dtype=torch.float32, device=dev)
        lse = torch.empty((splits, bsz, heads, q_len), dtype=torch.float32, device=dev)
    else:
        out = torch.empty((1, bsz, heads, q_len, head_dim), dtype=out_dtype, device=dev)
        lse = torch.empty((1, bsz, heads, q_len) if return_lse else (1, 1), dtype=torch.float32, device=dev)
    idx, cnt = kv_indices, kv_counts
    order = torch.argsort(cnt, dim=-1, descending=True, stable=True).to(torch.int32)
    if kv_valid is not None:
        kv_valid = kv_valid.to(torch.int32)
    if kv_mask is not None:
        kv_mask = kv_mask.to(torch.uint8).contiguous()

    def bstride(t: torch.Tensor, dim: int) -> int:
        return 0 if t.shape[dim] == 1 else t.stride(dim)

    args = (
        qi, ki, v, qs, ks, vs if v_int8 else qs, out, lse, idx, cnt,
        kv_valid if kv_valid is not None else cnt, kv_mask if kv_mask is not None else cnt, order,
        sm_scale * LOG2E,
        *v.stride(), *out.stride(),
        lse.stride(0) if splits > 1 else 0,
        bstride(idx, 0), bstride(idx, 1), idx.stride(2), idx.stride(3),
        bstride(cnt, 0), bstride(cnt, 1), cnt.stride(2),
        bstride(order, 0), bstride(order, 1),
        kv_mask.stride(0) if kv_mask is not None and kv_mask.dim() == 2 else 0,
        heads, q_len, kv_len, qs.shape[2], ks.shape[2], splits,
    )
    meta = dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        PLAN_BM=block_m,
        PLAN_BN=block_n,
        Q_GROUP=Q_GROUP,
        K_GROUP=K_GROUP,
        HAS_KV_VALID=kv_valid is not None,
        HAS_KV_MASK=kv_mask is not None,
        RETURN_LSE=return_lse or splits > 1,
        V_INT8=v_int8,
        UPCAST=interpret and v.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if v.dtype == torch.float32 else "tf32",
        IO_DTYPE=str(out_dtype).removeprefix("torch."),
    )
    return QuantLaunchSpec(args, meta, out, lse, cnt.shape[2], splits)


@torch.library.custom_op("gen::quant_block_sparse_attn_fwd", mutates_args=())
def _quant_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor,
    kv_valid: torch.Tensor | None, kv_mask: torch.Tensor | None, block_m: int, block_n: int, sm_scale: float,
    return_lse: bool, splits: int, v_int8: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    ok, why = triton_available_for(q.device)
    if not ok:
        raise ValueError(why)
    qi, qs, ki, ks, vi, vs = _run_quantize(q, k, v if v_int8 else None, kv_valid, kv_mask)
    interpret = interpreting()
    spec = launch_spec(qi, qs, ki, ks, vi if v_int8 else v, vs, kv_indices, kv_counts, kv_valid, kv_mask,
                       block_m, block_n, sm_scale, return_lse, splits, q.dtype, interpret=interpret)
    tiles = None
    if interpret:
        conf = fallback_config(block_m, block_n)
        tiles = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    return launch_plan_walk(_kernel(interpret), spec, q, block_m, tiles, splits, return_lse)


@_quant_attn_fwd.register_fake
def _(q, k, v, kv_indices, kv_counts, kv_valid, kv_mask, block_m, block_n, sm_scale, return_lse, splits, v_int8):
    bsz, heads, q_len, head_dim = q.shape
    out = q.new_empty((bsz, heads, q_len, head_dim))
    lse = q.new_empty((bsz, heads, q_len) if return_lse else (1,), dtype=torch.float32)
    return out, lse


def quant_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlanLike,
    *,
    quant: str = "int8",
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    kv_splits: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """INT8 block-sparse attention with the Triton kernels (quantize, then attend).

    Args:
        q: ``(B, H, Sq, D)``; k, v ``(B, H, Skv, D)``; fp16/bf16/fp32, one dtype and device,
            ``D`` a multiple of 16 in [32, 256].
        plan: a ``gen.attention.BlockPlan`` for ``Sq``/``Skv`` with ``block_m``/``block_n``
            powers of two in [32, 256] (PARO: 64 x 64); batch/head dims ``B|1``, ``H|1``.
        quant: ``"int8"`` (INT8 QK, V in its dtype) or ``"int8-pv"`` (INT8 QK and PV).
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_valid: optional int ``(B,)``; kv_mask: optional bool ``(Skv,)``/``(B, Skv)``.
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.
        kv_splits: split each row's visits over this many programs (None: automatic).

    Returns:
        ``out (B, H, Sq, D)`` in ``q.dtype`` (and ``lse``); rows that see no valid key get
        zeros and ``lse = -inf``.
    """
    if quant not in QUANT_MODES:
        raise ValueError(f"quant={quant!r} is not an INT8 kernel mode; use one of {', '.join(QUANT_MODES)}.")
    bsz, heads, q_len, kv_len, head_dim = check_qkv(q, k, v)
    check_plan(plan, q, k)
    sm_scale = check_scale(scale, head_dim)
    check_quant_limits(head_dim, plan)
    if kv_splits is not None and (isinstance(kv_splits, bool) or not isinstance(kv_splits, int) or kv_splits < 1):
        raise ValueError(f"kv_splits must be a positive int or None (automatic), got {kv_splits!r}.")
    if not torch.compiler.is_compiling():
        check_kv_valid(kv_valid, bsz, kv_len, q.device)
        check_kv_mask(kv_mask, bsz, kv_len, q.device)
        ok, why = triton_available_for(q.device)
        if not ok:
            raise ValueError(why)
    splits = kv_splits or choose_kv_splits(q.device, bsz * heads, plan.kv_counts.shape[2], plan.kv_indices.shape[3])
    out, lse = _quant_attn_fwd(q, k, v, plan.kv_indices, plan.kv_counts, kv_valid, kv_mask, plan.block_m,
                               plan.block_n, sm_scale, return_lse, splits, quant == "int8-pv")
    return (out, lse) if return_lse else out


def quant_shared_memory(conf: triton.Config, head_dim: int, v_bytes: int = 2) -> int:
    """The shared-memory upper estimate the pruning uses, bytes: the plain kernel's
    estimate for K and V tiles of ``max(2, v_bytes)`` bytes (int8 K and V need less; fp32
    V more: ptxas gave 152.3 KiB for fp32 at 64x64, 4 stages, D=128, above the 2-byte
    estimate of 152 KiB)."""
    return estimate_shared_memory(conf, head_dim, max(2, v_bytes))


def quantize_shared_memory(head_dim: int, num_warps: int = QUANT_WARPS) -> int:
    """Upper estimate, in bytes, of the shared memory one quantization program uses: the
    cross-warp scratch of the per-channel amax (one fp32 row of the padded head dim per
    warp), doubled for margin (checked against ptxas by the compile test)."""
    return 2 * num_warps * triton.next_power_of_2(head_dim) * 4
