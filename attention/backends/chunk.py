"""The chunk backends (VMoBA): operations ``"chunk_means"``, ``"chunk_gate"`` and
``"chunk_sparse"``, each ``triton`` on CUDA (gen's kernels: ``gen.kernels.chunk_gate`` and
the chunk variant of the block-sparse kernel) then the PyTorch reference
(``gen.attention.chunk_reference``), which runs everything.

Registered on import by ``gen.attention.chunk_sparse`` (the entry points)."""

from __future__ import annotations

import torch

from .. import chunk_reference
from .block_sparse import triton_can_run, triton_worth_it
from .registry import Backend, Call, register

__all__ = ["describe"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def describe(x: torch.Tensor, rows: int, cols: int, *, return_lse: bool = False) -> Call:
    """The :class:`Call` record of a chunk operation on ``x (B, H, S, D)`` with ``rows``
    query tokens and ``cols`` keys (attention) or chunks (gating)."""
    return Call(device=x.device, dtype=x.dtype, batch=x.shape[0], heads=x.shape[1], q_len=rows, kv_len=cols,
                head_dim=x.shape[-1], return_lse=return_lse, compiling=torch.compiler.is_compiling(),
                grad=torch.is_grad_enabled())


def _triton_dtype(call: Call) -> str | None:
    why = triton_can_run(call)
    if why is None and call.dtype not in _TRITON_DTYPES:
        why = f"{call.dtype} (the chunk kernels take fp16/bf16/fp32)"
    return why


def _gate_can_run(call: Call) -> str | None:
    from gen.kernels.chunk_gate import MAX_CHUNKS

    why = _triton_dtype(call)
    if why is None and call.kv_len > MAX_CHUNKS:
        why = f"{call.kv_len} chunks > {MAX_CHUNKS} (the gate kernel holds a row in registers)"
    return why


def _sparse_can_run(call: Call) -> str | None:
    why = _triton_dtype(call)
    if why is None and (call.head_dim % 16 or not 16 <= call.head_dim <= 256):
        why = f"head_dim {call.head_dim} (the kernel takes multiples of 16 in [16, 256])"
    return why


def _means_triton(x, bounds):
    from gen.kernels.chunk_gate import chunk_means

    return chunk_means(x, bounds)


def _gate_triton(q, means, bounds, **kw):
    from gen.kernels.chunk_gate import chunk_gate

    return chunk_gate(q, means, bounds, **kw)


def _sparse_triton(q, k, v, plan, **kw):
    from gen.kernels.block_sparse_attention import chunk_sparse_attention

    return chunk_sparse_attention(q, k, v, plan, **kw)


register(Backend("triton", "chunk_means", _means_triton, _triton_dtype, "gen's Triton chunk-mean kernel on CUDA",
                 triton_worth_it))
register(Backend("torch", "chunk_means", chunk_reference.chunk_means, lambda call: None,
                 "the PyTorch reference (runs anything)"))
register(Backend("triton", "chunk_gate", _gate_triton, _gate_can_run, "gen's Triton chunk-gate kernel on CUDA",
                 triton_worth_it))
register(Backend("torch", "chunk_gate", chunk_reference.chunk_gate, lambda call: None,
                 "the PyTorch reference (runs anything)"))
register(Backend("triton", "chunk_sparse", _sparse_triton, _sparse_can_run,
                 "the chunk variant of gen's block-sparse Triton kernel on CUDA", triton_worth_it))
register(Backend("torch", "chunk_sparse", chunk_reference.chunk_sparse_attention, lambda call: None,
                 "the PyTorch reference (runs anything)"))
