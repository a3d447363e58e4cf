"""Sparse joint-attention processors for ``FluxTransformer2DModel``.

Installed on the dual (``transformer_blocks.*.attn``) and single
(``single_transformer_blocks.*.attn``) attention. Joint order is text first; RoPE is
applied after the concatenation, over the whole joint sequence. Math around the
attention call is the stock ``FluxAttnProcessor``'s (diffusers 0.42), fused projections
included.

The image grid of a call comes from its ``img_ids`` (``flux.read_flux_img_ids``): FLUX
Kontext's reference-image tokens run as extra dense tokens, next to the text.

IP-Adapter: on a dual block that holds diffusers' ``FluxIPAdapterAttnProcessor``,
:class:`FluxSparseIPAdapterAttnProcessor` takes its place: the joint attention goes
through the method, the image-prompt branch (``to_k_ip``/``to_v_ip`` over
``ip_hidden_states``) stays the stock computation. It shares the adapter's weights
(same modules, same ``state_dict`` keys) and its ``scale`` (``set_ip_adapter_scale``
works while sparsified); ``gen.restore`` puts the adapter's own processor back. Both
orders work: IP-Adapter loaded before ``gen.sparsify`` (installed directly), or after
(``_load_ip_adapter_weights`` re-creates the processors; the next forward adopts them).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxIPAdapterAttnProcessor,
    _get_qkv_projections,
)

from .base import SparseAttnProcessorBase

__all__ = ["FluxSparseAttnProcessor", "FluxSparseIPAdapterAttnProcessor"]


class FluxSparseAttnProcessor(SparseAttnProcessorBase):
    """Drop-in for ``FluxAttnProcessor``; same call signature and returns."""

    def _joint_qkv(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                   image_rotary_emb):
        """Stock projections, norms, concat and RoPE. Returns ``query, key, value`` of the
        joint sequence ``(B, S, H, D)`` (text first) and the normed image query
        ``(B, S_img, H, D)`` before the concat and RoPE (the IP-Adapter branch's query)."""
        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        image_query = query
        if attn.added_kv_proj_dim is not None:
            enc_q = attn.norm_added_q(enc_q.unflatten(-1, (-1, attn.head_dim)))
            enc_k = attn.norm_added_k(enc_k.unflatten(-1, (-1, attn.head_dim)))
            enc_v = enc_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_q, query], dim=1)
            key = torch.cat([enc_k, key], dim=1)
            value = torch.cat([enc_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        return query, key, value, image_query

    def _joint_out(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                   dtype: torch.dtype):
        """``(B, S, H, D)`` attention output to the stock returns: ``(image, text)`` after
        the output projections (dual blocks) or the joint ``(B, S, H*D)`` (single)."""
        hidden_states = hidden_states.flatten(2, 3).to(dtype)
        if encoder_hidden_states is None:
            return hidden_states
        n_text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [n_text, hidden_states.shape[1] - n_text], dim=1)
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("gen's FLUX processor does not take an attention_mask (stock FLUX passes none).")
        query, key, value, _ = self._joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = self._attend(query, key, value)
        return self._joint_out(attn, out, encoder_hidden_states, query.dtype)


class FluxSparseIPAdapterAttnProcessor(FluxSparseAttnProcessor, FluxIPAdapterAttnProcessor):
    """Drop-in for ``FluxIPAdapterAttnProcessor`` (same call signature and returns): the
    joint attention through the method, the image-prompt branch stock.

    Build it with :meth:`wrap` from the adapter's processor, whose ``to_k_ip``/``to_v_ip``
    modules it shares and whose ``scale`` it reads and writes.
    """

    def __init__(self, adapter: FluxIPAdapterAttnProcessor, method=None, run=None, layer_index=None) -> None:
        torch.nn.Module.__init__(self)
        FluxSparseAttnProcessor.__init__(self, method, run, layer_index)
        self.__dict__["adapter"] = adapter  # not a submodule: its weights are registered below
        self.hidden_size = adapter.hidden_size
        self.cross_attention_dim = adapter.cross_attention_dim
        self.to_k_ip = adapter.to_k_ip
        self.to_v_ip = adapter.to_v_ip
        self._attention_backend = getattr(adapter, "_attention_backend", None)
        self._parallel_config = getattr(adapter, "_parallel_config", None)

    @classmethod
    def wrap(cls, adapter: FluxIPAdapterAttnProcessor, method, run, layer_index: int):
        """The sparse processor for a module that holds ``adapter``."""
        return cls(adapter, method, run, layer_index)

    @property
    def scale(self) -> list:
        """The adapter's per-IP-Adapter scales (shared with the wrapped processor)."""
        return self.adapter.scale

    @scale.setter
    def scale(self, value) -> None:
        self.adapter.scale = value

    def __repr__(self) -> str:
        return SparseAttnProcessorBase.__repr__(self)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None,
                 ip_hidden_states: list[torch.Tensor] | None = None, ip_adapter_masks: torch.Tensor | None = None):
        if attention_mask is not None:
            raise ValueError("gen's FLUX processor does not take an attention_mask (stock FLUX passes none).")
        batch_size = hidden_states.shape[0]
        query, key, value, ip_query = self._joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = self._attend(query, key, value)
        out = self._joint_out(attn, out, encoder_hidden_states, query.dtype)
        if encoder_hidden_states is None or ip_hidden_states is None:
            return out
        hidden_states, encoder_hidden_states = out
        # the image-prompt branch, as FluxIPAdapterAttnProcessor computes it
        ip_attn_output = torch.zeros_like(hidden_states)
        for current, scale, to_k_ip, to_v_ip in zip(ip_hidden_states, self.scale, self.to_k_ip, self.to_v_ip):
            ip_key = to_k_ip(current).view(batch_size, -1, attn.heads, attn.head_dim)
            ip_value = to_v_ip(current).view(batch_size, -1, attn.heads, attn.head_dim)
            current = dispatch_attention_fn(ip_query, ip_key, ip_value, attn_mask=None, dropout_p=0.0,
                                            is_causal=False, backend=self._attention_backend,
                                            parallel_config=self._parallel_config)
            current = current.reshape(batch_size, -1, attn.heads * attn.head_dim).to(ip_query.dtype)
            ip_attn_output += scale * current
        return hidden_states, encoder_hidden_states, ip_attn_output
