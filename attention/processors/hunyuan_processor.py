"""Sparse joint-attention processor for ``HunyuanVideoTransformer3DModel``.

Installed on the dual-stream (``transformer_blocks.*.attn``) and single-stream
(``single_transformer_blocks.*.attn``) attention; the token refiner keeps its stock
processor. Joint order is video first, text last. Math around the attention call is
the stock ``HunyuanVideoAttnProcessor2_0``'s (diffusers 0.42): per-head QK RMSNorm, RoPE
on the video part only, ``add_*_proj`` for the text stream of dual blocks. The model's
always-present padding mask ``[B, 1, 1, N]`` (valid keys form a prefix: video, then the
prompt's real tokens) is honoured as a per-sample valid-key count. Under context
parallelism (gen's plan, ``hunyuan.hunyuan_video_cp_plan``) the streams arrive as local
shards and the mask stays whole.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from .base import SparseAttnProcessorBase

__all__ = ["HunyuanVideoSparseAttnProcessor"]


def _valid_keys(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """Per-sample valid key count from a boolean key mask whose True entries form a prefix."""
    if attention_mask is None:
        return None
    keys = attention_mask.reshape(batch, -1).bool()
    if keys.shape[1] != seq:
        raise ValueError(f"attention_mask has {keys.shape[1]} keys for a {seq}-token sequence.")
    counts = keys.sum(-1)
    if not torch.compiler.is_compiling():
        prefix = torch.arange(seq, device=keys.device) < counts[:, None]
        if not torch.equal(prefix, keys):
            raise ValueError("HunyuanVideo's attention mask is not a prefix of valid keys; this processor "
                             "supports padding at the end of the text only.")
    return counts


class HunyuanVideoSparseAttnProcessor(SparseAttnProcessorBase):
    """Drop-in for ``HunyuanVideoAttnProcessor2_0``; returns ``(video, text)`` like it."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if single:
                n_text = encoder_hidden_states.shape[1]
                query = torch.cat([apply_rotary_emb(query[:, :-n_text], image_rotary_emb, sequence_dim=1),
                                   query[:, -n_text:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-n_text], image_rotary_emb, sequence_dim=1),
                                 key[:, -n_text:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            enc_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                enc_q = attn.norm_added_q(enc_q)
            if attn.norm_added_k is not None:
                enc_k = attn.norm_added_k(enc_k)
            query = torch.cat([query, enc_q], dim=1)
            key = torch.cat([key, enc_k], dim=1)
            value = torch.cat([value, enc_v], dim=1)

        # the mask covers the whole sequence, also under context parallelism (local shards here)
        kv_valid = _valid_keys(attention_mask, query.shape[0], key.shape[1] * self._sequence_shards())
        hidden_states = self._attend(query, key, value, attn_mask=attention_mask, kv_valid=kv_valid)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :-n_text], hidden_states[:, -n_text:]
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
