"""The cache-attention backends (long-video runner): ``triton`` on CUDA, then the
PyTorch reference, which runs everything."""

from __future__ import annotations

import torch

from ..cache_reference import cache_attention_reference
from .block_sparse import triton_can_run, triton_worth_it
from .registry import Backend, Call, register

__all__ = ["describe"]


def describe(q: torch.Tensor, n_keys: int) -> Call:
    """The :class:`Call` record of a cache-attention call ``q (B, Sq, H, D)``."""
    return Call(device=q.device, dtype=q.dtype, batch=q.shape[0], heads=q.shape[2], q_len=q.shape[1],
                kv_len=n_keys, head_dim=q.shape[3], full=True, density=1.0,
                compiling=torch.compiler.is_compiling())


def _triton_run(q, k_cache, v_cache, frame_slots, **kw):
    from gen.kernels.cache_attention import cache_attention

    return cache_attention(q, k_cache, v_cache, frame_slots, **kw)


register(Backend("triton", "cache", _triton_run, triton_can_run, "gen's Triton cache kernel on CUDA",
                 triton_worth_it))
register(Backend("torch", "cache", cache_attention_reference, lambda call: None,
                 "the PyTorch reference (runs anything)"))
