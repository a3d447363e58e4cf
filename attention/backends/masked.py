"""Dense plans' neighbour: plans that keep most blocks, through torch's fused attention with
the plan as an additive key mask.

When a plan visits most key blocks (radial at 320 tokens keeps 86 % of 16-token blocks),
gathering each query block's keys costs more than attending to everything with the
skipped blocks masked: measured on a 2-core CPU, the fused kernel with a ``-inf`` mask
costs 1.08-1.2x dense attention whatever the density, while the gather backend costs
about ``density`` x dense plus a per-block overhead that grows as blocks shrink; the two
cross at density 0.5 for 16-token query blocks (320 tokens, 4 heads, D=32) and 0.68-0.9
for 64-128-token blocks (1,000-4,096 tokens). The mask is built once per plan (and per
token order) and kept on it; calls whose full ``Sq x Skv`` mask would be large
(:data:`MASKED_MAX_ELEMENTS`) are left to the other backends.

Same contract as the reference; fp32, bf16 and fp16 on the CPU.
"""

from __future__ import annotations

import torch

from gen.kernels._checks import check_call, check_kv_mask

from .sdpa import FLASH_CPU, key_mask

__all__ = ["MASKED_MAX_ELEMENTS", "masked_attention", "masked_attention_in_order", "masked_min_density"]

#: Largest mask (``B|1 x H|1 x Sq x Skv`` elements of the plan) the backend builds and keeps:
#: 2**23 fp32 = 32 MiB.
MASKED_MAX_ELEMENTS = 1 << 23


def masked_min_density(block_m: int) -> float:
    """Plan density from which the masked dense call beats gathering blocks (measured
    crossovers above: 0.5 for 16-32-token query blocks, about 0.7 for 64-128)."""
    return 0.5 if block_m < 64 else 0.7


def _plan_bias(plan, dtype: torch.dtype, device: torch.device, perm=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(bias, empty)``: the plan as an additive mask ``(B|1, H|1, Sq, Skv)`` of 0 / -inf (in
    the original token order when ``perm`` is given), and the query rows that see no key
    (bool ``(B|1, H|1, Sq, 1)``, or None). Kept on the plan."""
    memo = plan.__dict__.setdefault("_masked_bias", {})
    # per inference mode: a mask made under it cannot be saved for backward outside it
    key = (id(perm), dtype, str(device), torch.is_inference_mode_enabled())
    got = memo.get(key)
    if got is not None and got[0] is perm:
        return got[1], got[2]
    visible = plan.to_token_mask().to(device)
    if perm is not None:
        inv = perm.inverse.to(device)
        visible = visible.index_select(-2, inv).index_select(-1, inv)
    bias = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    empty = ~visible.any(-1, keepdim=True)
    empty = empty if bool(empty.any()) else None
    memo[key] = (perm, bias, empty)
    return bias, empty


def _run(q, k, v, bias, empty, sm_scale, kv_ok, return_lse):
    bsz, heads, q_len, _ = q.shape
    if kv_ok is not None:
        bias = bias + torch.zeros(bsz, 1, 1, k.shape[2], dtype=bias.dtype, device=bias.device).masked_fill_(
            ~kv_ok[:, None, None, :], float("-inf"))
        empty = ~torch.isfinite(bias).any(-1, keepdim=True)
    out, lse = FLASH_CPU(q, k, v, attn_mask=bias.expand(bsz, heads, q_len, k.shape[2]), scale=sm_scale)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
        lse = lse.masked_fill(empty.squeeze(-1), float("-inf"))
    return (out, lse.float()) if return_lse else out


def masked_attention(q, k, v, plan, *, scale=None, kv_valid=None, kv_mask=None, return_lse=False, prechecked: bool = False):
    """Block-sparse attention as one fused dense call with the plan as a key mask. Same
    arguments and result as ``gen.attention.reference.block_sparse_attention``."""
    bsz, heads, q_len, kv_len, head_dim, sm_scale = check_call(q, k, v, plan, scale=scale, kv_valid=kv_valid,
                                                               kv_mask=kv_mask, prechecked=prechecked)
    bias, empty = _plan_bias(plan, q.dtype, q.device)
    return _run(q, k, v, bias, empty, sm_scale, key_mask(bsz, kv_len, kv_valid, kv_mask, q.device), return_lse)


def masked_attention_in_order(q, k, v, plan, perm, *, scale=None, kv_valid=None, kv_mask=None, return_lse=False):
    """:func:`masked_attention` for inputs in the original token order with a plan over
    ``perm``'s slots: the mask is permuted once (kept on the plan), the inputs never are.
    ``kv_mask``, if given, is over the slots."""
    bsz, heads, n, head_dim = q.shape
    sm_scale = check_call(q, k, v, plan, scale=scale, kv_valid=kv_valid, kv_mask=None, prechecked=True)[5]
    if kv_mask is not None:
        check_kv_mask(kv_mask, bsz, perm.n_out, q.device)
    bias, empty = _plan_bias(plan, q.dtype, q.device, perm)
    ok = None
    if kv_mask is not None:  # slot space -> token space
        kv_mask = kv_mask.to(q.device).expand(bsz, perm.n_out).index_select(-1, perm.inverse.to(q.device))
    if kv_valid is not None or kv_mask is not None:
        ok = key_mask(bsz, n, kv_valid, kv_mask, q.device)
    return _run(q, k, v, bias, empty, sm_scale, ok, return_lse)
