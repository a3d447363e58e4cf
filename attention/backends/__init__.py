"""Backends per operation (``gen.attention.backends``): the registry, and the backends of
block-sparse attention, cache attention, block estimation and INT8 attention (PARO)
registered in order of preference."""

from . import block_sparse, cache, estimate, quant  # noqa: F401  (registration, in this order)
from .registry import Backend, Call, Choice, backends, choose, explain, register

__all__ = ["Backend", "Call", "Choice", "backends", "choose", "explain", "register"]
