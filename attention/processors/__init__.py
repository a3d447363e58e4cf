"""diffusers attention processors that run gen's methods (one file per model family).

Usually installed by ``gen.sparsify``; ``install(transformer, method)`` does the same
for one transformer. The processor classes are public for per-module use: each needs
the transformer's run state (``attach_run_state``) to know the layout and step.
"""

from .base import SparseAttnProcessorBase
from .flux import FluxSparseAttnProcessor, FluxSparseIPAdapterAttnProcessor
from .hunyuan import HunyuanVideoSparseAttnProcessor
from .install import SUPPORTED_TRANSFORMERS, TransformerPatch, attention_modules, family_of, install
from .runtime import (
    FluxImageTokens,
    RunState,
    RunStats,
    attach_run_state,
    detach_run_state,
    layout_for,
    read_flux_img_ids,
)
from .wan import WanSparseAttnProcessor

__all__ = [
    "FluxImageTokens",
    "FluxSparseAttnProcessor",
    "FluxSparseIPAdapterAttnProcessor",
    "HunyuanVideoSparseAttnProcessor",
    "RunState",
    "RunStats",
    "SUPPORTED_TRANSFORMERS",
    "SparseAttnProcessorBase",
    "TransformerPatch",
    "WanSparseAttnProcessor",
    "attach_run_state",
    "attention_modules",
    "detach_run_state",
    "family_of",
    "install",
    "layout_for",
    "read_flux_img_ids",
]
