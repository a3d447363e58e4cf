"""Dense plans through torch's own attention: ``scaled_dot_product_attention``.

When a plan visits every block, block-sparse attention is plain attention with at most a
key mask, and nothing beats the library's fused kernel: on the CPU it is the same
flash-style kernel stock diffusers attention runs, so gen's ``dense`` method costs what
stock attention costs. The log-sum-exp (needed to merge joint text) comes from the
same call: ``aten._scaled_dot_product_flash_attention_for_cpu`` returns it next to the
output, so no ``S x S`` matrix is ever materialised. Where that op is missing the LSE
is computed in query chunks (bounded memory).

Same contract as the reference: padding (``kv_valid``) and ``kv_mask`` become an additive
key mask; rows that see no valid key give zeros and ``lse = -inf``.
"""

from __future__ import annotations

import torch

from gen.kernels._checks import check_call

__all__ = ["FLASH_CPU", "dense_attention", "flash_cpu_available", "key_blocks", "key_mask"]

#: torch's fused CPU attention that returns the LSE beside the output (None if missing)
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# query rows per chunk when the LSE has to be computed apart (rows x keys fp32 scores)
_LSE_CHUNK_ELEMENTS = 1 << 24


def flash_cpu_available() -> str | None:
    """None when torch's fused CPU attention with LSE is available, else why not."""
    if FLASH_CPU is None:
        return f"torch {torch.__version__} has no aten._scaled_dot_product_flash_attention_for_cpu"
    return None


def key_mask(batch: int, kv_len: int, kv_valid: torch.Tensor | None, kv_mask: torch.Tensor | None,
             device: torch.device) -> torch.Tensor | None:
    """Valid keys as a bool ``(B, Skv)`` (None when every key is valid)."""
    if kv_valid is None and kv_mask is None:
        return None
    ok = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    if kv_valid is not None:
        ok &= torch.arange(kv_len, device=device) < kv_valid.to(device).long()[:, None]
    if kv_mask is not None:
        ok &= kv_mask.to(device).expand(batch, kv_len)
    return ok


def key_blocks(key_ok: torch.Tensor | None, kv_len: int, n_blocks: int, block: int,
               device: torch.device) -> torch.Tensor:
    """Valid keys per key block, bool ``(B|1, n_blocks, block)``, from :func:`key_mask`'s
    ``(B, Skv)`` (None: every key valid); slots past ``kv_len`` (a ragged end) are False."""
    ok = torch.ones(1, kv_len, dtype=torch.bool, device=device) if key_ok is None else key_ok
    return torch.nn.functional.pad(ok, (0, n_blocks * block - kv_len)).view(ok.shape[0], n_blocks, block)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    prechecked: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q (B, H, Sq, D)`` over every key of ``k, v (B, H, Skv, D)`` with
    torch's fused kernel; ``plan`` must visit every block (checked by the chooser, which
    only picks this backend for full plans). Same arguments and result as
    ``gen.attention.reference.block_sparse_attention`` (``prechecked``: the caller checked
    inputs and plan, as the dispatch does; only padding, key mask and scale are checked)."""
    bsz, heads, q_len, kv_len, head_dim, sm_scale = check_call(q, k, v, plan, scale=scale, kv_valid=kv_valid,
                                                               kv_mask=kv_mask, prechecked=prechecked)
    ok = key_mask(bsz, kv_len, kv_valid, kv_mask, q.device)
    bias = None
    if ok is not None:
        bias = torch.zeros(bsz, 1, 1, kv_len, dtype=q.dtype, device=q.device).masked_fill(
            ~ok[:, None, None, :], float("-inf"))
    if q.device.type == "cpu" and FLASH_CPU is not None:
        out, lse = FLASH_CPU(q, k, v, attn_mask=bias, scale=sm_scale)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=sm_scale)
        lse = _chunked_lse(q, k, sm_scale, bias) if return_lse else None
    if ok is not None:
        # samples whose every key is masked: zeros, lse = -inf (no host sync: compile-safe)
        empty = ~ok.any(-1)
        out = out.masked_fill(empty[:, None, None, None], 0.0)
        if lse is not None:
            lse = lse.masked_fill(empty[:, None, None], float("-inf"))
    if return_lse:
        return out, lse.float()
    return out


def _chunked_lse(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    rows = max(1, _LSE_CHUNK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
    parts = []
    for start in range(0, q.shape[2], rows):
        s = torch.matmul(q[:, :, start:start + rows].float(), k.float().transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias.float()
        parts.append(torch.logsumexp(s, dim=-1))
    return torch.cat(parts, dim=2)
