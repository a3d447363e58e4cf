"""``mask``: a user-supplied pattern turned into a block plan.

Two ways to give the pattern (over the video tokens of a call, frame-major order):

* a function of token coordinates, ``fn(qt, qh, qw, kt, kh, kw) -> bool tensor``: the
  arguments are long tensors that broadcast (query coordinates shaped ``(Nq, 1)``, key
  coordinates ``(1, Nk)``), like flex_attention's ``mask_mod``. Example, a ±1-frame
  window: ``lambda qt, qh, qw, kt, kh, kw: (qt - kt).abs() <= 1``.
* a bool block mask ``[n_q_blocks, n_kv_blocks]`` or ``[H, n_q_blocks, n_kv_blocks]``
  over the video tokens with blocks ``block_m x block_n`` (per head: under context
  parallelism a rank runs its heads' rows, ``AttentionContext.head_offset``).

A function is evaluated on every token pair (in chunks of query blocks, so memory
stays bounded) and coarsened to blocks: a block is visited when any pair in it is
allowed. The effective mask is therefore the block mask; ``token_mask`` returns it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..context import AttentionContext
from ..layout import TokenLayout
from ..plan import BlockPlan
from ..plan_cache import PlanCache
from .base import MethodConfig, SparseMethod

__all__ = ["MaskConfig", "MaskAttention"]


@dataclass(frozen=True, eq=False)
class MaskConfig(MethodConfig):
    """Config of ``mask``.

    Args:
        pattern: a coordinate function or a bool block mask (see the module docstring).
            Required.
        block_m: query block size in tokens (default 64).
        block_n: key block size in tokens (default 64).
    """

    pattern: Callable | torch.Tensor | None = None
    block_m: int = 64
    block_n: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern is None:
            raise ValueError(
                "the mask method needs pattern=: a function fn(qt, qh, qw, kt, kh, kw) -> bool "
                "or a bool block mask [n_q_blocks, n_kv_blocks]."
            )
        if isinstance(self.pattern, torch.Tensor):
            if self.pattern.dtype != torch.bool or self.pattern.dim() not in (2, 3):
                raise ValueError("a block-mask pattern must be a bool tensor [nq, nk] or [H, nq, nk].")
        elif not callable(self.pattern):
            raise ValueError(f"pattern must be callable or a bool tensor, got {type(self.pattern).__name__}.")


class MaskAttention(SparseMethod):
    name = "mask"
    config_cls = MaskConfig
    summary = "your own pattern: a function of token coordinates or a block mask"

    def __init__(self, config: MaskConfig | None = None, *, model: str | None = None) -> None:
        super().__init__(config, model=model)
        # a per-head block mask on a call that holds some of the model's heads (context
        # parallelism): those heads' rows of the whole plan
        self._head_plans = PlanCache(self._build_head_slice)

    def plan(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None, *,
             q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> BlockPlan:
        pattern = self.config.pattern
        per_head = isinstance(pattern, torch.Tensor) and pattern.dim() == 3 and pattern.shape[0] > 1
        if not per_head or ctx is None or ctx.num_heads is None or ctx.num_heads == num_heads:
            return super().plan(layout, num_heads, ctx, q=q, k=k)
        offset, total = ctx.heads_of(num_heads)
        device = q.device if q is not None else torch.device("cpu")
        return self._head_plans.get(self.plan_key(layout, total, device) + (offset, num_heads))

    def _build_head_slice(self, key: tuple) -> BlockPlan:
        *whole, offset, n = key
        plan = self._plans.get(tuple(whole))
        return BlockPlan(plan.block_m, plan.block_n, plan.q_len, plan.kv_len,
                         plan.kv_indices[:, offset:offset + n].contiguous(),
                         plan.kv_counts[:, offset:offset + n].contiguous())

    def build_plan(self, key: tuple) -> BlockPlan:
        layout, num_heads, device = self.key_layout(key)
        return self._build(layout, num_heads).to(device)

    def _build(self, layout: TokenLayout, num_heads: int) -> BlockPlan:
        cfg = self.config
        n = layout.video_len
        nq, nk = -(-n // cfg.block_m), -(-n // cfg.block_n)
        pattern = cfg.pattern
        if isinstance(pattern, torch.Tensor):
            if tuple(pattern.shape[-2:]) != (nq, nk):
                raise ValueError(
                    f"the block mask is {tuple(pattern.shape[-2:])} but this call has {n} video tokens "
                    f"({layout}) = ({nq}, {nk}) blocks of {cfg.block_m}x{cfg.block_n}."
                )
            if pattern.dim() == 3 and pattern.shape[0] not in (1, num_heads):
                raise ValueError(f"the block mask has {pattern.shape[0]} heads, the model {num_heads}.")
            return BlockPlan.from_block_mask(pattern.cpu(), cfg.block_m, cfg.block_n, n, n)
        coords = layout.video_coords()
        kt, kh, kw = (coords[:, i].view(1, n) for i in range(3))
        blocks = torch.zeros(nq, nk, dtype=torch.bool)
        # whole query blocks per chunk, about 16M evaluated pairs at most
        step = max(1, (1 << 24) // (n * cfg.block_m)) * cfg.block_m
        for start in range(0, n, step):
            stop = min(n, start + step)
            qc = coords[start:stop]
            allowed = torch.as_tensor(pattern(qc[:, 0:1], qc[:, 1:2], qc[:, 2:3], kt, kh, kw), dtype=torch.bool)
            allowed = allowed.expand(stop - start, n)
            allowed = torch.nn.functional.pad(allowed, (0, nk * cfg.block_n - n))
            allowed = allowed.reshape(stop - start, nk, cfg.block_n).any(-1)
            allowed = torch.nn.functional.pad(allowed, (0, 0, 0, -(stop - start) % cfg.block_m))
            allowed = allowed.reshape(-1, cfg.block_m, nk).any(1)
            blocks[start // cfg.block_m : start // cfg.block_m + allowed.shape[0]] = allowed
        return BlockPlan.from_block_mask(blocks, cfg.block_m, cfg.block_n, n, n)
