"""Pure-PyTorch pyramid block-sparse attention: the oracle of ``gen.kernels.pyramid_attention``
and its CPU backend.

Semantics (PSA's pyramid, written out; the kernel's module docstring has the same contract):
each visit of key block ``j`` by query block ``i`` carries a level ``L`` (a power of two in
``[1, block_n]``, ``plan.visit_data["level"]``). At level ``L`` the block's keys and
values are replaced by ``block_n / L`` pooled ones, the means of ``L`` adjacent tokens,
and each pooled logit gets ``+ ln n`` for the ``n`` valid tokens it averages (``ln L``
inside the sequence; fewer at the valid end; a group with no valid token is ignored).
One softmax runs over everything a query row visits, at every level.

Memory stays ``O(S · visits)``: per chunk of query blocks, the visited blocks of each
level are gathered from that level's pooled keys (at most ``2 · block_n`` keys a visit
over all levels) and scored; no ``S x S`` matrix. Math in fp32 (fp64 for fp64 inputs).
Written independently of the kernel: the pooled keys here are direct means over each
group, not the kernel's concatenated pyramid.
"""

from __future__ import annotations

import torch

from gen.kernels._checks import check_call

__all__ = ["check_levels", "pyramid_attention_reference"]

_SCORE_BUDGET = 1 << 26


def check_levels(plan, max_level: int | None = None) -> None:
    """Raise ``ValueError`` unless every used visit's level is a power of two in
    ``[1, max_level]`` (default ``block_n``). One device sync: for eager calls."""
    level = getattr(plan, "visit_data", {}).get("level")
    if level is None or tuple(level.shape) != tuple(plan.kv_indices.shape):
        raise ValueError("the plan has no per-visit levels: pyramid attention needs "
                         "plan.visit_data['level'] shaped like kv_indices.")
    if level.dtype.is_floating_point or level.dtype == torch.bool:
        raise ValueError(f"plan.visit_data['level'] must hold integers, got {level.dtype}.")
    top = plan.block_n if max_level is None else max_level
    used = torch.arange(level.shape[-1], device=level.device) < plan.kv_counts.unsqueeze(-1)
    lv = level[used].long()
    if lv.numel() == 0:
        return
    bad = (lv < 1) | (lv > top) | ((lv & (lv - 1)) != 0)
    if bool(bad.any()):
        wrong = sorted(set(lv[bad].tolist()))[:8]
        raise ValueError(f"visit levels must be powers of two in [1, {top}]; the plan has {wrong}.")


def _pooled(x: torch.Tensor, level: int, n_blocks: int, block_n: int, keep: torch.Tensor,
            cdtype: torch.dtype) -> torch.Tensor:
    """``(B, H, n_blocks, block_n // level, D)``: means of the valid tokens of each group of
    ``level`` (``keep`` float ``(B, S)``, 1 for valid), 0 for an empty group."""
    b, h, s, d = x.shape
    pad = n_blocks * block_n - s
    xf = x.to(cdtype) * keep.view(b, 1, s, 1).to(cdtype)
    w = keep.to(cdtype)
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
        w = torch.nn.functional.pad(w, (0, pad))
    per = block_n // level
    sums = xf.view(b, h, n_blocks, per, level, d).sum(4)
    counts = w.view(b, 1, n_blocks, per, level).sum(-1)
    return sums / counts.clamp(min=1).unsqueeze(-1)


def pyramid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    return_lse: bool = False,
    max_level: int | None = None,
    score_budget: int = _SCORE_BUDGET,
    **_ignored,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pyramid block-sparse attention in PyTorch (same contract as the Triton kernel).

    Args:
        q: ``(B, H, Sq, D)``; fp16, bf16, fp32 or fp64.
        k, v: ``(B, H, Skv, D)``, same dtype and device.
        plan: ``gen.attention.BlockPlan`` for ``Sq``/``Skv`` with ``visit_data["level"]``
            (int, shaped like ``kv_indices``): each used visit's level, a power of two
            in ``[1, block_n]``.
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_valid: optional int ``(B,)``: keys at positions ``>= kv_valid[b]`` are ignored
            and left out of the pooled means.
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.
        max_level: visits with a higher level are skipped (the kernel's pyramid ends
            there); default ``block_n`` (none skipped).
        score_budget: most score + gathered key/value elements held at once.
        **_ignored: kernel-only options (``tile_n``) are accepted and ignored.

    Returns:
        ``out (B, H, Sq, D)`` in ``q.dtype`` (and ``lse``); rows with no valid key give
        zeros and ``lse = -inf``.
    """
    bsz, heads, q_len, kv_len, head_dim, sm_scale = check_call(
        q, k, v, plan, scale=scale, kv_valid=kv_valid, kv_mask=None,
        allowed_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    )
    level = plan.visit_data.get("level") if hasattr(plan, "visit_data") else None
    if level is None or tuple(level.shape) != tuple(plan.kv_indices.shape):
        raise ValueError("the plan has no per-visit levels: pyramid attention needs "
                         "plan.visit_data['level'] shaped like kv_indices.")
    bm, bn = plan.block_m, plan.block_n
    top = bn if max_level is None else min(bn, max_level)
    nq, nk = plan.kv_counts.shape[2], -(-kv_len // bn)
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device

    limit = torch.full((bsz,), kv_len, device=dev) if kv_valid is None else kv_valid.to(dev).long().clamp(max=kv_len)
    pos = torch.arange(kv_len, device=dev)
    keep = (pos.view(1, -1) < limit.view(-1, 1)).to(cdtype)  # (B, Skv)
    levels = []
    lv = 1
    while lv <= top:
        levels.append(lv)
        lv *= 2
    pooled = {}
    for lv in levels:
        per = bn // lv
        starts = (torch.arange(nk, device=dev).view(nk, 1) * bn + torch.arange(per, device=dev).view(1, per) * lv)
        n_tok = (limit.view(bsz, 1, 1) - starts.view(1, nk, per)).clamp(0, lv)  # (B, nk, per)
        bias = torch.where(n_tok > 0, torch.log(n_tok.clamp(min=1).to(cdtype)),
                           torch.tensor(float("-inf"), dtype=cdtype, device=dev))
        pooled[lv] = (_pooled(k, lv, nk, bn, keep, cdtype), _pooled(v, lv, nk, bn, keep, cdtype), bias)

    qpad = nq * bm - q_len
    qb = q.to(cdtype)
    if qpad:
        qb = torch.nn.functional.pad(qb, (0, 0, 0, qpad))
    qb = qb.reshape(bsz, heads, nq, bm, head_dim)
    idx = plan.kv_indices.long().expand(bsz, heads, nq, -1)
    cnt = plan.kv_counts.long().expand(bsz, heads, nq)
    lvl = level.long().expand(bsz, heads, nq, -1)
    visits = idx.shape[-1]
    bi = torch.arange(bsz, device=dev).view(bsz, 1, 1, 1)
    hi = torch.arange(heads, device=dev).view(1, heads, 1, 1)

    out = torch.empty(bsz, heads, nq, bm, head_dim, dtype=cdtype, device=dev)
    lse = torch.empty(bsz, heads, nq, bm, dtype=cdtype, device=dev)
    keys_per_visit = sum(bn // lv for lv in levels)
    per_block = bsz * heads * max(visits, 1) * keys_per_visit * (bm + 2 * head_dim)
    chunk = max(1, score_budget // per_block)
    for start in range(0, nq, chunk):
        sl = slice(start, min(nq, start + chunk))
        ci = idx[:, :, sl]  # (B, H, c, V)
        used = torch.arange(visits, device=dev) < cnt[:, :, sl, None]
        scores, values = [], []
        for lv in levels:
            kp, vp, bias = pooled[lv]
            on = used & (lvl[:, :, sl] == lv)  # (B, H, c, V)
            kg, vg = kp[bi, hi, ci], vp[bi, hi, ci]  # (B, H, c, V, per, D)
            bg = bias[bi, ci]  # (B, H, c, V, per)
            s = torch.einsum("bhcmd,bhcvnd->bhcmvn", qb[:, :, sl], kg) * sm_scale + bg.unsqueeze(3)
            s = s.masked_fill(~on[:, :, :, None, :, None], float("-inf"))
            scores.append(s.flatten(-2))  # (B, H, c, bm, V*per)
            values.append(vg.flatten(3, 4))  # (B, H, c, V*per, D)
        s = torch.cat(scores, dim=-1)
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
        out[:, :, sl] = torch.einsum("bhcmk,bhckd->bhcmd", p, torch.cat(values, dim=3))
        lse[:, :, sl] = row_lse

    out = out.reshape(bsz, heads, nq * bm, head_dim)[:, :, :q_len].to(q.dtype).contiguous()
    if return_lse:
        return out, lse.reshape(bsz, heads, nq * bm)[:, :, :q_len].float().contiguous()
    return out
