"""``dense``: full attention through gen's own kernels (Triton on CUDA, PyTorch on CPU).

Every query block visits every key block. It is the baseline a sparse method is
measured against, and the check that the integration reproduces the stock pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import BlockPlan
from .base import MethodConfig, SparseMethod

__all__ = ["DenseConfig", "DenseAttention"]


@dataclass(frozen=True)
class DenseConfig(MethodConfig):
    """Config of ``dense`` (no fields beyond the shared ones)."""


class DenseAttention(SparseMethod):
    name = "dense"
    config_cls = DenseConfig
    summary = "full attention on gen's kernels (the baseline)"

    def build_plan(self, key: tuple) -> BlockPlan:
        layout, _, device = self.key_layout(key)
        # 128x64 tiles suit the GPU kernel; the CPU reference is fastest with 64x64.
        bm, bn = (128, 64) if device.type == "cuda" else (64, 64)
        return BlockPlan.dense(layout.video_len, layout.video_len, bm, bn, device=device)
