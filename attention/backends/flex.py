"""Block-sparse plans through torch's ``flex_attention``, compiled once per shape.

A ``BlockPlan`` is already in flex's block format (per query block, the visited key
blocks), so :func:`plan_to_block_mask` hands it over as a ``BlockMask``: visited blocks
whose keys are all valid are *full* blocks (flex runs them without evaluating any mask,
as gen's kernel does), the few that hold padding, masked keys or the ragged end are
*partial* blocks, where the ``mask_mod`` reads the key-validity vector. The compiled
``flex_attention`` (inductor: C++ on the CPU, Triton on CUDA) is built on first use per
shape and reused.

On the CPU torch 2.13's compiled flex returns no LSE and runs without autograd only, so
the automatic choice takes it just for calls that need neither (``gather`` covers the
rest); on CUDA gen's own kernel comes first and flex is the baseline ``gen bench
kernels`` times against it.
"""

from __future__ import annotations

import functools

import torch

from gen.kernels._checks import check_call

from .sdpa import key_blocks, key_mask

__all__ = ["flex_available", "flex_block_sparse_attention", "plan_to_block_mask"]


def flex_available() -> str | None:
    """None when compiled ``flex_attention`` can be used here, else why not."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no flex_attention (needs torch >= 2.5)"
    return None


def plan_to_block_mask(plan, batch: int, heads: int, key_ok: torch.Tensor | None = None):
    """``BlockMask`` visiting exactly ``plan``'s blocks for ``batch x heads``.

    ``key_ok``: optional bool ``(B, Skv)`` of valid keys. Visited blocks whose keys are all
    valid become full blocks (no mask evaluated); the rest are partial blocks masked by
    ``key_ok`` (and by the key length at a ragged end)."""
    from torch.nn.attention.flex_attention import BlockMask

    dev = plan.kv_indices.device
    bm, bn, kv_len, nk = plan.block_m, plan.block_n, plan.kv_len, plan.n_kv_blocks
    counts = plan.kv_counts.expand(batch, heads, -1).long()
    idx = plan.kv_indices.expand(batch, heads, -1, -1).long()
    visits = idx.shape[-1]
    used = torch.arange(visits, device=dev) < counts[..., None]  # (B, H, nq, V)
    okb = key_blocks(key_ok, kv_len, nk, bn, dev)
    whole = okb.all(-1).expand(batch, nk)  # (B, nk): every key valid
    some = okb.any(-1).expand(batch, nk)  # (B, nk): any key valid
    b_index = torch.arange(batch, device=dev).view(batch, 1, 1, 1)
    full = used & whole[b_index, idx]
    partial = used & ~whole[b_index, idx] & some[b_index, idx]  # all-invalid blocks: skipped

    def compact(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the flagged indices first, ascending; flex wants one column per key block
        key = torch.where(flags, idx, nk + idx)
        order = key.sort(dim=-1).values
        cols = torch.where(order < nk, order, 0)
        if cols.shape[-1] < nk:
            cols = torch.nn.functional.pad(cols, (0, nk - cols.shape[-1]))
        return flags.sum(-1).int().contiguous(), cols[..., :nk].int().contiguous()

    full_n, full_idx = compact(full)
    part_n, part_idx = compact(partial)
    # the mask also says which blocks the plan visits: compiled flex evaluates it on partial
    # blocks only, but its eager fallback evaluates it everywhere, ignoring the block lists
    visited = plan.to_block_mask().expand(batch, heads, -1, -1)
    if key_ok is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return visited[b, h, q_idx // bm, kv_idx // bn] & (kv_idx < kv_len)
    else:
        valid = key_ok.expand(batch, kv_len)

        def mask_mod(b, h, q_idx, kv_idx):
            return visited[b, h, q_idx // bm, kv_idx // bn] & valid[b, kv_idx]

    return BlockMask.from_kv_blocks(part_n, part_idx, full_n, full_idx, BLOCK_SIZE=(bm, bn), mask_mod=mask_mod,
                                    seq_lengths=(plan.q_len, kv_len), compute_q_blocks=False)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with compiled ``flex_attention``. Same arguments and result
    as ``gen.attention.reference.block_sparse_attention``."""
    bsz, heads, q_len, kv_len, head_dim, sm_scale = check_call(q, k, v, plan, scale=scale, kv_valid=kv_valid,
                                                               kv_mask=kv_mask)
    mask = plan_to_block_mask(plan, bsz, heads, key_mask(bsz, kv_len, kv_valid, kv_mask, q.device))
    if not return_lse:  # compiled flex on the CPU (torch 2.13) cannot return it
        return _compiled_flex()(q, k, v, block_mask=mask, scale=sm_scale)
    out, lse = _compiled_flex()(q, k, v, block_mask=mask, scale=sm_scale, return_lse=True)
    return out, lse.float()
