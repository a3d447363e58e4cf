"""Pure-PyTorch block-sparse attention: the oracle in tests and the CPU backend.

Same signature and contract as ``gen.kernels.block_sparse_attention``. Math runs in
fp32 (fp64 when given fp64). Memory stays O(S · visits): for a chunk of query blocks
the visited key/value blocks are gathered (``[.., chunk, max_visits, block_n, D]``)
and scored, never an ``S x S`` matrix. The chunk is sized so the scores and gathered
keys/values of one chunk stay under ``score_budget`` elements.
"""

from __future__ import annotations

import torch

from gen.kernels._checks import check_call

__all__ = ["block_sparse_attention"]

# 2**26 fp32 scores = 256 MiB per chunk; enough to keep large-S CPU runs in a few
# chunks without ever holding S x S.
_SCORE_BUDGET = 1 << 26


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    score_budget: int = _SCORE_BUDGET,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention in PyTorch.

    Args:
        q: ``(B, H, Sq, D)``; fp16, bf16, fp32 or fp64.
        k, v: ``(B, H, Skv, D)``, same dtype and device.
        plan: ``gen.attention.BlockPlan`` for ``q_len=Sq, kv_len=Skv``.
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_valid: optional int ``(B,)`` number of valid keys per sample.
        kv_mask: optional bool ``(Skv,)`` or ``(B, Skv)``; keys flagged False are ignored.
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.
        score_budget: most score + gathered k/v elements held at once (memory knob).

    Returns:
        ``out (B, H, Sq, D)`` in ``q.dtype`` and optionally ``lse``; rows with no valid
        key give zeros and ``lse = -inf``.
    """
    bsz, heads, q_len, kv_len, head_dim, sm_scale = check_call(
        q, k, v, plan, scale=scale, kv_valid=kv_valid, kv_mask=kv_mask,
        allowed_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    )

    bm, bn = plan.block_m, plan.block_n
    nq, nk = plan.kv_counts.shape[2], -(-kv_len // bn)
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device

    def blocks(x: torch.Tensor, size: int, n: int) -> torch.Tensor:
        # (B, H, S, D) -> (B, H, n, size, D), zero-padded at the ragged end
        pad = n * size - x.shape[2]
        x = x.to(cdtype)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(bsz, heads, n, size, head_dim)

    qb, kb, vb = blocks(q, bm, nq), blocks(k, bn, nk), blocks(v, bn, nk)
    idx = plan.kv_indices.long().expand(bsz, heads, nq, -1)
    cnt = plan.kv_counts.long().expand(bsz, heads, nq)
    max_visits = idx.shape[-1]
    limit = torch.full((bsz,), kv_len, device=dev) if kv_valid is None else kv_valid.long()
    bi = torch.arange(bsz, device=dev).view(bsz, 1, 1, 1)
    hi = torch.arange(heads, device=dev).view(1, heads, 1, 1)
    offs = torch.arange(bn, device=dev)
    if kv_mask is not None:  # (B, nk * bn), False past the end
        key_ok = torch.nn.functional.pad(kv_mask.expand(bsz, kv_len), (0, nk * bn - kv_len))

    out = torch.empty(bsz, heads, nq, bm, head_dim, dtype=cdtype, device=dev)
    lse = torch.empty(bsz, heads, nq, bm, dtype=cdtype, device=dev)
    # per query block: scores (bm x V*bn) plus gathered keys and values (2 x V*bn x D)
    per_block = bsz * heads * max(max_visits, 1) * bn * (bm + 2 * head_dim)
    chunk = max(1, score_budget // per_block)
    for start in range(0, nq, chunk):
        sl = slice(start, min(nq, start + chunk))
        ci = idx[:, :, sl]  # (B, H, c, V)
        kg, vg = kb[bi, hi, ci], vb[bi, hi, ci]  # (B, H, c, V, bn, D)
        used = torch.arange(max_visits, device=dev) < cnt[:, :, sl, None]  # (B, H, c, V)
        pos = ci[..., None] * bn + offs  # (B, H, c, V, bn)
        ok = used[..., None] & (pos < limit.view(bsz, 1, 1, 1, 1))
        if kv_mask is not None:
            ok = ok & key_ok[bi.unsqueeze(-1), pos]
        s = torch.einsum("bhcmd,bhcvnd->bhcmvn", qb[:, :, sl], kg) * sm_scale
        s = s.masked_fill(~ok[:, :, :, None], float("-inf")).flatten(-2)  # (B, H, c, bm, V*bn)
        row_lse = torch.logsumexp(s, dim=-1)  # -inf where a row sees nothing
        p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
        out[:, :, sl] = torch.einsum("bhcmk,bhckd->bhcmd", p, vg.flatten(3, 4))
        lse[:, :, sl] = row_lse

    out = out.reshape(bsz, heads, nq * bm, head_dim)[:, :, :q_len].to(q.dtype).contiguous()
    if return_lse:
        return out, lse.reshape(bsz, heads, nq * bm)[:, :, :q_len].float().contiguous()
    return out
