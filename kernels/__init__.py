"""Triton kernels and their launchers (``gen.kernels``), one kernel family per file.

May import torch and triton only. Kernels consume plans (``kv_indices``/``kv_counts``)
and never decide a sparsity pattern.
"""

from ._checks import BlockPlanLike
from .block_sparse_attention import block_sparse_attention, triton_available_for

__all__ = ["BlockPlanLike", "block_sparse_attention", "triton_available_for"]
