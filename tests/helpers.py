"""Independent references for the tests: dense masked attention in any precision."""

import torch


def dense_masked_attention(q, k, v, token_mask, *, scale=None, kv_valid=None, kv_mask=None, dtype=torch.float64):
    """Plain softmax attention over an explicit token mask, computed in ``dtype``.

    ``token_mask`` bool broadcastable to ``(B, H, Sq, Skv)``. Rows with no allowed key
    give zeros and lse = -inf (where plain softmax would give nan). Returns
    ``(out in dtype, lse in dtype)``.
    """
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) * scale
    mask = token_mask.expand(s.shape)
    if kv_valid is not None:
        pos = torch.arange(k.shape[2], device=k.device)
        mask = mask & (pos < kv_valid.view(-1, 1, 1, 1))
    if kv_mask is not None:
        mask = mask & kv_mask.view(-1, 1, 1, k.shape[2])
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    return p @ vd, lse


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in fp64 (0 when both are zero, inf when only ref is)."""
    out, ref = out.double(), ref.double()
    num, den = (out - ref).norm(), ref.norm()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / den)
