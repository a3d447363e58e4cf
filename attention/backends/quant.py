"""The INT8 attention backends (PARO): operations ``"quantize_qk"`` (Q per 32 tokens, K
per 64, to int8 with fp32 scales) and ``"quant_block_sparse"`` (block-sparse attention
with INT8 QK, and optionally INT8 PV), each ``triton`` on CUDA (gen's kernels,
``gen.kernels.quant_attention``) then ``torch``, the bit-exact PyTorch emulation
(``gen.attention.quant_reference``), which runs everything.

Registered on ``import gen.attention`` (through ``gen.attention.backends``)."""

from __future__ import annotations

import torch

from .. import quant_reference
from .block_sparse import triton_can_run, triton_worth_it
from .registry import Backend, Call, register

__all__ = ["describe"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def describe(q: torch.Tensor, k: torch.Tensor, plan=None, *, return_lse: bool = False) -> Call:
    """The :class:`Call` record of a quantize or INT8 attention call (no tensors, no sync);
    ``plan`` None for quantization."""
    return Call(device=q.device, dtype=q.dtype, batch=q.shape[0], heads=q.shape[1], q_len=q.shape[2],
                kv_len=k.shape[2], head_dim=q.shape[3], return_lse=return_lse,
                compiling=torch.compiler.is_compiling(), grad=torch.is_grad_enabled(),
                block_m=64 if plan is None else plan.block_m,
                mask_batch=1 if plan is None else plan.kv_counts.shape[0],
                mask_heads=1 if plan is None else plan.kv_counts.shape[1])


def _triton_can_run(call: Call) -> str | None:
    why = triton_can_run(call)
    if why is None and call.dtype not in _TRITON_DTYPES:
        why = f"{call.dtype} (the INT8 kernels take fp16/bf16/fp32 inputs)"
    if why is None and (call.head_dim % 16 or not 32 <= call.head_dim <= 256):
        why = f"head_dim {call.head_dim} (the INT8 kernels take multiples of 16 in [32, 256])"
    return why


def _quantize_triton(q, k, **kw):
    from gen.kernels.quant_attention import quantize_qkv

    qi, qs, ki, ks, _, _ = quantize_qkv(q, k, **kw)
    return qi, qs, ki, ks


def _attention_triton(q, k, v, plan, **kw):
    from gen.kernels.quant_attention import quant_block_sparse_attention

    return quant_block_sparse_attention(q, k, v, plan, **kw)


register(Backend("triton", "quantize_qk", _quantize_triton, _triton_can_run,
                 "gen's fused Triton Q/K quantization kernel on CUDA", triton_worth_it))
register(Backend("torch", "quantize_qk", quant_reference.quantize_qk_reference, lambda call: None,
                 "the PyTorch emulation (runs anything)"))
register(Backend("triton", "quant_block_sparse", _attention_triton, _triton_can_run,
                 "gen's INT8 block-sparse Triton kernel on CUDA", triton_worth_it))
register(Backend("torch", "quant_block_sparse", quant_reference.quant_block_sparse_attention_reference,
                 lambda call: None, "the PyTorch emulation (runs anything)"))
