"""Input validation shared by every block-sparse attention backend.

All checks raise ``ValueError`` with a message that says what to change. The
Triton launcher and the PyTorch reference (``gen.attention.reference``) call the
same functions, so both backends accept and refuse exactly the same inputs
(apart from the Triton-only limits in :func:`check_triton_limits`).

A plan is duck-typed here (this layer may not import ``gen.attention``): any
object with ``block_m``, ``block_n``, ``q_len``, ``kv_len``, ``kv_indices`` and
``kv_counts`` is accepted. ``gen.attention.BlockPlan`` validates the index values
once at construction and says so through ``is_validated``; other objects get
their values checked on every call (one device sync).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BlockPlanLike(Protocol):
    """What a kernel needs from a plan (``gen.attention.BlockPlan`` is one)."""

    block_m: int
    block_n: int
    q_len: int
    kv_len: int
    kv_indices: torch.Tensor  # int32 [B|1, H|1, n_q_blocks, max_visits]
    kv_counts: torch.Tensor  # int32 [B|1, H|1, n_q_blocks]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    allowed_dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES,
) -> tuple[int, int, int, int, int]:
    """Check ``q (B, H, Sq, D)``, ``k``/``v (B, H, Skv, D)``; return ``(B, H, Sq, Skv, D)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{name} has shape {_shape(t)}; expected 4 dims (batch, heads, seq_len, head_dim). "
                "diffusers processors hold (batch, seq_len, heads, head_dim): call .transpose(1, 2) first."
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype."
        )
    if q.dtype not in allowed_dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
        raise ValueError(f"dtype {q.dtype} is not supported; use one of {names}.")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v live on different devices ({q.device}, {k.device}, {v.device}); move them to one."
        )
    b, h, sq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}.")
    if k.shape[1] != h or v.shape[1] != h:
        raise ValueError(
            f"head counts differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}; "
            "grouped-query attention is not supported, repeat k/v heads first."
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v lengths differ: k {_shape(k)}, v {_shape(v)}.")
    if k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"head dims differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}.")
    if sq == 0 or k.shape[2] == 0 or d == 0:
        raise ValueError(f"empty input: q {_shape(q)}, k {_shape(k)}.")
    return b, h, sq, k.shape[2], d


def check_plan(plan: BlockPlanLike, q: torch.Tensor, k: torch.Tensor) -> None:
    """Check that ``plan`` fits ``q (B, H, Sq, D)`` and ``k (B, H, Skv, D)``."""
    for attr in ("block_m", "block_n", "q_len", "kv_len", "kv_indices", "kv_counts"):
        if not hasattr(plan, attr):
            raise ValueError(
                f"plan has no attribute {attr!r}; pass a gen.attention.BlockPlan "
                "(e.g. BlockPlan.from_block_mask(...) or BlockPlan.dense(...))."
            )
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    if plan.q_len != sq or plan.kv_len != skv:
        raise ValueError(
            f"the plan was built for q_len={plan.q_len}, kv_len={plan.kv_len} but q has {sq} "
            f"tokens and k has {skv}; build a new plan for this length."
        )
    idx, cnt = plan.kv_indices, plan.kv_counts
    if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
        raise ValueError(
            f"plan.kv_indices/kv_counts must be int32, got {idx.dtype}/{cnt.dtype}."
        )
    if idx.dim() != 4 or cnt.dim() != 3:
        raise ValueError(
            f"plan.kv_indices must be [B|1, H|1, n_q_blocks, max_visits] and kv_counts "
            f"[B|1, H|1, n_q_blocks]; got {_shape(idx)} and {_shape(cnt)}."
        )
    n_qb = math.ceil(plan.q_len / plan.block_m)
    if tuple(idx.shape[:3]) != tuple(cnt.shape) or cnt.shape[2] != n_qb:
        raise ValueError(
            f"plan.kv_indices {_shape(idx)} and kv_counts {_shape(cnt)} do not agree with "
            f"{n_qb} query blocks of {plan.block_m}."
        )
    if cnt.shape[0] not in (1, b) or cnt.shape[1] not in (1, h):
        raise ValueError(
            f"plan batch/head dims {tuple(cnt.shape[:2])} do not broadcast to batch={b}, "
            f"heads={h}; use size 1 to share a plan, or build one per batch/head."
        )
    if idx.device != q.device or cnt.device != q.device:
        raise ValueError(
            f"the plan lives on {idx.device} but q on {q.device}; call plan.to(q.device)."
        )
    if not getattr(plan, "is_validated", False):
        check_plan_values(idx, cnt, math.ceil(plan.kv_len / plan.block_n))


def check_plan_values(kv_indices: torch.Tensor, kv_counts: torch.Tensor, n_kv_blocks: int) -> None:
    """Check counts and indices: counts in ``[0, max_visits]``, used indices strictly
    ascending and in ``[0, n_kv_blocks)``. Costs one device sync."""
    max_visits = kv_indices.shape[-1]
    if kv_counts.numel() and (int(kv_counts.min()) < 0 or int(kv_counts.max()) > max_visits):
        raise ValueError(
            f"plan.kv_counts must lie in [0, {max_visits}] (the last dim of kv_indices); "
            f"got values in [{int(kv_counts.min())}, {int(kv_counts.max())}]."
        )
    if max_visits == 0:
        return
    used = torch.arange(max_visits, device=kv_indices.device) < kv_counts.unsqueeze(-1)
    used_idx = kv_indices[used]
    if used_idx.numel() and (int(used_idx.min()) < 0 or int(used_idx.max()) >= n_kv_blocks):
        raise ValueError(
            f"plan.kv_indices has key-block indices outside [0, {n_kv_blocks}) "
            f"(got [{int(used_idx.min())}, {int(used_idx.max())}]); the plan was likely built "
            "for a longer key sequence or another block_n."
        )
    if max_visits > 1:
        step_used = used[..., 1:]
        steps = kv_indices[..., 1:] - kv_indices[..., :-1]
        if bool((steps[step_used] <= 0).any()):
            raise ValueError(
                "plan.kv_indices must be strictly ascending within each query block's visits "
                "(no repeats); build plans with BlockPlan.from_block_mask to get this for free."
            )


def check_kv_valid(kv_valid: torch.Tensor | None, batch: int, kv_len: int, device: torch.device) -> None:
    """``kv_valid``: integer tensor ``(B,)``, valid key count per sample in ``[0, kv_len]``."""
    if kv_valid is None:
        return
    if not isinstance(kv_valid, torch.Tensor):
        raise ValueError(f"kv_valid must be an integer tensor of shape ({batch},), got {type(kv_valid).__name__}.")
    if kv_valid.dtype.is_floating_point or kv_valid.dtype == torch.bool or kv_valid.shape != (batch,):
        raise ValueError(
            f"kv_valid must be an integer tensor of shape ({batch},) holding each sample's "
            f"number of valid keys; got {kv_valid.dtype} {tuple(kv_valid.shape)}."
        )
    if kv_valid.device != device:
        raise ValueError(f"kv_valid lives on {kv_valid.device} but q on {device}; move it.")
    if torch.compiler.is_compiling():
        return  # the range check syncs with the device; eager calls make it
    if int(kv_valid.min()) < 0 or int(kv_valid.max()) > kv_len:
        raise ValueError(f"kv_valid values must lie in [0, {kv_len}]; got {kv_valid.tolist()}.")


def check_kv_mask(kv_mask: torch.Tensor | None, batch: int, kv_len: int, device: torch.device) -> None:
    """``kv_mask``: bool ``(Skv,)`` (shared) or ``(B, Skv)``; False keys are ignored."""
    if kv_mask is None:
        return
    if not isinstance(kv_mask, torch.Tensor) or kv_mask.dtype != torch.bool:
        raise ValueError(f"kv_mask must be a bool tensor of shape ({kv_len},) or ({batch}, {kv_len}).")
    if tuple(kv_mask.shape) not in ((kv_len,), (batch, kv_len)):
        raise ValueError(
            f"kv_mask has shape {tuple(kv_mask.shape)}; expected ({kv_len},) or ({batch}, {kv_len}) "
            "(one flag per key: True = attend to it)."
        )
    if kv_mask.device != device:
        raise ValueError(f"kv_mask lives on {kv_mask.device} but q on {device}; move it.")


def check_scale(scale: float | None, head_dim: int) -> float:
    """Return the softmax scale: ``scale`` or ``1/sqrt(head_dim)``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale}.")
    return scale


def check_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlanLike,
    *,
    scale: float | None,
    kv_valid: torch.Tensor | None,
    kv_mask: torch.Tensor | None,
    allowed_dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES,
    prechecked: bool = False,
) -> tuple[int, int, int, int, int, float]:
    """Every check of one block-sparse call, in the order the backends make them: inputs,
    plan, padding, key mask, scale. Returns ``(B, H, Sq, Skv, D, softmax scale)``.
    ``prechecked``: the caller (the dispatch, ``gen.attention.block_sparse_attention``)
    already checked inputs and plan; only padding, key mask and scale are checked."""
    if prechecked:
        bsz, heads, q_len, head_dim = q.shape
        kv_len = k.shape[2]
    else:
        bsz, heads, q_len, kv_len, head_dim = check_qkv(q, k, v, allowed_dtypes=allowed_dtypes)
        check_plan(plan, q, k)
    check_kv_valid(kv_valid, bsz, kv_len, q.device)
    check_kv_mask(kv_mask, bsz, kv_len, q.device)
    return bsz, heads, q_len, kv_len, head_dim, check_scale(scale, head_dim)


def check_triton_limits(head_dim: int, plan: BlockPlanLike) -> None:
    """Limits of the Triton kernel beyond the shared contract."""
    if head_dim % 16 != 0 or not 16 <= head_dim <= 256:
        raise ValueError(
            f"head_dim={head_dim} is not supported by the Triton kernel; it needs a multiple "
            "of 16 in [16, 256]. Use backend='torch' for other head dims."
        )
    for name in ("block_m", "block_n"):
        size = getattr(plan, name)
        if size < 16 or size > 256 or size & (size - 1):
            raise ValueError(
                f"plan.{name}={size} is not supported by the Triton kernel; use a power of two "
                "in [16, 256] (64 or 128 for block_m, 32/64/128 for block_n are tuned)."
            )
