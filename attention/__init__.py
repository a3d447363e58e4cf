"""Token layouts, block plans, the methods, the PyTorch reference and diffusers
processors (``gen.attention``). May import ``gen.kernels``, torch and diffusers.

``get_method`` (the method registry, ``gen.attention.methods``) is resolved on first
use, so importing this package does not import every method module."""

from typing import TYPE_CHECKING

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
    "get_method",
    "hilbert_order",
    "reference",
    "select_backend",
    "tile_order",
]

if TYPE_CHECKING:  # pragma: no cover
    from .methods import get_method  # noqa: F401


def __getattr__(name: str):
    if name == "get_method":
        from .methods import get_method

        globals()[name] = get_method
        return get_method
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
