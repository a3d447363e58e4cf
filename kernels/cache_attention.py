"""Attention over a frame-slotted KV cache in Triton, with optional RoPE on keys at read.

The long-video runner keeps each layer's keys/values in slot buffers
``(B, n_slots * T, H, D)`` (``T`` tokens per latent frame): pinned sink frames, a ring
of recent frames, and the current chunk's own slots. A call lists the slots it attends
in order (``frame_slots (F,)``); key token ``n`` of the call is cache row
``frame_slots[n // T] * T + n % T``. The kernel walks those rows with that index
arithmetic, so ``[sink | window | current chunk]`` never gets concatenated or cloned.

Keys may be stored without their temporal rotary embedding: with ``key_pos (F,)`` and
tables ``rope_cos/rope_sin (P, D)`` (Wan's interleaved pairs; cos = 1, sin = 0 on the
dims not rotated) each key is rotated as it is loaded,
``k'[2i] = k[2i] cos - k[2i+1] sin``, ``k'[2i+1] = k[2i] sin + k[2i+1] cos``, with
``cos, sin`` from row ``key_pos[n // T]``. The partner element is a second load at
``d ^ 1``, so no register shuffles are needed.

Contract (shared with ``gen.attention.cache_reference.cache_attention_reference``):
``q (B, Sq, H, D)`` already roped; output ``(B, Sq, H, D)`` in ``q.dtype``; no mask
(every query attends every listed key: the chunk is attended in full, which is what
the causal Wan schedules need); fp16/bf16/fp32; any ``Sq``, any ``T``; ``D`` a multiple
of 16 up to 256. fp32 uses IEEE dots; under ``TRITON_INTERPRET=1`` bf16 is upcast
before the dots (the interpreter mis-computes bf16 dots, see block_sparse_attention).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["HOPPER_CONFIGS", "LaunchSpec", "cache_attention", "check_cache_inputs", "keep_config", "launch_spec"]

from ._common import (
    LN2,
    LOG2E,
    SMEM_LIMIT,
    fits_device,
    interpreting,
    shared_memory_limit,
    triton_available_for,
)


@triton.jit
def _cache_tiles(
    acc, l_i, m_i, q, k_base, v_base, Slots, KeyPos, Cos, Sin,  #
    stride_kn, stride_kd, stride_vn, stride_vd,  #
    offs_d, d_ok, qk_scale, start_begin, start_end, KV_LEN, TPF, N_FRAMES,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,  #
    HAS_ROPE: tl.constexpr, FRAME_SPAN2: tl.constexpr, MASKED: tl.constexpr,  #
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
):
    """Online softmax over key tiles starting at ``start_begin .. start_end`` (step
    ``BLOCK_N``). ``MASKED``: the tile may run past ``KV_LEN`` (the last one only)."""
    HALF: tl.constexpr = HEAD_DIM_PAD // 2
    offs_h = tl.arange(0, HALF)
    for start in range(start_begin, start_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < KV_LEN
        frame = offs_n // TPF
        if MASKED:
            slot = tl.load(Slots + frame, mask=n_ok, other=0).to(tl.int64)
        else:
            slot = tl.load(Slots + frame).to(tl.int64)
        row = slot * TPF + (offs_n % TPF)
        k_ptrs = k_base + row[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + row[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            k = tl.load(k_ptrs)
            vt = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            vt = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if HAS_ROPE:
            # one load of K, split into its interleaved (even, odd) pairs, rotated in fp32
            # and joined back: no second load of the partner element
            k_even, k_odd = tl.split(tl.reshape(k, [BLOCK_N, HALF, 2]))
            if FRAME_SPAN2:
                # a tile spans at most two frames: two cos/sin vectors per tile, not tiles
                f0 = start // TPF
                f1 = tl.minimum(f0 + 1, N_FRAMES - 1)
                p0 = tl.load(KeyPos + f0).to(tl.int64) * HALF
                p1 = tl.load(KeyPos + f1).to(tl.int64) * HALF
                first = (frame == f0)[:, None]
                c = tl.where(first, tl.load(Cos + p0 + offs_h)[None, :], tl.load(Cos + p1 + offs_h)[None, :])
                s = tl.where(first, tl.load(Sin + p0 + offs_h)[None, :], tl.load(Sin + p1 + offs_h)[None, :])
            else:
                pos = tl.load(KeyPos + frame, mask=n_ok, other=0).to(tl.int64) * HALF
                c = tl.load(Cos + pos[:, None] + offs_h[None, :])
                s = tl.load(Sin + pos[:, None] + offs_h[None, :])
            ke = k_even.to(tl.float32)
            ko = k_odd.to(tl.float32)
            k = tl.reshape(tl.join(ke * c - ko * s, ke * s + ko * c), [BLOCK_N, HEAD_DIM_PAD]).to(vt.dtype)
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            qk = tl.where(n_ok[None, :], qk, float("-inf"))
        # every row sees at least one valid key per tile, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def _cache_attn_fwd_kernel(
    Q, K, V, Out, Lse, Slots, KeyPos, Cos, Sin,  #
    qk_scale,  #
    stride_qb, stride_qm, stride_qh, stride_qd,  #
    stride_kb, stride_kn, stride_kh, stride_kd,  #
    stride_vb, stride_vn, stride_vh, stride_vd,  #
    stride_ob, stride_om, stride_oh, stride_od,  #
    H, Q_LEN, KV_LEN, TPF, N_FRAMES,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    HAS_ROPE: tl.constexpr, FRAME_SPAN2: tl.constexpr,  #
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, IO_DTYPE: tl.constexpr,  #
):
    # IO_DTYPE only keys the autotuner; FRAME_SPAN2: BLOCK_N <= TPF (launcher decides)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < Q_LEN
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    whole = (KV_LEN // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _cache_tiles(
        acc, l_i, m_i, q, k_base, v_base, Slots, KeyPos, Cos, Sin,
        stride_kn, stride_kd, stride_vn, stride_vd,
        offs_d, d_ok, qk_scale, 0, whole, KV_LEN, TPF, N_FRAMES,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, HAS_ROPE, FRAME_SPAN2, False, UPCAST, DOT_PRECISION,
    )
    acc, l_i, m_i = _cache_tiles(
        acc, l_i, m_i, q, k_base, v_base, Slots, KeyPos, Cos, Sin,
        stride_kn, stride_kd, stride_vn, stride_vd,
        offs_d, d_ok, qk_scale, whole, KV_LEN, KV_LEN, TPF, N_FRAMES,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, HAS_ROPE, FRAME_SPAN2, True, UPCAST, DOT_PRECISION,
    )

    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.math.log2(l_i)) * LN2
    tl.store(Lse + pid_bh.to(tl.int64) * Q_LEN + offs_m, lse, mask=m_ok)


# Tiles for Hopper and Ampere, written as data; keep_config prunes by shared memory.
HOPPER_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)
]


def keep_config(conf: triton.Config, head_dim: int, elem_bytes: int = 2, smem_limit: int = SMEM_LIMIT[90]) -> bool:
    """True when ``conf`` fits the register budget and ``smem_limit`` bytes of shared
    memory at ``head_dim`` (:func:`fits_device`)."""
    return fits_device(conf, head_dim, elem_bytes, smem_limit)


def _prune(configs, named_args, **kwargs):
    # the autotuner hands the positional arguments as ``named_args`` and the meta-parameters
    # (passed by keyword at launch, HEAD_DIM among them) as ``kwargs``: read both
    args = {**named_args, **kwargs}
    q = args["Q"]
    limit = shared_memory_limit(q.device)
    kept = [c for c in configs if keep_config(c, args["HEAD_DIM"], q.element_size(), limit)]
    return kept or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]


@functools.cache
def _kernel(interpret: bool):
    jitted = triton.jit(_cache_attn_fwd_kernel)
    if interpret:
        return jitted
    return triton.autotune(
        configs=HOPPER_CONFIGS,
        key=["HEAD_DIM", "HAS_ROPE", "FRAME_SPAN2", "IO_DTYPE"],
        prune_configs_by={"early_config_prune": _prune},
    )(jitted)


def check_cache_inputs(q, k_cache, v_cache, frame_slots, tokens_per_frame, key_pos, rope_cos, rope_sin):
    """Validate a cache-attention call; return ``(B, Sq, H, D, n_slots)``.

    Shared by the Triton launcher and the PyTorch reference, so both accept and refuse
    the same inputs. Raises ValueError saying what to change.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor (batch, tokens, heads, head_dim).")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache, v_cache dtypes differ ({q.dtype}, {k_cache.dtype}, {v_cache.dtype}).")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ.")
    b, sq, h, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[2] != h or k_cache.shape[3] != d:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch/heads/head_dim.")
    if not isinstance(tokens_per_frame, int) or tokens_per_frame <= 0:
        raise ValueError(f"tokens_per_frame must be a positive int, got {tokens_per_frame!r}.")
    if k_cache.shape[1] % tokens_per_frame:
        raise ValueError(
            f"cache length {k_cache.shape[1]} is not a whole number of frames of {tokens_per_frame} tokens."
        )
    n_slots = k_cache.shape[1] // tokens_per_frame
    if frame_slots.dtype not in (torch.int32, torch.int64) or frame_slots.dim() != 1 or frame_slots.numel() == 0:
        raise ValueError("frame_slots must be a non-empty 1-dim int tensor (one cache slot per attended frame).")
    if frame_slots.device != q.device:
        raise ValueError(f"frame_slots lives on {frame_slots.device} but q on {q.device}; move it.")
    if not torch.compiler.is_compiling():
        lo, hi = int(frame_slots.min()), int(frame_slots.max())
        if lo < 0 or hi >= n_slots:
            raise ValueError(f"frame_slots must lie in [0, {n_slots}) (cache slots); got [{lo}, {hi}].")
    if (rope_cos is None) != (rope_sin is None) or (rope_cos is None) != (key_pos is None):
        raise ValueError("pass key_pos, rope_cos and rope_sin together (RoPE at read), or none of them.")
    if rope_cos is not None:
        if rope_cos.shape != rope_sin.shape or rope_cos.dim() != 2 or rope_cos.shape[1] != d:
            raise ValueError(f"rope_cos/rope_sin must both be (positions, {d}); got {tuple(rope_cos.shape)}, {tuple(rope_sin.shape)}.")
        if key_pos.shape != frame_slots.shape or key_pos.dtype not in (torch.int32, torch.int64):
            raise ValueError("key_pos must be an int tensor shaped like frame_slots (one position per attended frame).")
        if not torch.compiler.is_compiling():
            lo, hi = int(key_pos.min()), int(key_pos.max())
            if lo < 0 or hi >= rope_cos.shape[0]:
                raise ValueError(
                    f"key_pos must lie in [0, {rope_cos.shape[0]}) (rows of the RoPE table); got [{lo}, {hi}]. "
                    "Use relative positions (positions='relative') for videos past the table."
                )
    return b, sq, h, d, n_slots




def cache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    frame_slots: torch.Tensor,
    *,
    tokens_per_frame: int,
    key_pos: torch.Tensor | None = None,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q (B, Sq, H, D)`` over the cache frames ``frame_slots`` (Triton).

    Args:
        q: queries ``(B, Sq, H, D)``, fp16/bf16/fp32, already roped; any strides.
        k_cache, v_cache: slot buffers ``(B, n_slots * tokens_per_frame, H, D)``; any strides
            (a layer's view of a stacked ``(L, B, ...)`` buffer is fine).
        frame_slots: int ``(F,)`` slots attended, in order.
        tokens_per_frame: tokens per latent frame.
        key_pos: int ``(F,)`` RoPE row per attended frame; with ``rope_cos``/``rope_sin``
            ``(P, D)`` fp32 the keys are rotated at read.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.

    Returns:
        ``out (B, Sq, H, D)`` in ``q.dtype`` (contiguous), and ``lse`` when asked.

    Raises:
        ValueError: bad shapes, dtypes, slots or positions out of range, an unsupported
            head dim, or a device Triton cannot run on (CPU without ``TRITON_INTERPRET=1``).
    """
    b, sq, h, d, _ = check_cache_inputs(q, k_cache, v_cache, frame_slots, tokens_per_frame, key_pos, rope_cos, rope_sin)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {q.dtype} is not supported by the Triton kernel; use fp16, bf16 or fp32.")
    if d % 16 or not 16 <= d <= 256:
        raise ValueError(f"head_dim={d} is not supported by the Triton kernel; use a multiple of 16 in [16, 256].")
    ok, why = triton_available_for(q.device)  # also catches TRITON_INTERPRET set too late
    if not ok:
        raise ValueError(why)
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    slots = frame_slots.to(torch.int32).contiguous()
    has_rope = rope_cos is not None
    if has_rope:
        pos = key_pos.to(torch.int32).contiguous()
        cos, sin = half_tables(rope_cos, rope_sin, q.device)
    else:
        pos, cos, sin = slots, slots, slots  # unused placeholders
    out, lse = _cache_attn_fwd(q, k_cache, v_cache, slots, pos, cos, sin, tokens_per_frame, sm_scale, has_rope)
    return (out, lse) if return_lse else out


def half_tables(rope_cos: torch.Tensor, rope_sin: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One cos and one sin per interleaved pair, fp32 ``(P, D_pad / 2)``: the tables hold
    each pair's value on both members (the reference reads cos at even, sin at odd
    columns); padded columns rotate by nothing (cos 1, sin 0)."""
    d = rope_cos.shape[1]
    half_pad = triton.next_power_of_2(d) // 2
    cos = rope_cos[:, 0::2].to(device=device, dtype=torch.float32)
    sin = rope_sin[:, 1::2].to(device=device, dtype=torch.float32)
    if half_pad > d // 2:
        cos = torch.nn.functional.pad(cos, (0, half_pad - d // 2), value=1.0)
        sin = torch.nn.functional.pad(sin, (0, half_pad - d // 2), value=0.0)
    return cos.contiguous(), sin.contiguous()


# Under the interpreter a fixed tile is used (the autotuner is for compiled runs).
_INTERPRET_TILE = (32, 32)


class LaunchSpec(NamedTuple):
    """Everything one kernel launch takes, built by :func:`launch_spec`."""

    args: tuple
    meta: dict
    out: torch.Tensor  # (B, Sq, H, D) in q.dtype
    lse: torch.Tensor  # (B, H, Sq) fp32


def launch_spec(q, k, v, slots, pos, cos, sin, tokens_per_frame: int, sm_scale: float, has_rope: bool,
                *, interpret: bool = False) -> LaunchSpec:
    """Kernel arguments for one call, allocating the outputs on ``q``'s device. Also used
    by the ahead-of-time compile check on ``meta`` tensors (``gen.kernels.aot``)."""
    bsz, q_len, heads, head_dim = q.shape
    kv_len = slots.shape[0] * tokens_per_frame
    out = torch.empty((bsz, q_len, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, heads, q_len), dtype=torch.float32, device=q.device)
    args = (
        q, k, v, out, lse, slots, pos, cos, sin, sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, q_len, kv_len, tokens_per_frame, slots.shape[0],
    )
    # a key tile spans at most two frames when no tile is longer than a frame
    longest_tile = _INTERPRET_TILE[1] if interpret else max(c.kwargs["BLOCK_N"] for c in HOPPER_CONFIGS)
    meta = dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), HAS_ROPE=has_rope,
        FRAME_SPAN2=tokens_per_frame >= longest_tile,
        UPCAST=interpret and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        IO_DTYPE=str(q.dtype).removeprefix("torch."),
    )
    return LaunchSpec(args, meta, out, lse)


# A custom op so torch.compile treats the launch as one opaque call.
@torch.library.custom_op("gen::cache_attn_fwd", mutates_args=())
def _cache_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, tokens_per_frame: int, sm_scale: float, has_rope: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, q_len, heads, head_dim = q.shape
    interpret = interpreting()
    spec = launch_spec(q, k, v, slots, pos, cos, sin, tokens_per_frame, sm_scale, has_rope, interpret=interpret)
    kernel = _kernel(interpret)
    if interpret:
        bm, bn = _INTERPRET_TILE
        kernel[(triton.cdiv(q_len, bm), bsz * heads)](*spec.args, **spec.meta, BLOCK_M=bm, BLOCK_N=bn)
    else:
        grid = lambda m: (triton.cdiv(q_len, m["BLOCK_M"]), bsz * heads)
        with torch.cuda.device(q.device):
            kernel[grid](*spec.args, **spec.meta)
    return spec.out, spec.lse


@_cache_attn_fwd.register_fake
def _(q, k, v, slots, pos, cos, sin, tokens_per_frame, sm_scale, has_rope):
    bsz, q_len, heads, head_dim = q.shape
    return q.new_empty((bsz, q_len, heads, head_dim)), q.new_empty((bsz, heads, q_len), dtype=torch.float32)
