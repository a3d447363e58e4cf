"""What the sparse processors share: the schedule check and the hand-off to the method.

A processor does the stock projections, norms, RoPE and fused-projection handling of its
model, then calls :meth:`SparseAttnProcessorBase._attend` where the stock processor
calls ``dispatch_attention_fn``. There, calls the schedule keeps dense go through the
stock dispatcher unchanged (bit-identical to stock); the others go to the method on
``(B, H, S, D)`` tensors with the call's ``TokenLayout`` and ``AttentionContext``.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..context import AttentionContext
from ..methods.base import SparseMethod
from .runtime import RunState

__all__ = ["SparseAttnProcessorBase"]


class SparseAttnProcessorBase:
    """Base of the per-model sparse processors.

    Args:
        method: the sparse method (``gen.attention.get_method(...)``).
        run: the transformer's run state (``attach_run_state``), which supplies the
            layout and step of each call.
        layer_index: this attention module's index in forward order (for ``dense_layers``).
    """

    # opt in to diffusers' backend selection for the dense (scheduled) calls
    _attention_backend = None
    _parallel_config = None

    def __init__(self, method: SparseMethod, run: RunState, layer_index: int) -> None:
        self.method = method
        self.run = run
        self.layer_index = layer_index

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method.name!r}, layer_index={self.layer_index})"

    def _context(self) -> AttentionContext:
        run = self.run
        if self.method.needs_step:
            # read only when needed: a compiled model is then not specialised on the step
            return AttentionContext(step_index=run.step_index, num_steps=run.num_steps,
                                    layer_index=self.layer_index, branch=run.branch)
        return AttentionContext(layer_index=self.layer_index)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, kv_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Attention on diffusers' ``(B, S, H, D)`` layout; returns ``(B, S, H, D)``."""
        ctx = self._context()
        dense = self.method.is_dense(ctx)
        if not torch.compiler.is_compiling():
            self.run.stats.record(self.layer_index, dense, self.run.layout)
        if dense:
            return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                         backend=self._attention_backend, parallel_config=self._parallel_config)
        if self._parallel_config is not None:
            raise ValueError(
                "context parallelism is not supported by gen's sparse processors yet; call "
                "gen.sparsify before enable_parallelism only without context parallelism."
            )
        layout = self.run.layout
        if layout is None:
            raise ValueError(
                "no token layout for this call: the processor was installed by hand without the "
                "geometry hook. Use gen.sparsify(...) or gen.attention.processors.install(...)."
            )
        ctx.kv_valid = kv_valid
        out = self.method.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout, ctx)
        return out.transpose(1, 2)
