"""Pure-PyTorch emulation of the INT8 block-sparse attention (PARO): the oracle of
``gen.kernels.quant_attention`` and the CPU path.

Quantization is bit-exact with the Triton kernel:

* Q: one fp32 scale per :data:`Q_GROUP` (32) consecutive tokens of one (batch, head), K:
  one per :data:`K_GROUP` (64), each over all ``D`` channels; ``scale = amax(|x|) / 127``
  (IEEE fp32 division); ``x_int8 = round(x / scale)`` half to even (``torch.round``),
  clamped to ``[-127, 127]``. The ragged last group covers the tokens that exist.
* V (``int8-pv``): one scale per 64 keys *and per channel*, ``(B, H, ceil(Skv/64), D)``.
* A scale of 0 (an all-zero group, or ``amax/127`` underflowing) becomes 1 with integers 0.
* Keys ignored by ``kv_valid``/``kv_mask`` are left out of the amax and quantize to 0.

Attention follows the kernel's arithmetic in fp32: the int32 logits (exact in fp32: at
most ``127·127·256 < 2^24``) times ``(q_scale · softmax_scale · log2 e) · k_scale``,
``exp2`` against the row max; ``int8`` multiplies fp32 ``P`` with V in fp32; ``int8-pv``
quantizes ``P`` to ``round(127·P)`` (0..127) against the *row* max, multiplies it with the
dequantized V and divides by ``sum(round(127·P))``, with ``lse = m + ln(sum/127)``. (The
kernel quantizes ``P`` against the running max of its online softmax, so its ``int8-pv``
output differs from this one by up to the P quantization step; ``int8`` agrees to fp32
rounding.)

Memory stays O(S · visits) as in :mod:`gen.attention.reference`: per chunk of query
blocks the visited key/value blocks are gathered, never an ``S x S`` matrix.
"""

from __future__ import annotations

import math

import torch

from gen.kernels._checks import check_call, check_kv_mask, check_kv_valid, check_qkv

__all__ = [
    "K_GROUP",
    "QUANT_MODES",
    "Q_GROUP",
    "V_GROUP",
    "dequantize",
    "quant_block_sparse_attention_reference",
    "quantize_groups",
    "quantize_qk_reference",
    "quantize_v_reference",
]

Q_GROUP = 32
K_GROUP = 64
V_GROUP = 64
#: ``quant`` values: INT8 QK with V in its dtype; INT8 QK and PV; no quantization
QUANT_MODES = ("int8", "int8-pv", "none")

_LOG2E = 1.4426950408889634
_SCORE_BUDGET = 1 << 26
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _row_ok(bsz: int, seq: int, kv_valid: torch.Tensor | None, kv_mask: torch.Tensor | None,
            device: torch.device) -> torch.Tensor | None:
    """bool ``(B, S)``: the keys that take part (None: all)."""
    if kv_valid is None and kv_mask is None:
        return None
    ok = torch.ones(bsz, seq, dtype=torch.bool, device=device)
    if kv_valid is not None:
        ok = ok & (torch.arange(seq, device=device) < kv_valid.to(device).long().view(-1, 1))
    if kv_mask is not None:
        ok = ok & kv_mask.to(device).expand(bsz, seq)
    return ok


def quantize_groups(x: torch.Tensor, group: int, *, per_channel: bool = False,
                    row_ok: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x (B, H, S, D)`` in groups of ``group`` consecutive tokens.

    Args:
        x: fp16/bf16/fp32 (read as fp32).
        group: tokens per scale.
        per_channel: one scale per (group, channel) instead of per group.
        row_ok: optional bool ``(B, S)``: tokens flagged False count as zeros.

    Returns:
        ``(x_int8 (B, H, S, D) contiguous, scale fp32 (B, H, ceil(S/group)[, D]))``.
    """
    bsz, heads, seq, dim = x.shape
    n = -(-seq // group)
    xf = x.float()
    if row_ok is not None:
        xf = xf.masked_fill(~row_ok.view(bsz, 1, seq, 1), 0.0)
    xf = torch.nn.functional.pad(xf, (0, 0, 0, n * group - seq)).reshape(bsz, heads, n, group, dim)
    if per_channel:
        scale = xf.abs().amax(dim=3) / 127.0  # (B, H, n, D)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        y = xf / scale.unsqueeze(3)
    else:
        scale = xf.abs().amax(dim=(3, 4)) / 127.0  # (B, H, n)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        y = xf / scale[..., None, None]
    y = torch.round(y).clamp_(-127, 127).to(torch.int8)
    return y.reshape(bsz, heads, n * group, dim)[:, :, :seq].contiguous(), scale.contiguous()


def quantize_qk_reference(q: torch.Tensor, k: torch.Tensor, *, kv_valid: torch.Tensor | None = None,
                          kv_mask: torch.Tensor | None = None):
    """``(q_int8, q_scale, k_int8, k_scale)``: Q per 32 tokens, K per 64 (see the module
    docstring); shapes ``(B, H, S, D)`` int8 and fp32 ``(B, H, ceil(Sq/32))``,
    ``(B, H, ceil(Skv/64))``."""
    bsz, _, _, kv_len, _ = check_qkv(q, k, k, allowed_dtypes=_DTYPES)
    check_kv_valid(kv_valid, bsz, kv_len, q.device)
    check_kv_mask(kv_mask, bsz, kv_len, q.device)
    qi, qs = quantize_groups(q, Q_GROUP)
    ki, ks = quantize_groups(k, K_GROUP, row_ok=_row_ok(bsz, kv_len, kv_valid, kv_mask, k.device))
    return qi, qs, ki, ks


def quantize_v_reference(v: torch.Tensor, *, kv_valid: torch.Tensor | None = None,
                         kv_mask: torch.Tensor | None = None):
    """``(v_int8 (B, H, Skv, D), v_scale fp32 (B, H, ceil(Skv/64), D))``: one scale per
    64 keys and channel."""
    bsz, _, kv_len, _ = v.shape
    return quantize_groups(v, V_GROUP, per_channel=True, row_ok=_row_ok(bsz, kv_len, kv_valid, kv_mask, v.device))


def dequantize(x_int8: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 ``x_int8 · scale`` with each token's group scale (per group ``(B, H, G)`` or per
    group and channel ``(B, H, G, D)``)."""
    seq = x_int8.shape[2]
    if scale.dim() == 3:
        per_token = scale.repeat_interleave(group, dim=2)[:, :, :seq, None]
    else:
        per_token = scale.repeat_interleave(group, dim=2)[:, :, :seq]
    return x_int8.float() * per_token


def quant_block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    quant: str = "int8",
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    score_budget: int = _SCORE_BUDGET,
    **_ignored,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """INT8 block-sparse attention in PyTorch (fp32 math), the kernel's contract.

    Args:
        q: ``(B, H, Sq, D)``; k, v ``(B, H, Skv, D)``; fp16/bf16/fp32 (any ``D``).
        plan: ``BlockPlan`` for ``Sq``/``Skv`` (any block sizes).
        quant: ``"int8"``, ``"int8-pv"`` or ``"none"`` (plain fp32 reference).
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_valid: optional int ``(B,)``; kv_mask: optional bool ``(Skv,)``/``(B, Skv)``.
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.
        score_budget: most score + gathered k/v elements held at once (memory knob).

    Returns:
        ``out (B, H, Sq, D)`` in ``q.dtype`` (and ``lse``); rows that see no valid key give
        zeros and ``lse = -inf``.
    """
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quant {quant!r}; use one of {', '.join(QUANT_MODES)}.")
    bsz, heads, q_len, kv_len, head_dim, sm_scale = check_call(
        q, k, v, plan, scale=scale, kv_valid=kv_valid, kv_mask=kv_mask, allowed_dtypes=_DTYPES)
    if quant == "none":
        from .reference import block_sparse_attention

        return block_sparse_attention(q, k, v, plan, scale=sm_scale, kv_valid=kv_valid, kv_mask=kv_mask,
                                      return_lse=return_lse, score_budget=score_budget)
    dev = q.device
    key_ok = _row_ok(bsz, kv_len, kv_valid, kv_mask, dev)
    qi, qs, ki, ks = quantize_qk_reference(q, k, kv_valid=kv_valid, kv_mask=kv_mask)
    # per query row: q_scale · softmax scale · log2(e) (fp32, as the kernel's q_fac)
    q_fac = qs.repeat_interleave(Q_GROUP, dim=2)[:, :, :q_len] * torch.tensor(sm_scale * _LOG2E, dtype=torch.float32)
    k_fac = ks.repeat_interleave(K_GROUP, dim=2)[:, :, :kv_len]
    pv_int8 = quant == "int8-pv"
    if pv_int8:
        vi, vs = quantize_v_reference(v, kv_valid=kv_valid, kv_mask=kv_mask)
        vals = dequantize(vi, vs, V_GROUP)
    else:
        vals = v.float()

    bm, bn = plan.block_m, plan.block_n
    nq, nk = plan.kv_counts.shape[2], -(-kv_len // bn)

    def blocks(x: torch.Tensor, size: int, n: int) -> torch.Tensor:
        # (B, H, S, ...) -> (B, H, n, size, ...), zero-padded at the ragged end
        pad = n * size - x.shape[2]
        x = x.float()
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
        return x.reshape(bsz, heads, n, size, *x.shape[3:])

    qb, kb, vb = blocks(qi, bm, nq), blocks(ki, bn, nk), blocks(vals, bn, nk)
    qfb, kfb = blocks(q_fac, bm, nq), blocks(k_fac, bn, nk)
    idx = plan.kv_indices.long().expand(bsz, heads, nq, -1)
    cnt = plan.kv_counts.long().expand(bsz, heads, nq)
    max_visits = idx.shape[-1]
    bi = torch.arange(bsz, device=dev).view(bsz, 1, 1, 1)
    hi = torch.arange(heads, device=dev).view(1, heads, 1, 1)
    offs = torch.arange(bn, device=dev)
    ok_pad = torch.ones(bsz, nk * bn, dtype=torch.bool, device=dev) if key_ok is None else key_ok
    ok_pad = torch.nn.functional.pad(ok_pad[:, :kv_len], (0, nk * bn - kv_len))  # False past the end

    out = torch.empty(bsz, heads, nq, bm, head_dim, dtype=torch.float32, device=dev)
    lse = torch.empty(bsz, heads, nq, bm, dtype=torch.float32, device=dev)
    per_block = bsz * heads * max(max_visits, 1) * bn * (bm + 2 * head_dim)
    chunk = max(1, score_budget // per_block)
    for start in range(0, nq, chunk):
        sl = slice(start, min(nq, start + chunk))
        ci = idx[:, :, sl]  # (B, H, c, V)
        kg, vg, kfg = kb[bi, hi, ci], vb[bi, hi, ci], kfb[bi, hi, ci]  # (B, H, c, V, bn[, D])
        used = torch.arange(max_visits, device=dev) < cnt[:, :, sl, None]
        pos = ci[..., None] * bn + offs  # (B, H, c, V, bn)
        ok = used[..., None] & ok_pad[bi.unsqueeze(-1), pos]
        # exact integer dot products (fp32 holds them exactly), then the kernel's factors
        s = torch.einsum("bhcmd,bhcvnd->bhcmvn", qb[:, :, sl], kg)
        r = qfb[:, :, sl][..., :, None, None] * kfg[:, :, :, None]  # (B, H, c, bm, V, bn)
        s = (s * r).masked_fill(~ok[:, :, :, None], float("-inf")).flatten(-2)
        m = s.amax(dim=-1)
        m_sub = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp2(s - m_sub[..., None])
        if pv_int8:
            p = torch.round(p * 127.0)
        l_sum = p.sum(-1)
        o = torch.einsum("bhcmk,bhckd->bhcmd", p, vg.flatten(3, 4))
        empty = l_sum == 0
        safe = torch.where(empty, torch.ones_like(l_sum), l_sum)
        out[:, :, sl] = o / safe[..., None]
        log_l = torch.log2(safe) - (math.log2(127.0) if pv_int8 else 0.0)
        lse[:, :, sl] = torch.where(empty, float("-inf"), (m_sub + log_l) * math.log(2.0))

    out = out.reshape(bsz, heads, nq * bm, head_dim)[:, :, :q_len].to(q.dtype).contiguous()
    if return_lse:
        return out, lse.reshape(bsz, heads, nq * bm)[:, :, :q_len].contiguous()
    return out
