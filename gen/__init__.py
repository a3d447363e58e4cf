"""gen: fast and long video/image diffusion for diffusers pipelines.

Public API so far: the core types and block-sparse attention.

    >>> import gen
    >>> plan = gen.BlockPlan.dense(q_len=1000, block_m=64, block_n=64)
    >>> out = gen.block_sparse_attention(q, k, v, plan)   # (B, H, S, D)
"""

from gen.attention import (
    AttentionContext,
    BlockPlan,
    TokenLayout,
    block_sparse_attention,
)

__version__ = "0.1.0"

__all__ = ["AttentionContext", "BlockPlan", "TokenLayout", "block_sparse_attention", "__version__"]
