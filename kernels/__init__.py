"""Triton kernels and their launchers (``gen.kernels``), one kernel family per file.

May import torch and triton only. Kernels consume plans (``kv_indices``/``kv_counts``)
and never decide a sparsity pattern.
"""

if __name__ != "gen.kernels":
    # Imported as a top-level ``kernels`` because the repository root is on sys.path
    # (``python -m ...`` or a script run from it). That name belongs to the Hugging Face
    # `kernels` package, which transformers >= 5.25 requires and imports at start-up
    # (``from kernels import CUDAProperties``). Hand the name over to that package when it
    # is installed (a module may replace itself in sys.modules while it is imported; the
    # import returns the replacement); otherwise stay inert. Never import the launchers
    # here: importing them twice registers the custom ops twice, and the stale
    # registration crashed the process.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path) if __name__ == "kernels" else None
    if _spec is not None and _spec.loader is not None:
        _real = importlib.util.module_from_spec(_spec)
        _self = sys.modules[__name__]
        sys.modules[__name__] = _real
        try:
            _spec.loader.exec_module(_real)
        except BaseException:
            sys.modules[__name__] = _self
            raise
    __all__: list[str] = []
else:
    from ._checks import BlockPlanLike
    from .block_sparse_attention import block_sparse_attention, triton_available_for
    from .quant_attention import quant_block_sparse_attention, quantize_qkv

    __all__ = ["BlockPlanLike", "block_sparse_attention", "quant_block_sparse_attention", "quantize_qkv",
               "triton_available_for"]
