"""Sparse-attention methods: one file each, a frozen config dataclass per method,
presets per model as data (``presets.py``), and a registry (``get_method``)."""

from .base import MethodConfig, SparseMethod
from .dense import DenseAttention, DenseConfig
from .mask import MaskAttention, MaskConfig
from .presets import PRESETS, preset_for
from .registry import get_method, list_methods, method_class, parse_overrides, register_method

__all__ = [
    "DenseAttention",
    "DenseConfig",
    "MaskAttention",
    "MaskConfig",
    "MethodConfig",
    "PRESETS",
    "SparseMethod",
    "get_method",
    "list_methods",
    "method_class",
    "parse_overrides",
    "preset_for",
    "register_method",
]
