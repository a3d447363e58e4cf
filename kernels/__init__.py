"""Triton kernels and their launchers (``gen.kernels``), one kernel family per file.

May import torch and triton only. Kernels consume plans (``kv_indices``/``kv_counts``)
and never decide a sparsity pattern.
"""

if __name__ != "gen.kernels":
    # Imported as a top-level ``kernels`` because the repository root is on sys.path
    # (``python -m ...`` run from it): transformers probes for the Hugging Face `kernels`
    # package by importing that name. Stay inert: importing the launchers twice would
    # register the custom ops twice, and the stale registration crashed the process.
    __all__: list[str] = []
else:
    from ._checks import BlockPlanLike
    from .block_sparse_attention import block_sparse_attention, triton_available_for
    from .quant_attention import quant_block_sparse_attention, quantize_qkv

    __all__ = ["BlockPlanLike", "block_sparse_attention", "quant_block_sparse_attention", "quantize_qkv",
               "triton_available_for"]
