"""The pyramid-attention backends (op ``"pyramid"``, PSA), in order of preference:

* ``triton``: gen's kernel on CUDA (``gen.kernels.pyramid_attention``);
* ``masked``: small calls on the CPU: the pyramid levels stacked after the keys (``1.875·S``
  keys for levels 1-8) and the plan's levels as an additive mask (``ln n`` where a query
  block sees a pooled key at its block's level, ``-inf`` elsewhere), one call of torch's
  fused CPU attention, which also returns the LSE. The mask is ``B|1 x H|1 x Sq x
  (Skv + pooled)`` elements, so calls above :data:`PYRAMID_MASKED_MAX_ELEMENTS` are left to
  the reference;
* ``torch``: the PyTorch reference (``gen.attention.pyramid_reference``), which runs
  everything (fp64, any size, inside a compiled graph).
"""

from __future__ import annotations

import torch

from gen.kernels._checks import check_call

from ..pyramid_reference import pyramid_attention_reference
from .block_sparse import cpu_fused_can_run, triton_can_run, triton_worth_it
from .registry import Backend, Call, register
from .sdpa import FLASH_CPU

__all__ = ["PYRAMID_MASKED_MAX_ELEMENTS", "describe", "pyramid_masked"]

#: Largest additive mask (elements, ``B|1 x H|1 x Sq x (Skv + pooled keys)``) the ``masked``
#: backend builds for one call: 2**23 (32 MiB in fp32), as the block-sparse ``masked`` backend.
PYRAMID_MASKED_MAX_ELEMENTS = 1 << 23


def describe(q: torch.Tensor, k: torch.Tensor, plan, *, return_lse: bool = False) -> Call:
    """The :class:`Call` record of a pyramid call (no tensors, no device sync)."""
    return Call(device=q.device, dtype=q.dtype, batch=q.shape[0], heads=q.shape[1], q_len=q.shape[2],
                kv_len=k.shape[2], head_dim=q.shape[3], full=None, density=None, return_lse=return_lse,
                compiling=torch.compiler.is_compiling(), grad=torch.is_grad_enabled(), block_m=plan.block_m,
                mask_batch=plan.kv_counts.shape[0], mask_heads=plan.kv_counts.shape[1])


def _triton_can_run(call: Call) -> str | None:
    why = triton_can_run(call)
    if why is None and call.dtype == torch.float64:
        return "fp64 inputs: the kernel takes fp16, bf16 and fp32"
    if why is None and (call.head_dim % 16 or not 16 <= call.head_dim <= 256):
        return f"head_dim {call.head_dim}: the kernel needs a multiple of 16 in [16, 256]"
    return why


def _triton_run(q, k, v, plan, **kw):
    from gen.kernels.pyramid_attention import pyramid_attention

    return pyramid_attention(q, k, v, plan, **kw)


def _masked_can_run(call: Call) -> str | None:
    return cpu_fused_can_run(call, "the reference traces")


def _masked_worth_it(call: Call) -> str | None:
    # levels up to 8 add 7/8 of the keys; deeper pyramids add less than one more
    elements = call.mask_batch * call.mask_heads * call.q_len * 2 * call.kv_len
    if elements > PYRAMID_MASKED_MAX_ELEMENTS:
        return f"its ~{elements:.3g}-element mask would exceed {PYRAMID_MASKED_MAX_ELEMENTS:.3g}"
    return None


def _level_bias(plan, top: int, kv_len: int, kv_valid: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """fp32 ``(B', H|1, n_q_blocks, Skv + pooled)``: for each query block and each key of the
    stacked pyramid (level 1, then 2, 4, .. ``top``), ``ln n`` (``n`` valid tokens the key
    holds) where the block visits that key's block at that level, ``-inf`` elsewhere."""
    from ..pyramid import level_map

    lm = level_map(plan).to(device)  # (B|1, H|1, nq, nk)
    bn = plan.block_n
    limit = (torch.full((1,), kv_len, device=device) if kv_valid is None
             else kv_valid.to(device).long().clamp(max=kv_len))
    parts = []
    level = 1
    while level <= top:
        n = -(-kv_len // level)
        start = torch.arange(n, device=device) * level
        seen = lm.index_select(-1, start // bn) == level  # (B|1, H|1, nq, n)
        count = (limit.view(-1, 1) - start.view(1, -1)).clamp(0, level)  # (B|1, n)
        log_n = torch.where(count > 0, count.float().log(), float("-inf")).view(-1, 1, 1, n)
        parts.append(torch.where(seen, log_n, float("-inf")))
        level *= 2
    return torch.cat(parts, dim=-1)


def pyramid_masked(q, k, v, plan, *, scale=None, kv_valid=None, return_lse=False, max_level=None, **_ignored):
    """Pyramid attention as one fused CPU attention call over the stacked pyramid with the
    plan's levels as an additive mask. Same arguments and result as
    :func:`gen.attention.pyramid_reference.pyramid_attention_reference` (``tile_n`` is
    ignored); the caller (``gen.attention.pyramid``) has checked inputs and plan."""
    from gen.kernels.pyramid_attention import build_pyramid

    bsz, heads, q_len, kv_len, _, sm_scale = check_call(q, k, v, plan, scale=scale, kv_valid=kv_valid,
                                                        kv_mask=None, prechecked=True)
    top = plan.block_n if max_level is None else max_level
    kp, vp = build_pyramid(k, v, top, kv_valid)
    keys, vals = torch.cat([k, kp], dim=2), torch.cat([v, vp], dim=2)
    blocks = _level_bias(plan, top, kv_len, kv_valid, q.device).to(q.dtype)  # (B', H', nq, K)
    *lead, nq, n_keys = blocks.shape
    bias = blocks.unsqueeze(-2).expand(*lead, nq, plan.block_m, n_keys).reshape(*lead, nq * plan.block_m, n_keys)
    out, lse = FLASH_CPU(q, keys, vals, attn_mask=bias[..., :q_len, :].expand(bsz, heads, q_len, n_keys),
                         scale=sm_scale)
    empty = ~(blocks > float("-inf")).any(-1)  # query blocks that see no key: zeros, lse -inf
    if bool(empty.any()):
        rows = empty.repeat_interleave(plan.block_m, dim=-1)[..., :q_len]
        out = out.masked_fill(rows.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(rows, float("-inf"))
    return (out, lse.float()) if return_lse else out


register(Backend("triton", "pyramid", _triton_run, _triton_can_run, "gen's Triton pyramid kernel on CUDA",
                 triton_worth_it))
register(Backend("masked", "pyramid", pyramid_masked, _masked_can_run,
                 "small CPU calls: stacked pyramid, levels as a mask, torch's fused attention", _masked_worth_it))
register(Backend("torch", "pyramid", pyramid_attention_reference, lambda call: None,
                 "the PyTorch reference (runs anything)"))
