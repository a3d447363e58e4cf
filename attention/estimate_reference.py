"""Pure-PyTorch block estimation: the oracle of the estimation kernels and their CPU backend.

Dynamic methods (Rectified SpaAttn first) decide their plan from each call's ``q`` and
``k`` by looking at block means. Two operations, each also a Triton kernel
(``gen.kernels.block_estimate``) with exactly this contract:

* :func:`block_stats`: per block of ``block`` consecutive tokens, the mean of the valid
  tokens and the mean absolute deviation from that mean (valid tokens only: the true
  mean of a ragged or padded block, not a mean that counts zero padding).
* :func:`select_blocks`: from the pooled logits of one query block against every key
  block (and an optional text column), the softmax, the cumulative-mass selection
  (top-p with a floor of ``top_k`` blocks), the union with forced blocks, and the
  rectification terms ``R`` and the weights of ``C``, returning the selection as a
  ready ``BlockPlan`` index (no host synchronisation: the index is ``n_kv_blocks`` wide).

Everything is vectorised over blocks (no Python loop over blocks, no ``.item()``), so
it also traces into a compiled graph.
"""

from __future__ import annotations

import torch

__all__ = ["block_stats", "select_blocks"]


def block_stats(x: torch.Tensor, block: int, valid: torch.Tensor | None = None,
                deviation: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Block means (and mean absolute deviations) of ``x`` over valid tokens.

    Args:
        x: ``(B, H, S, D)``, any float dtype, any strides.
        block: tokens per block (> 0); ``nb = ceil(S / block)``, the last block may be short.
        valid: optional bool ``(S,)``; tokens flagged False (padding slots) are left out.
        deviation: also return the mean absolute deviation.

    Returns:
        ``mean`` fp32 ``(B, H, nb, D)``: mean of the block's valid tokens (0 for a block
        with none); ``absdev`` fp32 ``(B, H, nb, D)`` (or None): mean over the block's
        valid tokens of ``|x - mean|``; ``count`` fp32 ``(nb,)``: valid tokens per block.
    """
    b, h, s, d = x.shape
    nb = -(-s // block)
    pad = nb * block - s
    w = torch.ones(s, dtype=torch.float32, device=x.device) if valid is None else valid.to(x.device, torch.float32)
    xf = x.float() * w.view(1, 1, s, 1)
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
        w = torch.nn.functional.pad(w, (0, pad))
    wb = w.view(nb, block)
    count = wb.sum(-1)
    denom = count.clamp(min=1.0).view(1, 1, nb, 1)
    mean = xf.view(b, h, nb, block, d).sum(3) / denom
    absdev = None
    if deviation:
        dev = (xf.view(b, h, nb, block, d) - mean.unsqueeze(3)).abs() * wb.view(1, 1, nb, block, 1)
        absdev = dev.sum(3) / denom
    return mean, absdev, count


def select_blocks(logits: torch.Tensor, text_logit: torch.Tensor | None, rectifiable: torch.Tensor,
                  forced: torch.Tensor, p: float, top_k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cumulative-mass block selection with rectification terms, per query block.

    Args:
        logits: fp32 ``(B, H, nq, nk)``: pooled logit of query block ``i`` against key
            block ``j``, ``q̄_i·k̄_j·scale + log(count_j)`` (``-inf`` for a key block with no
            valid token), so the softmax weighs a block by the tokens it stands for.
        text_logit: fp32 ``(B, H, nq)`` or None: ``logsumexp`` over the valid text keys of
            ``q̄_i·k_t·scale`` (text keys stay individual); ``-inf`` when none is valid.
        rectifiable: bool ``(B, H, nq, nk)``: a dropped block whose mass may be moved to
            the compensation ``C`` (GAPR's gain beats its error); the others are ignored.
        forced: bool ``(nq, nk)``: blocks always selected (neighbours, first frame).
        p: cumulative-mass threshold (``>= 1`` selects everything).
        top_k: least number of key blocks selected per query block (beyond ``forced``).

    Semantics: ``P = softmax([logits, text_logit])`` over the row; the text column is
    always selected and counts first in the cumulative mass. Video blocks sorted by
    ``P`` descending are kept while the mass before them is ``<= p`` (that is, while the
    cumulative mass is ``<= p``, plus one more), and at least ``top_k``; ties at the
    threshold are all kept. Selected = kept ∪ forced. ``E`` = selected ∪ ¬rectifiable.

    Returns:
        ``kv_indices`` int32 ``(B, H, nq, nk)``: the selected key blocks ascending, then
        padding repeating the last one (0 for an empty row); ``kv_counts`` int32
        ``(B, H, nq)``; ``r`` fp32 ``(B, H, nq)``: ``P_text + Σ_{j∈E} P_j``; ``weights``
        fp32 ``(B, H, nq, nk)``: ``P_j`` for ``j ∉ E``, else 0 (so ``C = weights @ v̄``).
    """
    nk = logits.shape[-1]
    logits = logits.float()
    if text_logit is None:
        text_logit = torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
    full = torch.cat([logits, text_logit.float().unsqueeze(-1)], dim=-1)
    top = full.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row with no key: P = 0
    e = torch.exp(full - top)
    prob = e / e.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    pv, pt = prob[..., :nk], prob[..., nk]
    ordered = pv.sort(-1, descending=True).values
    before = pt.unsqueeze(-1) + ordered.cumsum(-1) - ordered  # mass before each sorted block
    kept = (before <= p).sum(-1)
    if p >= 1:
        kept = torch.full_like(kept, nk)
    count = kept.clamp(min=min(max(int(top_k), 0), nk))
    thresh = ordered.gather(-1, (count - 1).clamp(min=0).unsqueeze(-1))
    chosen = (pv >= thresh) & (count > 0).unsqueeze(-1)
    selected = chosen | forced.to(torch.bool)
    e_set = selected | ~rectifiable
    r = pt + (pv * e_set).sum(-1)
    weights = pv * ~e_set
    counts = selected.sum(-1, dtype=torch.int32)
    # stable sort of ~selected puts the selected indices first, ascending
    order = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices
    last = order.gather(-1, (counts.long() - 1).clamp(min=0).unsqueeze(-1))
    last = torch.where(counts.unsqueeze(-1) > 0, last, torch.zeros_like(last))
    used = torch.arange(nk, device=logits.device) < counts.unsqueeze(-1)
    indices = torch.where(used, order, last).to(torch.int32)
    return indices.contiguous(), counts.contiguous(), r, weights
