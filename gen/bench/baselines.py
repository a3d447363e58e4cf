"""Third-party attention baselines for ``gen bench kernels``, run on the same plan.

* ``flex``: torch ``flex_attention`` (compiled with ``torch.compile``) with a
  ``BlockMask`` of exactly the plan's visited blocks (:func:`plan_to_block_mask`). CUDA
  only: on the CPU its compiled path needs inductor's C++ build and says nothing about
  GPU speed, so the row is skipped with a note.
* ``xformers``: ``xformers.ops.memory_efficient_attention``, dense, when xformers is
  installed (``pip install gen-video[xformers]``); skipped with a note otherwise.

Each returns ``(time_ms, output)`` or raises :class:`Skip` with the reason.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["Skip", "plan_to_block_mask", "time_flex", "time_xformers"]


class Skip(Exception):
    """The baseline does not run here; ``str(err)`` says why."""


def plan_to_block_mask(plan, batch: int, heads: int):
    """``torch.nn.attention.flex_attention.BlockMask`` visiting the same blocks as ``plan``
    (``block_m x block_n`` tiles; ragged last blocks are cut by ``seq_lengths``).

    Visited blocks are "full" blocks (the compiled kernel runs them without evaluating a
    mask, as our kernel does); the ``mask_mod`` looks the token's block up in the plan's
    block mask, which only matters where flex evaluates it (its eager fallback, which
    otherwise ignores the block structure)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = plan.kv_counts.expand(batch, heads, -1).int().contiguous()
    idx = plan.kv_indices.expand(batch, heads, -1, -1)
    # flex wants one column per key block; entries past a row's count are never read
    pad = plan.n_kv_blocks - idx.shape[-1]
    if pad > 0:
        idx = torch.cat([idx, idx.new_zeros(*idx.shape[:-1], pad)], dim=-1)
    idx = idx.int().contiguous()
    blocks = plan.to_block_mask().expand(batch, heads, -1, -1)
    bm, bn = plan.block_m, plan.block_n

    def in_plan(b, h, q_idx, kv_idx):
        return blocks[b, h, q_idx // bm, kv_idx // bn]

    return BlockMask.from_kv_blocks(torch.zeros_like(counts), idx, counts, idx, BLOCK_SIZE=(bm, bn),
                                    mask_mod=in_plan, seq_lengths=(plan.q_len, plan.kv_len))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def time_flex(q, k, v, plan, time_ms) -> tuple[float, torch.Tensor]:
    """Time compiled ``flex_attention`` on ``plan`` (``q, k, v`` ``(B, H, S, D)``)."""
    if q.device.type != "cuda":
        raise Skip("flex_attention is timed on CUDA only (compiled)")
    mask = plan_to_block_mask(plan.to(q.device), q.shape[0], q.shape[1])
    flex = _compiled_flex()
    fn = lambda: flex(q, k, v, block_mask=mask)
    out = fn()
    return time_ms(fn), out


def time_xformers(q, k, v, time_ms) -> tuple[float, torch.Tensor]:
    """Time xformers' dense memory-efficient attention (it takes ``(B, S, H, D)``)."""
    try:
        import xformers.ops as xops
    except ImportError:
        raise Skip("xformers not installed (pip install gen-video[xformers])") from None
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    fn = lambda: xops.memory_efficient_attention(qt, kt, vt)
    out = fn().transpose(1, 2)
    return time_ms(fn), out
