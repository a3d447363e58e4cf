"""Pyramid block-sparse attention (PSA): the entry point over the backend registry, and
what a pyramid plan means for density and pictures.

A pyramid plan is a ``BlockPlan`` whose ``visit_data["level"]`` gives every visit a
pooling level ``L`` (1, 2, 4, 8, ...): the query block attends that key block's
``block_n / L`` pooled keys (means of ``L`` adjacent keys and values), each logit ``+ ln
L``, in one softmax with all its other visits. The exact semantics are in
:mod:`gen.attention.pyramid_reference` (the oracle) and ``gen.kernels.pyramid_attention``
(the Triton kernel).

``backend=None`` takes gen's Triton kernel on CUDA; on the CPU small calls go to the
``masked`` backend (the stacked pyramid through torch's fused attention with the levels as
a mask) and the rest to the PyTorch reference (op ``"pyramid"`` of
``gen.attention.backends``); ``"triton"``, ``"masked"`` or ``"torch"`` asks for one (one
that cannot run raises ``ValueError`` saying why).

Density counts a visit at level ``L`` as ``1/L`` of the block pair it covers (it scores
``1/L`` as many keys): :func:`level_density_per_head`.
"""

from __future__ import annotations

import torch

from gen.kernels._checks import check_plan, check_qkv

from .backends import choose
from .backends import pyramid as _pyramid_backends  # noqa: F401  (registers op "pyramid")
from .backends.pyramid import describe
from .pyramid_reference import check_levels, pyramid_attention_reference

__all__ = ["check_levels", "level_density", "level_density_per_head", "level_map", "pyramid_attention",
           "pyramid_attention_reference"]


def pyramid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    tile_n: int = 32,
    max_level: int | None = None,
):
    """Pyramid block-sparse attention on the chosen backend.

    Args:
        q: ``(B, H, Sq, D)``; k, v ``(B, H, Skv, D)``; fp16, bf16, fp32 (fp64: reference only).
        plan: ``BlockPlan`` for ``Sq``/``Skv`` with ``visit_data["level"]`` (int, shaped
            like ``kv_indices``): each used visit's level, a power of two in ``[1, max_level]``.
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_valid: optional int ``(B,)``: keys at positions ``>= kv_valid[b]`` are ignored.
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.
        backend: None (automatic), ``"triton"``, ``"masked"`` (CPU) or ``"torch"``.
        tile_n: the Triton kernel's pooled-key tile (a power of two in [16, 128]).
        max_level: highest level (default ``block_n``); the kernel builds the pyramid up
            to it. Levels are checked on CPU tensors (eagerly); on CUDA they are not read
            back (no device sync) and a used visit above ``max_level`` is skipped.

    Returns:
        ``out (B, H, Sq, D)`` in ``q.dtype`` and, when asked, ``lse``.
    """
    check_qkv(q, k, v, allowed_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    check_plan(plan, q, k)
    top = plan.block_n if max_level is None else max_level
    if not isinstance(top, int) or isinstance(top, bool) or top < 1 or top & (top - 1) or top > plan.block_n:
        raise ValueError(f"max_level must be a power of two in [1, block_n={plan.block_n}], got {max_level!r}.")
    if not torch.compiler.is_compiling() and plan.kv_indices.device.type == "cpu":
        check_levels(plan, top)
    elif plan.visit_data.get("level") is None:
        raise ValueError("the plan has no per-visit levels: pyramid attention needs "
                         "plan.visit_data['level'] shaped like kv_indices.")
    chosen = choose("pyramid", describe(q, k, plan, return_lse=return_lse), backend)
    return chosen.backend.run(q, k, v, plan, scale=scale, kv_valid=kv_valid, return_lse=return_lse,
                              tile_n=tile_n, max_level=top)


def level_map(plan) -> torch.Tensor:
    """Int32 ``[B|1, H|1, n_q_blocks, n_kv_blocks]``: the level each block pair is visited
    at, 0 where it is skipped (a plan without levels: 1 where visited)."""
    level = plan.visit_data.get("level")
    used = torch.arange(plan.max_visits, device=plan.device) < plan.kv_counts.unsqueeze(-1)
    if level is None:
        level = torch.ones_like(plan.kv_indices)
    vals = torch.where(used, level.to(torch.int32), torch.zeros((), dtype=torch.int32, device=plan.device))
    out = torch.zeros(*plan.kv_counts.shape, plan.n_kv_blocks, dtype=torch.int32, device=plan.device)
    # padding entries carry 0 and point at a used index (or 0): a max-reduce is exact
    out.scatter_reduce_(-1, plan.kv_indices.long(), vals, reduce="amax")
    return out


def level_density_per_head(plan) -> torch.Tensor:
    """Fraction of dense attention's (query, key) score pairs computed, fp64 ``[B|1, H|1]``:
    a block pair visited at level ``L`` counts ``1/L`` of its true (ragged) size."""
    qs, ks = plan.block_sizes()
    lv = level_map(plan).to("cpu", torch.float64)
    weight = torch.where(lv > 0, 1.0 / lv.clamp(min=1), torch.zeros((), dtype=torch.float64))
    pairs = torch.einsum("bhqk,q,k->bh", weight, qs, ks)
    return pairs / (plan.q_len * plan.kv_len)


def level_density(plan) -> float:
    """:func:`level_density_per_head` averaged over the plan's stored batch/head entries."""
    return float(level_density_per_head(plan).mean())
