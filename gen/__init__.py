"""gen: fast and long video/image diffusion for diffusers pipelines.

Public API so far: the one-line attention swap for diffusers pipelines, the core types
and block-sparse attention.

    >>> import gen
    >>> handle = gen.sparsify(pipe, "dense")            # Wan, HunyuanVideo, FLUX pipelines
    >>> gen.restore(pipe)
    >>> plan = gen.BlockPlan.dense(q_len=1000, block_m=64, block_n=64)
    >>> out = gen.block_sparse_attention(q, k, v, plan)   # (B, H, S, D)

Names are resolved on first use, so ``import gen`` (and the ``gen`` command) stays
light and does not import torch or triton before they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "AttentionContext": "gen.attention",
    "BlockPlan": "gen.attention",
    "TokenLayout": "gen.attention",
    "block_sparse_attention": "gen.attention",
    "get_method": "gen.attention.methods",
    "list_methods": "gen.attention.methods",
    "SparseHandle": "gen.api",
    "sparsify": "gen.api",
    "restore": "gen.api",
    "sparse": "gen.api",
    "RenderJob": "gen.session",
    "Session": "gen.session",
    "batch": "gen.batches",
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from gen.api import SparseHandle, restore, sparse, sparsify  # noqa: F401
    from gen.attention import AttentionContext, BlockPlan, TokenLayout, block_sparse_attention  # noqa: F401
    from gen.attention.methods import get_method, list_methods  # noqa: F401
    from gen.batches import batch  # noqa: F401
    from gen.session import RenderJob, Session  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
