"""Sparse self-attention processor for ``WanTransformer3DModel`` (T2V and I2V).

Installed on each block's ``attn1`` (self-attention over the video tokens). ``attn2``
(cross-attention to text, and in I2V the image-context branch) keeps its stock
processor. Math before and after the attention call is the stock ``WanAttnProcessor``'s
in diffusers 0.42: fused or separate QKV projections, RMSNorm across heads before the
head split, interleaved-pair RoPE from ``rotary_emb``, ``to_out``.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from .base import SparseAttnProcessorBase

__all__ = ["WanSparseAttnProcessor"]


def _apply_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's RoPE on interleaved (even, odd) pairs; (B, S, H, D) with tables (1, S, 1, D)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseAttnProcessor(SparseAttnProcessorBase):
    """Drop-in for ``WanAttnProcessor`` on ``attn1``; same call signature."""

    def __init__(self, method, run, layer_index):
        super().__init__(method, run, layer_index)
        self._stock = WanAttnProcessor()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            # cross-attention is never sparsified
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary(query, *rotary_emb)
            key = _apply_rotary(key, *rotary_emb)
        hidden_states = self._attend(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
