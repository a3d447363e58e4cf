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
import math
import os

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
    check_triton_limits,
)

__all__ = ["block_sparse_attention", "HOPPER_CONFIGS", "keep_config", "triton_available_for"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _block_sparse_fwd_kernel(
    Q, K, V, Out, Lse, KvIdx, KvCnt, KvValid, KvMask,  #
    qk_scale,  #
    stride_qb, stride_qh, stride_qm, stride_qd,  #
    stride_kb, stride_kh, stride_kn, stride_kd,  #
    stride_vb, stride_vh, stride_vn, stride_vd,  #
    stride_ob, stride_oh, stride_om, stride_od,  #
    stride_ib, stride_ih, stride_im, stride_iv,  #
    stride_cb, stride_ch, stride_cm,  #
    stride_mb,  #
    H, Q_LEN, KV_LEN,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
    PLAN_BM: tl.constexpr, PLAN_BN: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    HAS_KV_VALID: tl.constexpr, HAS_KV_MASK: tl.constexpr, RETURN_LSE: tl.constexpr,  #
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    # The plan row this tile belongs to: BLOCK_M divides PLAN_BM (the launcher checks).
    plan_row = (pid_m * BLOCK_M) // PLAN_BM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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

    cnt = tl.load(KvCnt + b * stride_cb + h * stride_ch + plan_row * stride_cm)
    idx_base = KvIdx + b * stride_ib + h * stride_ih + plan_row * stride_im
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    for i in range(0, cnt):
        kb = tl.load(idx_base + i * stride_iv)
        for j in tl.static_range(PLAN_BN // BLOCK_N):
            offs_n = kb * PLAN_BN + j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < kv_limit
            if HAS_KV_MASK:
                n_ok = n_ok & (tl.load(KvMask + b * stride_mb + offs_n, mask=n_ok, other=0) != 0)
            # k is loaded transposed (D, BLOCK_N) so q @ k needs no permute
            kt = tl.load(
                k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=n_ok[None, :] & d_ok[:, None], other=0.0,
            )
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            # -- update m_i and l_i; a row that has seen only masked keys keeps m = -inf,
            # and subtracting 0 instead keeps exp2 away from (-inf) - (-inf) = nan.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0,
            )
            if UPCAST:
                vt = vt.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
            m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
        tl.store(Lse + pid_bh.to(tl.int64) * Q_LEN + offs_m, lse, mask=m_ok)


# Autotune space for Hopper (H100/H200), written as data. keep_config prunes what
# cannot tile the plan or would spill: a 128x128 tile at D>128 exceeds the register
# budget of 8 warps.
HOPPER_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (64, 128)
    for bn in (32, 64, 128)
    for w in (4, 8)
    for s in (2, 3, 4)
]


def keep_config(conf: triton.Config, plan_bm: int, plan_bn: int, head_dim: int) -> bool:
    """True when ``conf`` can run a plan with blocks ``plan_bm x plan_bn`` at ``head_dim``."""
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    if plan_bm % bm or plan_bn % bn:
        return False
    if head_dim > 128 and bm * bn > 64 * 128:
        return False
    if bm == 128 and conf.num_warps == 4 and head_dim >= 128:
        return False
    return True


def _prune(configs, named_args, **kwargs):
    kept = [
        c for c in configs
        if keep_config(c, named_args["PLAN_BM"], named_args["PLAN_BN"], named_args["HEAD_DIM"])
    ]
    if kept:
        return kept
    # Plans with blocks smaller than every tuned tile (e.g. 16x16) get the plan's own tile.
    return [triton.Config({"BLOCK_M": named_args["PLAN_BM"], "BLOCK_N": named_args["PLAN_BN"]}, num_warps=4, num_stages=2)]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _interpreter_ready() -> bool:
    # Triton builds its own library functions (tl.zeros, tl.sum, ...) for the
    # interpreter only when TRITON_INTERPRET is set before triton is first imported.
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


@functools.cache
def _kernel(interpret: bool):
    # Built on first use: the autotuner is only wanted for compiled (CUDA) runs.
    jitted = triton.jit(_block_sparse_fwd_kernel)
    if interpret:
        return jitted
    return triton.autotune(
        configs=HOPPER_CONFIGS,
        key=["HEAD_DIM", "PLAN_BM", "PLAN_BN", "HAS_KV_VALID", "HAS_KV_MASK"],
        prune_configs_by={"early_config_prune": _prune},
    )(jitted)


def triton_available_for(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernel can run on ``device``, and why not."""
    if device.type == "cuda":
        return True, "CUDA device"
    if _interpreting():
        if not _interpreter_ready():
            return False, (
                "TRITON_INTERPRET=1 was set after triton was imported; set it before the first "
                "`import triton` / `import gen` (e.g. in the shell), or use backend='torch'."
            )
        return True, "TRITON_INTERPRET=1 (interpreter, slow: for testing)"
    return False, (
        f"Triton kernels need a CUDA device, got {device.type}; set TRITON_INTERPRET=1 to run "
        "them through the (slow) interpreter, or use backend='torch'."
    )


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
    if not torch.compiler.is_compiling():
        # value checks sync with the device; inside a compiled graph the op checks at run time
        check_kv_valid(kv_valid, bsz, kv_len, q.device)
        check_kv_mask(kv_mask, bsz, kv_len, q.device)
        ok, why = triton_available_for(q.device)
        if not ok:
            raise ValueError(why)
    out, lse = _block_sparse_attn_fwd(q, k, v, plan.kv_indices, plan.kv_counts, kv_valid, kv_mask,
                                      plan.block_m, plan.block_n, sm_scale, return_lse)
    return (out, lse) if return_lse else out


# The launch is a custom op so torch.compile treats it as one opaque call (no tracing into
# the launcher's Python or the autotuner) with shapes given by the fake implementation.
@torch.library.custom_op("gen::block_sparse_attn_fwd", mutates_args=())
def _block_sparse_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor,
    kv_valid: torch.Tensor | None, kv_mask: torch.Tensor | None, block_m: int, block_n: int,
    sm_scale: float, return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    ok, why = triton_available_for(q.device)
    if not ok:
        raise ValueError(why)
    bsz, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    interpret = _interpreting()
    out = torch.empty((bsz, heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, heads, q_len) if return_lse else (1,), dtype=torch.float32, device=q.device)
    idx, cnt = kv_indices, kv_counts
    if kv_valid is not None:
        kv_valid = kv_valid.to(torch.int32)
    if kv_mask is not None:
        kv_mask = kv_mask.to(torch.uint8).contiguous()

    def bstride(t: torch.Tensor, dim: int) -> int:
        # broadcast dims (size 1) read the same plan row for every batch/head
        return 0 if t.shape[dim] == 1 else t.stride(dim)

    args = (
        q, k, v, out, lse, idx, cnt, kv_valid if kv_valid is not None else cnt,
        kv_mask if kv_mask is not None else cnt,
        sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        bstride(idx, 0), bstride(idx, 1), idx.stride(2), idx.stride(3),
        bstride(cnt, 0), bstride(cnt, 1), cnt.stride(2),
        kv_mask.stride(0) if kv_mask is not None and kv_mask.dim() == 2 else 0,
        heads, q_len, kv_len,
    )
    meta = dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        PLAN_BM=block_m,
        PLAN_BN=block_n,
        HAS_KV_VALID=kv_valid is not None,
        HAS_KV_MASK=kv_mask is not None,
        RETURN_LSE=return_lse,
        UPCAST=interpret and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    kernel = _kernel(interpret)
    if interpret:
        bm, bn = min(64, block_m), min(64, block_n)
        kernel[(math.ceil(q_len / bm), bsz * heads)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    else:
        grid = lambda m: (triton.cdiv(q_len, m["BLOCK_M"]), bsz * heads)
        with torch.cuda.device(q.device):
            kernel[grid](*args, **meta)
    return out, lse


@_block_sparse_attn_fwd.register_fake
def _(q, k, v, kv_indices, kv_counts, kv_valid, kv_mask, block_m, block_n, sm_scale, return_lse):
    bsz, heads, q_len, head_dim = q.shape
    out = q.new_empty((bsz, heads, q_len, head_dim))
    lse = q.new_empty((bsz, heads, q_len) if return_lse else (1,), dtype=torch.float32)
    return out, lse
