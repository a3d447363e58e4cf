"""``AttentionContext``: where in the denoising run an attention call happens.

Set by hooks (never by globals) and handed to a method's ``attention``. Methods read
what they need; unknown values stay ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["AttentionContext"]


@dataclass
class AttentionContext:
    """Per-call state for a sparse-attention method.

    Args:
        step_index: denoising step, 0-based (None outside a pipeline run).
        num_steps: total denoising steps of the run, when known.
        layer_index: transformer block index of this attention module.
        branch: the pipeline's name for the call (``"cond"``/``"uncond"``), when known.
        kv_valid: optional int ``(B,)``, valid keys per sample (padding at the end of the
            sequence, e.g. HunyuanVideo's short prompts).
        need_lse: whether the caller merges the video part's log-sum-exp (joint text);
            False for a video-only call, so backends that cannot return one may run.
        extras: anything else a method needs (e.g. a per-run cache).
        head_offset: index, among the model's heads, of the call's first head: under
            context parallelism (Ulysses) a rank holds heads ``[head_offset,
            head_offset + H)`` of the model's ``num_heads``; 0 otherwise. Methods with
            per-head data (Sparse-vDiT's modes, a per-head block mask) slice it with this.
        num_heads: the model's head count (None: the call holds every head).
    """

    step_index: int | None = None
    num_steps: int | None = None
    layer_index: int | None = None
    branch: str | None = None
    kv_valid: torch.Tensor | None = None
    need_lse: bool = True
    extras: dict[str, Any] = field(default_factory=dict)
    head_offset: int = 0
    num_heads: int | None = None

    def heads_of(self, local_heads: int) -> tuple[int, int]:
        """``(head_offset, model heads)`` of a call that holds ``local_heads`` heads."""
        total = local_heads if self.num_heads is None else self.num_heads
        if not 0 <= self.head_offset <= total - local_heads:
            raise ValueError(f"heads [{self.head_offset}, {self.head_offset + local_heads}) are not among the "
                             f"model's {total}.")
        return self.head_offset, total
