"""Pyramid block-sparse attention forward in Triton (PSA's kernel variant).

A plan (``kv_indices``, ``kv_counts``) lists the key blocks each query block visits, as
for ``block_sparse_attention``; ``plan.visit_data["level"]`` (int, shaped like
``kv_indices``) gives each visit a pooling level ``L``, a power of two in
``[1, block_n]``. A visit of key block ``j`` at level ``L`` attends the ``block_n / L``
pooled keys of the block, each the mean of ``L`` adjacent keys (and values), and adds
``ln L`` to their logits, so a pooled key carries the softmax mass of the ``L`` keys it
stands for. One online softmax runs over every level. Level 1 is plain attention.

Contract (shared with ``gen.attention.pyramid_reference.pyramid_attention_reference``):

* ``q (B, H, Sq, D)``, ``k, v (B, H, Skv, D)``; fp16, bf16 or fp32; any lengths.
* Level ``L`` key ``p`` pools tokens ``[p·L, (p+1)·L)`` of the key sequence; its key and
  value are the means of the group's *valid* tokens (positions ``< kv_valid[b]`` and
  ``< Skv``), and its logit gets ``+ ln(n)`` for the ``n`` valid tokens it holds (``ln L``
  for a whole group; a group with none is ignored). So the ragged end of the sequence is
  exact, and with keys and values constant inside every block any level equals level 1.
* A row that sees no valid key returns zeros and ``lse = -inf``; ``lse`` is the natural
  log-sum-exp of the (biased) scaled scores, fp32 ``(B, H, Sq)``, so the result merges
  with other key sets by log-sum-exp (joint text).

How it runs:

1. **Pyramid, once per call** (:func:`build_pyramid`, PyTorch): levels ``2 .. max_level``
   of ``k`` and ``v``, concatenated along the sequence (level 2 first), in the input
   dtype. Level 1 is read from ``k``/``v`` in place.
2. **Visits grouped by level** (:func:`group_visits`, PyTorch, on the device, no sync):
   each row's visits sorted by (level, block) with a count per level.
3. **Kernel**: one program per ``BLOCK_M`` query rows; per level, the row's level-``L``
   visits are walked in tiles of ``BLOCK_N`` pooled keys. A visit holds ``P = block_n/L``
   pooled keys: when ``P >= BLOCK_N`` it spans ``P/BLOCK_N`` contiguous tiles; when
   ``P < BLOCK_N`` one tile packs ``BLOCK_N/P`` visits of that level, each lane reading
   its own visit's pooled key (a gather), and the lanes past the row's last visit are
   masked. Every pooled key is read exactly once for every block size and level.

   The authors' kernel merges exactly two pooled pieces per tile; when ``block_n/L <
   tile_n/2`` (block_n 64 at level 8, block_n 32 at levels 4 and 8, with their tile of 32)
   the remaining lanes re-read the first pieces and count those blocks again. Here the
   number of visits per tile is ``BLOCK_N/P`` whatever it is.

On CUDA the query tile, warps and stages are autotuned over :data:`HOPPER_CONFIGS`
(pruned by :func:`keep_config`); the pooled-key tile is the caller's ``tile_n`` (PSA's
``tile_n``). Under ``TRITON_INTERPRET=1`` a fixed 64-row tile is used; bf16 operands
are upcast before dots there (the interpreter mis-computes bf16 dots), as in
``block_sparse_attention``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import (
    BlockPlanLike,
    check_kv_valid,
    check_plan,
    check_qkv,
    check_scale,
    check_triton_limits,
)
from ._common import (
    LN2,
    LOG2E,
    SMEM_LIMIT,
    fits_device,
    interpreting,
    shared_memory_limit,
    triton_available_for,
)

__all__ = [
    "HOPPER_CONFIGS",
    "PyramidLaunchSpec",
    "build_pyramid",
    "check_level_args",
    "group_visits",
    "keep_config",
    "launch_spec",
    "level_count",
    "pyramid_attention",
]


def level_count(max_level: int) -> int:
    """Number of pyramid levels up to ``max_level`` (a power of two): ``log2(max_level) + 1``."""
    return max_level.bit_length()


def check_level_args(block_n: int, max_level: int, tile_n: int | None = None) -> None:
    """``max_level``: a power of two in ``[1, block_n]``; ``tile_n``: a power of two in
    ``[16, 128]`` (the pooled-key tile of the Triton kernel)."""
    if isinstance(max_level, bool) or not isinstance(max_level, int) or max_level < 1 or max_level & (max_level - 1):
        raise ValueError(f"max_level must be a power of two >= 1, got {max_level!r}.")
    if max_level > block_n:
        raise ValueError(f"max_level={max_level} exceeds block_n={block_n}: a block of {block_n} keys "
                         f"pools to at most {block_n} levels' worth (level {block_n} = one key).")
    if tile_n is not None and (isinstance(tile_n, bool) or not isinstance(tile_n, int) or tile_n < 16
                               or tile_n > 128 or tile_n & (tile_n - 1)):
        raise ValueError(f"tile_n must be a power of two in [16, 128], got {tile_n!r}.")


def build_pyramid(k: torch.Tensor, v: torch.Tensor, max_level: int,
                  kv_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled levels ``2, 4, .., max_level`` of ``k`` and ``v``.

    Args:
        k, v: ``(B, H, S, D)``, any strides.
        max_level: highest level (a power of two); 1 gives empty pyramids.
        kv_valid: optional int ``(B,)``: tokens at positions ``>= kv_valid[b]`` are left out.

    Returns:
        ``(kp, vp)``, each ``(B, H, N, D)`` contiguous in ``k.dtype`` with ``N = Σ_L
        ceil(S / L)`` over the levels ``L = 2 .. max_level``, level 2 first: row ``p`` of
        level ``L`` is the mean (fp32 sums) of the valid tokens among ``[p·L, (p+1)·L)``,
        0 for a group with none. Plain tensor ops: traceable, no host sync.
    """
    b, h, s, d = k.shape
    if kv_valid is not None:
        keep = (torch.arange(s, device=k.device).view(1, s) < kv_valid.view(-1, 1).to(k.device))
        keep = keep.to(k.dtype).view(b, 1, s, 1)
        k, v = k * keep, v * keep
    parts_k, parts_v = [], []
    level = 2
    while level <= max_level:
        n_full, tail = divmod(s, level)
        n = n_full + (tail > 0)
        pos = torch.arange(n, device=k.device) * level
        if kv_valid is None:
            count = (s - pos).clamp(max=level).to(torch.float32).view(1, 1, n, 1)
        else:
            count = (kv_valid.view(-1, 1).to(k.device) - pos.view(1, -1)).clamp(0, level).to(torch.float32)
            count = count.view(b, 1, n, 1)
        for x, parts in ((k, parts_k), (v, parts_v)):
            sums = x[:, :, : n_full * level].unflatten(2, (n_full, level)).sum(3, dtype=torch.float32)
            if tail:
                sums = torch.cat([sums, x[:, :, n_full * level:].sum(2, keepdim=True, dtype=torch.float32)], dim=2)
            parts.append((sums / count.clamp(min=1.0)).to(x.dtype))
        level *= 2
    if not parts_k:
        empty = k.new_zeros((b, h, 0, d))
        return empty, empty.clone()
    return torch.cat(parts_k, dim=2).contiguous(), torch.cat(parts_v, dim=2).contiguous()


def group_visits(kv_indices: torch.Tensor, kv_counts: torch.Tensor, level: torch.Tensor, n_levels: int,
                 n_kv_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's visits sorted by (level, key block), and the visit count per level.

    Args:
        kv_indices: int32 ``[B|1, H|1, nq, V]``; kv_counts int32 ``[B|1, H|1, nq]``.
        level: int ``[B|1, H|1, nq, V]`` (the plan's ``visit_data["level"]``).
        n_levels: levels ``1, 2, .., 2**(n_levels-1)`` are walked; a used visit whose
            level is not one of them is dropped (validated callers never have one).
        n_kv_blocks: key blocks of the plan.

    Returns:
        ``indices`` int32 shaped like ``kv_indices`` (level 1 visits first, ascending
        within a level) and ``counts`` int32 ``[B|1, H|1, nq, n_levels]``. Tensor ops on
        the device, no host sync.
    """
    visits = kv_indices.shape[-1]
    used = torch.arange(visits, device=kv_indices.device) < kv_counts.unsqueeze(-1)
    lvl = level.to(torch.int64)
    exp = torch.zeros_like(lvl)
    for e in range(1, n_levels):
        exp = exp + (lvl >= (1 << e)).to(torch.int64)
    ok = used & (lvl >= 1) & ((lvl & (lvl - 1)) == 0) & (lvl < (1 << n_levels))
    key = torch.where(ok, exp * n_kv_blocks + kv_indices.to(torch.int64), n_levels * n_kv_blocks)
    order = torch.argsort(key, dim=-1)
    indices = kv_indices.gather(-1, order).to(torch.int32).contiguous()
    counts = torch.stack([(ok & (exp == e)).sum(-1) for e in range(n_levels)], dim=-1).to(torch.int32)
    return indices, counts.contiguous()


@triton.jit
def _attend_level(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,  #
    idx_base, stride_iv, seg_start, seg_count, kv_limit, n_pooled, qk_scale, offs_d, d_ok,  #
    LEVEL: tl.constexpr, POOL_N: tl.constexpr, BLOCK_N: tl.constexpr,  #
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
):
    """Online softmax over the level-``LEVEL`` visits ``seg_start .. seg_start + seg_count``
    of a row (``POOL_N`` pooled keys each), in tiles of ``BLOCK_N`` pooled keys."""
    n_tiles = tl.cdiv(seg_count * POOL_N, BLOCK_N)
    lanes = tl.arange(0, BLOCK_N)
    for t in range(0, n_tiles):
        if POOL_N >= BLOCK_N:
            # one visit spans POOL_N / BLOCK_N whole tiles of contiguous pooled keys
            SUB: tl.constexpr = POOL_N // BLOCK_N
            kb = tl.load(idx_base + (seg_start + t // SUB) * stride_iv)
            offs_n = kb * POOL_N + (t % SUB) * BLOCK_N + lanes
            lane_ok = offs_n < n_pooled
        else:
            # one tile packs BLOCK_N / POOL_N visits; lanes past the last visit are masked
            PER_TILE: tl.constexpr = BLOCK_N // POOL_N
            visit = t * PER_TILE + lanes // POOL_N
            lane_ok = visit < seg_count
            kb = tl.load(idx_base + (seg_start + visit) * stride_iv, mask=lane_ok, other=0)
            offs_n = kb * POOL_N + lanes % POOL_N
            lane_ok = lane_ok & (offs_n < n_pooled)
        # valid tokens the pooled key stands for: LEVEL, fewer at the valid end, 0 past it
        tokens = tl.minimum(tl.maximum(kv_limit - offs_n * LEVEL, 0), LEVEL)
        key_ok = lane_ok & (tokens > 0)
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        # base 2: + log2(tokens) is + ln(tokens) on the natural-log logit
        bias = tl.where(key_ok, tl.math.log2(tl.maximum(tokens, 1).to(tl.float32)), float("-inf"))
        s = qk * qk_scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen only masked keys keep m = -inf; subtract 0 there
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def _pyramid_fwd_kernel(
    Q, K, V, KP, VP, Out, Lse, KvIdx, SegCnt, KvValid, RowOrder,  #
    qk_scale,  #
    stride_qb, stride_qh, stride_qm, stride_qd,  #
    stride_kb, stride_kh, stride_kn, stride_kd,  #
    stride_vb, stride_vh, stride_vn, stride_vd,  #
    stride_pb, stride_ph, stride_pn, stride_pd,  #
    stride_ob, stride_oh, stride_om, stride_od,  #
    stride_ib, stride_ih, stride_im, stride_iv,  #
    stride_sb, stride_sh, stride_sm, stride_sl,  #
    stride_rb, stride_rh,  #
    H, Q_LEN, KV_LEN,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
    PLAN_BM: tl.constexpr, PLAN_BN: tl.constexpr, N_LEVELS: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    HAS_KV_VALID: tl.constexpr, RETURN_LSE: tl.constexpr,  #
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, IO_DTYPE: tl.constexpr,  #
):
    # grid: (batch * heads, query tiles); query tiles come in RowOrder (most pooled keys
    # first). KP/VP hold levels 2.. of the pyramid back to back (same strides).
    pid_bh = tl.program_id(0)
    rank = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    TILES_PER_ROW: tl.constexpr = PLAN_BM // BLOCK_M
    plan_row = tl.load(RowOrder + b * stride_rb + h * stride_rh + rank // TILES_PER_ROW)
    m_start = plan_row * PLAN_BM + (rank % TILES_PER_ROW) * BLOCK_M

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < Q_LEN
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    kv_limit = KV_LEN
    if HAS_KV_VALID:
        kv_limit = tl.minimum(tl.load(KvValid + b).to(tl.int32), KV_LEN)

    idx_base = KvIdx + b * stride_ib + h * stride_ih + plan_row * stride_im
    seg_base = SegCnt + b * stride_sb + h * stride_sh + plan_row * stride_sm
    row_live = m_start < Q_LEN  # the last row's spare tiles walk nothing
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    seg_start = plan_row * 0
    pooled_off = (plan_row * 0).to(tl.int64)  # first row of the current level in KP/VP
    for e in tl.static_range(N_LEVELS):
        seg_count = tl.load(seg_base + e * stride_sl)
        seg_count = tl.where(row_live, seg_count, 0)
        if e == 0:
            acc, l_i, m_i = _attend_level(
                acc, l_i, m_i, q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                stride_kn, stride_kd, stride_vn, stride_vd,
                idx_base, stride_iv, seg_start, seg_count, kv_limit, KV_LEN, qk_scale, offs_d, d_ok,
                1, PLAN_BN, BLOCK_N, UPCAST, DOT_PRECISION,
            )
        else:
            n_pooled = (KV_LEN + (1 << e) - 1) >> e
            base = b * stride_pb + h * stride_ph + pooled_off * stride_pn
            acc, l_i, m_i = _attend_level(
                acc, l_i, m_i, q, KP + base, VP + base,
                stride_pn, stride_pd, stride_pn, stride_pd,
                idx_base, stride_iv, seg_start, seg_count, kv_limit, n_pooled, qk_scale, offs_d, d_ok,
                1 << e, PLAN_BN >> e, BLOCK_N, UPCAST, DOT_PRECISION,
            )
            pooled_off += n_pooled
        seg_start += seg_count

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
        tl.store(Lse + pid_bh.to(tl.int64) * Q_LEN + offs_m, lse, mask=m_ok)


# Autotune space (query tile, warps, stages); the pooled-key tile is the caller's tile_n.
HOPPER_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bm in (64, 128)
    for w in (4, 8)
    for s in (2, 3)
]


def keep_config(conf: triton.Config, plan_bm: int, tile_n: int, head_dim: int, elem_bytes: int = 2,
                smem_limit: int = SMEM_LIMIT[90]) -> bool:
    """True when ``conf`` can run a plan with ``plan_bm``-row query blocks and a pooled-key
    tile of ``tile_n`` at ``head_dim`` within the device's registers and ``smem_limit``."""
    bm = conf.kwargs["BLOCK_M"]
    if plan_bm % bm:
        return False
    sized = triton.Config({"BLOCK_M": bm, "BLOCK_N": tile_n}, num_warps=conf.num_warps, num_stages=conf.num_stages)
    return fits_device(sized, head_dim, elem_bytes, smem_limit)


def _prune(configs, named_args, **kwargs):
    # the autotuner hands the positional arguments as ``named_args`` and the meta-parameters
    # (passed by keyword at launch) as ``kwargs``: read both
    args = {**named_args, **kwargs}
    q = args["Q"]
    limit = shared_memory_limit(q.device)
    plan_bm, tile_n, head_dim = args["PLAN_BM"], args["BLOCK_N"], args["HEAD_DIM"]
    kept = [c for c in configs if keep_config(c, plan_bm, tile_n, head_dim, q.element_size(), limit)]
    return kept or [triton.Config({"BLOCK_M": min(64, plan_bm)}, num_warps=4, num_stages=2)]


AUTOTUNE_KEY = ["HEAD_DIM", "PLAN_BM", "PLAN_BN", "N_LEVELS", "BLOCK_N", "HAS_KV_VALID", "RETURN_LSE", "IO_DTYPE"]


@functools.cache
def _kernel(interpret: bool):
    jitted = triton.jit(_pyramid_fwd_kernel)
    if interpret:
        return jitted
    return triton.autotune(configs=HOPPER_CONFIGS, key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _prune})(jitted)


class PyramidLaunchSpec(NamedTuple):
    """Everything one kernel launch takes, built by :func:`launch_spec`."""

    args: tuple
    meta: dict
    out: torch.Tensor  # (B, H, Sq, D) in q.dtype
    lse: torch.Tensor  # (B, H, Sq) fp32, or (1,) unused
    row_tiles: int


def launch_spec(q, k, v, kp, vp, indices, seg_counts, kv_valid, block_m: int, block_n: int, n_levels: int,
                tile_n: int, sm_scale: float, return_lse: bool, *, interpret: bool = False) -> PyramidLaunchSpec:
    """Kernel arguments for one call (outputs allocated on ``q``'s device). Also used by the
    ahead-of-time compile check on ``meta`` tensors, so it compiles what a call specialises.

    ``indices``/``seg_counts`` come from :func:`group_visits`, ``kp``/``vp`` from
    :func:`build_pyramid`."""
    bsz, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    out = torch.empty((bsz, heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, heads, q_len) if return_lse else (1,), dtype=torch.float32, device=q.device)
    # rows with the most pooled keys first (a stable sort keeps equal rows in order)
    work = (seg_counts * (torch.tensor([block_n >> e for e in range(n_levels)], dtype=torch.int32,
                                       device=seg_counts.device))).sum(-1)
    order = torch.argsort(work, dim=-1, descending=True, stable=True).to(torch.int32)
    if kv_valid is not None:
        kv_valid = kv_valid.to(torch.int32)

    def bstride(t: torch.Tensor, dim: int) -> int:
        return 0 if t.shape[dim] == 1 else t.stride(dim)

    args = (
        q, k, v, kp, vp, out, lse, indices, seg_counts, kv_valid if kv_valid is not None else seg_counts, order,
        sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *kp.stride(), *out.stride(),
        bstride(indices, 0), bstride(indices, 1), indices.stride(2), indices.stride(3),
        bstride(seg_counts, 0), bstride(seg_counts, 1), seg_counts.stride(2), seg_counts.stride(3),
        bstride(order, 0), bstride(order, 1),
        heads, q_len, kv_len,
    )
    meta = dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        PLAN_BM=block_m,
        PLAN_BN=block_n,
        N_LEVELS=n_levels,
        BLOCK_N=tile_n,
        HAS_KV_VALID=kv_valid is not None,
        RETURN_LSE=return_lse,
        UPCAST=interpret and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        IO_DTYPE=str(q.dtype).removeprefix("torch."),
    )
    return PyramidLaunchSpec(args, meta, out, lse, seg_counts.shape[2])


@torch.library.custom_op("gen::pyramid_attn_fwd", mutates_args=())
def _pyramid_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, indices: torch.Tensor,
    seg_counts: torch.Tensor, kv_valid: torch.Tensor | None, block_m: int, block_n: int, n_levels: int,
    tile_n: int, sm_scale: float, return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    ok, why = triton_available_for(q.device)
    if not ok:
        raise ValueError(why)
    bsz, heads = q.shape[:2]
    interpret = interpreting()
    spec = launch_spec(q, k, v, kp, vp, indices, seg_counts, kv_valid, block_m, block_n, n_levels, tile_n,
                       sm_scale, return_lse, interpret=interpret)
    kernel = _kernel(interpret)
    if interpret:
        bm = min(64, block_m)
        kernel[(bsz * heads, spec.row_tiles * (block_m // bm))](*spec.args, **spec.meta, BLOCK_M=bm)
    else:
        grid = lambda m: (bsz * heads, spec.row_tiles * (block_m // m["BLOCK_M"]))
        with torch.cuda.device(q.device):
            kernel[grid](*spec.args, **spec.meta)
    return spec.out, spec.lse


@_pyramid_attn_fwd.register_fake
def _(q, k, v, kp, vp, indices, seg_counts, kv_valid, block_m, block_n, n_levels, tile_n, sm_scale, return_lse):
    out = q.new_empty(q.shape)
    lse = q.new_empty(tuple(q.shape[:3]) if return_lse else (1,), dtype=torch.float32)
    return out, lse


def pyramid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlanLike,
    *,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    return_lse: bool = False,
    tile_n: int = 32,
    max_level: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pyramid block-sparse attention forward with the Triton kernel.

    Args:
        q: queries ``(B, H, Sq, D)``, fp16/bf16/fp32, any strides.
        k, v: keys and values ``(B, H, Skv, D)``, same dtype and device.
        plan: a ``gen.attention.BlockPlan`` for ``Sq``/``Skv`` whose ``visit_data["level"]``
            (int, shaped like ``kv_indices``) holds each visit's level, a power of two
            in ``[1, max_level]``; block sizes powers of two in ``[16, 256]``.
        scale: softmax scale; default ``1/sqrt(D)``.
        kv_valid: optional int ``(B,)``: keys at positions ``>= kv_valid[b]`` are ignored
            (and left out of the pooled means).
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.
        tile_n: pooled keys per kernel tile (a power of two in ``[16, 128]``; PSA's 32).
        max_level: highest level used (default ``block_n``); the pyramid is built up to
            it and used visits with a higher level are skipped.

    Returns:
        ``out (B, H, Sq, D)`` in ``q.dtype`` and, when asked, ``lse``. Rows that see no
        valid key get zeros and ``lse = -inf``.

    Raises:
        ValueError: on mismatched inputs, a plan for another length or without levels,
            unsupported block sizes, head dims or tile, or a device Triton cannot run on.
    """
    check_qkv(q, k, v)
    check_plan(plan, q, k)
    sm_scale = check_scale(scale, q.shape[-1])
    check_triton_limits(q.shape[-1], plan)
    max_level = plan.block_n if max_level is None else max_level
    check_level_args(plan.block_n, max_level, tile_n)
    level = getattr(plan, "visit_data", {}).get("level")
    if level is None or tuple(level.shape) != tuple(plan.kv_indices.shape):
        raise ValueError("the plan has no per-visit levels: pyramid attention needs "
                         "plan.visit_data['level'] shaped like kv_indices.")
    if not torch.compiler.is_compiling():
        check_kv_valid(kv_valid, q.shape[0], k.shape[2], q.device)
        ok, why = triton_available_for(q.device)
        if not ok:
            raise ValueError(why)
    n_levels = level_count(max_level)
    indices, seg = group_visits(plan.kv_indices, plan.kv_counts, level, n_levels, math.ceil(plan.kv_len / plan.block_n))
    kp, vp = build_pyramid(k, v, max_level, kv_valid)
    out, lse = _pyramid_attn_fwd(q, k, v, kp, vp, indices, seg, kv_valid, plan.block_m, plan.block_n, n_levels,
                                 tile_n, sm_scale, return_lse)
    return (out, lse) if return_lse else out
