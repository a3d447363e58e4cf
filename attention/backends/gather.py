"""Sparse plans on the CPU through torch's fused attention, on gathered key blocks.

For a chunk of query blocks, the key/value blocks each one visits are gathered into one
``(visits x block_n)`` row (``index_select``-style, O(S · visits) memory like the
reference), padded visits and invalid keys get a ``-inf`` bias, and torch's fused CPU
attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``: blocked online
softmax, multi-threaded, the LSE beside the output) runs every query block of the chunk
as one batched call. The work is ``max_visits / n_kv_blocks`` of dense attention, plus
the gather (``1 / (4 · block_m)`` of the FLOPs in bytes moved).

Same contract as the reference; fp32, bf16 and fp16.
"""

from __future__ import annotations

import torch

from gen.kernels._checks import check_call

from .sdpa import FLASH_CPU, key_blocks, key_mask

__all__ = ["gathered_attention"]

# gathered key + value elements held at once per chunk (2**24 fp32 = 64 MiB)
_GATHER_BUDGET = 1 << 24


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    budget: int = _GATHER_BUDGET,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention by gathering each query block's visited key blocks and
    running torch's fused CPU attention on them. Same arguments and result as
    ``gen.attention.reference.block_sparse_attention`` (``budget``: most gathered key +
    value elements held at once)."""
    bsz, heads, q_len, kv_len, head_dim, sm_scale = check_call(q, k, v, plan, scale=scale, kv_valid=kv_valid,
                                                               kv_mask=kv_mask)
    bm, bn = plan.block_m, plan.block_n
    nq, nk, visits = plan.n_q_blocks, plan.n_kv_blocks, plan.max_visits
    dev, dt = q.device, q.dtype

    def blocks(x: torch.Tensor, size: int, n: int) -> torch.Tensor:
        pad = n * size - x.shape[2]
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(bsz, heads, n, size, head_dim)

    qb, kb, vb = blocks(q, bm, nq), blocks(k, bn, nk), blocks(v, bn, nk)
    idx = plan.kv_indices.long().expand(bsz, heads, nq, visits)
    cnt = plan.kv_counts.long().expand(bsz, heads, nq)
    okb = key_blocks(key_mask(bsz, kv_len, kv_valid, kv_mask, dev), kv_len, nk, bn, dev).expand(bsz, nk, bn)
    bi = torch.arange(bsz, device=dev).view(bsz, 1, 1, 1)
    hi = torch.arange(heads, device=dev).view(1, heads, 1, 1)

    out = torch.empty(bsz, heads, nq, bm, head_dim, dtype=dt, device=dev)
    lse = torch.empty(bsz, heads, nq, bm, dtype=torch.float32, device=dev)
    chunk = max(1, budget // max(1, 2 * bsz * heads * max(visits, 1) * bn * head_dim))
    for start in range(0, nq, chunk):
        sl = slice(start, min(nq, start + chunk))
        c = sl.stop - sl.start
        ci = idx[:, :, sl]  # (B, H, c, V)
        used = torch.arange(visits, device=dev) < cnt[:, :, sl, None]  # (B, H, c, V)
        valid = (used[..., None] & okb[bi, ci]).reshape(bsz, heads * c, 1, visits * bn)
        kg = kb[bi, hi, ci].reshape(bsz, heads * c, visits * bn, head_dim)
        vg = vb[bi, hi, ci].reshape(bsz, heads * c, visits * bn, head_dim)
        # no mask at all when every gathered key counts (the fused kernel is faster without)
        bias = None if bool(valid.all()) else torch.zeros(valid.shape, dtype=dt, device=dev).masked_fill_(
            ~valid, float("-inf"))
        qq = qb[:, :, sl].reshape(bsz, heads * c, bm, head_dim)
        if visits == 0:
            o = torch.zeros_like(qq)
            lo = torch.full(qq.shape[:3], float("-inf"), device=dev)
        else:
            o, lo = FLASH_CPU(qq, kg, vg, attn_mask=bias, scale=sm_scale)
        empty = ~valid.any(-1)  # (B, H*c, 1): rows of a query block that see nothing
        if bool(empty.any()):
            o = o.masked_fill(empty[..., None], 0.0)
            lo = lo.masked_fill(empty, float("-inf"))
        out[:, :, sl] = o.view(bsz, heads, c, bm, head_dim)
        lse[:, :, sl] = lo.view(bsz, heads, c, bm).float()

    out = out.reshape(bsz, heads, nq * bm, head_dim)[:, :, :q_len].contiguous()
    if return_lse:
        return out, lse.reshape(bsz, heads, nq * bm)[:, :, :q_len].contiguous()
    return out
