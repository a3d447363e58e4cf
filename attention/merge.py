"""Merging partial attention results over disjoint key sets by their log-sum-exp.

Attention of a query over keys ``A ∪ B`` (disjoint) is the softmax-weighted mix of the
attention over ``A`` and over ``B``: with ``l = logsumexp`` of each part,
``out = (o_A·e^{l_A} + o_B·e^{l_B}) / (e^{l_A} + e^{l_B})`` and
``l = log(e^{l_A} + e^{l_B})``. This is how sparse video keys and dense text keys are
combined without a kernel that knows about text.
"""

from __future__ import annotations

import torch

__all__ = ["merge_attention"]


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions of the same queries over disjoint key sets.

    Args:
        out_a, out_b: ``(B, H, S, D)`` outputs of each part (zeros where a row saw nothing).
        lse_a, lse_b: fp32 ``(B, H, S)`` natural-log log-sum-exp of each part (``-inf``
            where a row saw nothing).

    Returns:
        ``(out, lse)``: ``out`` in ``out_a.dtype``, ``lse`` fp32. Rows that saw nothing in
        either part stay zeros with ``lse = -inf``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    wa = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse)).unsqueeze(-1)
    wb = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse)).unsqueeze(-1)
    out = out_a.float() * wa + out_b.float() * wb
    return out.to(out_a.dtype), lse
