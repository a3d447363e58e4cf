"""The cache-attention backends (long-video runner): ``triton`` on CUDA, then the
PyTorch reference, which runs everything."""

from __future__ import annotations

import torch

from gen.kernels import triton_available_for

from ..cache_reference import cache_attention_reference
from .registry import Backend, Call, register

__all__ = ["describe"]


def describe(q: torch.Tensor, k_cache: torch.Tensor, n_keys: int, *, rope: bool) -> Call:
    """The :class:`Call` record of a cache-attention call ``q (B, Sq, H, D)``."""
    return Call(device=q.device, dtype=q.dtype, batch=q.shape[0], heads=q.shape[2], q_len=q.shape[1],
                kv_len=n_keys, head_dim=q.shape[3], full=True, density=1.0,
                compiling=torch.compiler.is_compiling(), extra=(("rope", rope),))


def _triton_can_run(call: Call) -> str | None:
    ok, why = triton_available_for(call.device)  # CUDA, or the interpreter (tests)
    return None if ok else why


def _triton_worth_it(call: Call) -> str | None:
    if call.device.type != "cuda":
        return f"{call.device.type} tensors: the interpreter is for tests (ask for backend='triton')"
    return None


def _triton_run(q, k_cache, v_cache, frame_slots, **kw):
    from gen.kernels.cache_attention import cache_attention

    return cache_attention(q, k_cache, v_cache, frame_slots, **kw)


register(Backend("triton", "cache", _triton_run, _triton_can_run, "gen's Triton cache kernel on CUDA",
                 _triton_worth_it))
register(Backend("torch", "cache", cache_attention_reference, lambda call: None,
                 "the PyTorch reference (runs anything)"))
