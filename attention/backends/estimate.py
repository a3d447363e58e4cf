"""The block-estimation backends (``"block_stats"`` and ``"select_blocks"``): ``triton`` on
CUDA (gen's kernels, ``gen.kernels.block_estimate``), then the PyTorch reference
(``gen.attention.estimate_reference``), which runs everything and traces into a compiled
graph on the CPU."""

from __future__ import annotations

import torch

from .. import estimate_reference
from .block_sparse import triton_can_run, triton_worth_it
from .registry import Backend, Call, register

__all__ = ["describe"]


def describe(x: torch.Tensor, rows: int, cols: int) -> Call:
    """The :class:`Call` record of an estimation call on ``x (B, H, ...)`` whose result is
    ``rows x cols`` per (batch, head)."""
    return Call(device=x.device, dtype=x.dtype, batch=x.shape[0], heads=x.shape[1], q_len=rows,
                kv_len=cols, head_dim=x.shape[-1], full=True, density=1.0,
                compiling=torch.compiler.is_compiling(), grad=torch.is_grad_enabled())


def _stats_triton(x, block, valid=None, deviation=True):
    from gen.kernels.block_estimate import block_stats

    return block_stats(x, block, valid, deviation)


def _select_triton(logits, text_logit, rectifiable, forced, p, top_k):
    from gen.kernels.block_estimate import select_blocks

    return select_blocks(logits, text_logit, rectifiable, forced, p, top_k)


register(Backend("triton", "block_stats", _stats_triton, triton_can_run,
                 "gen's Triton pooling kernel on CUDA", triton_worth_it))
register(Backend("torch", "block_stats", estimate_reference.block_stats, lambda call: None,
                 "the PyTorch reference (runs anything)"))
register(Backend("triton", "select_blocks", _select_triton, triton_can_run,
                 "gen's Triton selection kernel on CUDA", triton_worth_it))
register(Backend("torch", "select_blocks", estimate_reference.select_blocks, lambda call: None,
                 "the PyTorch reference (runs anything)"))
