"""``dense``: full attention through gen's own kernels (Triton on CUDA, PyTorch on CPU).

Every query block visits every key block. It is the baseline a sparse method is
measured against, and the check that the integration reproduces the stock pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import AttentionContext
from ..layout import TokenLayout
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

    def plan(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None, *,
             q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> BlockPlan:
        device = q.device if q is not None else torch.device("cpu")
        key = (layout, str(device))
        plan = self._plans.get(key)
        if plan is None:
            # 128x64 tiles suit the GPU kernel; the CPU reference is fastest with 64x64.
            bm, bn = (128, 64) if device.type == "cuda" else (64, 64)
            plan = self._plans[key] = BlockPlan.dense(layout.video_len, layout.video_len, bm, bn, device=device)
        return plan
