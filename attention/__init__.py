"""Token layouts, block plans, the methods, the PyTorch reference and diffusers
processors (``gen.attention``). May import ``gen.kernels``, torch and diffusers."""

from . import reference
from .context import AttentionContext
from .dispatch import BACKENDS, block_sparse_attention, select_backend
from .layout import TokenLayout
from .plan import BlockPlan
from .token_order import TokenPermutation, axis_order, hilbert_order, tile_order

__all__ = [
    "AttentionContext",
    "BACKENDS",
    "BlockPlan",
    "TokenLayout",
    "TokenPermutation",
    "axis_order",
    "block_sparse_attention",
    "hilbert_order",
    "reference",
    "select_backend",
    "tile_order",
]
