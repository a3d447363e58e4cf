"""What the processors share: the schedule check and the hand-off to the method.

A processor does the stock projections, norms, RoPE and fused-projection handling of its
model, then calls :meth:`SparseAttnProcessorBase._attend` where the stock processor
calls ``dispatch_attention_fn``. There, calls the schedule keeps dense go through the
stock dispatcher unchanged (bit-identical to stock), and so do calls whose geometry
could not be read (``RunState.fallback``); the others go to the method on
``(B, H, S, D)`` tensors with the call's ``TokenLayout`` and ``AttentionContext``, in the
run's token order when it has one (FLUX reference-image tokens moved next to the text).
Under diffusers' context parallelism (Ulysses) every call of a bound processor runs
inside diffusers' all-to-all on the rank's heads over the whole sequence
(:mod:`.parallel`).

A processor built with no arguments is *unbound*: diffusers' loaders re-create
processors as ``type(processor)()`` (the FLUX IP-Adapter loader does, for the single
blocks). The geometry hook binds such a processor to its module's method, run and layer
before the next forward (``TransformerPatch.sync``); an unbound processor that is called
anyway (no hook) runs the stock dense attention and warns once.
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..context import AttentionContext
from ..methods.base import SparseMethod
from .parallel import context_parallel_config, ulysses_attention
from .runtime import RunState

__all__ = ["SparseAttnProcessorBase"]

logger = logging.getLogger("gen.attention")
_warned_unbound: set[str] = set()


class SparseAttnProcessorBase:
    """Base of the per-model sparse processors.

    Args:
        method: the sparse method (``gen.attention.get_method(...)``); None with ``run``
            None for an unbound processor (see the module docstring).
        run: the transformer's run state (``attach_run_state``), which supplies the
            layout and step of each call.
        layer_index: this attention module's index in forward order (for ``dense_layers``).
    """

    # opt in to diffusers' backend selection for the dense (scheduled) calls
    _attention_backend = None
    _parallel_config = None

    def __init__(self, method: SparseMethod | None = None, run: RunState | None = None,
                 layer_index: int | None = None) -> None:
        self.method = method
        self.run = run
        self.layer_index = layer_index

    def __repr__(self) -> str:
        if self.method is None:
            return f"{type(self).__name__}(unbound)"
        return f"{type(self).__name__}(method={self.method.name!r}, layer_index={self.layer_index})"

    @property
    def bound(self) -> bool:
        """Whether the processor has its method and run state."""
        return self.method is not None and self.run is not None

    def bind(self, method: SparseMethod, run: RunState, layer_index: int) -> None:
        """Give an unbound processor its method, run state and layer index."""
        self.method, self.run, self.layer_index = method, run, layer_index

    def _context(self) -> AttentionContext:
        run = self.run
        if self.method.needs_step:
            # read only when needed: a compiled model is then not specialised on the step
            return AttentionContext(step_index=run.step_index, num_steps=run.num_steps,
                                    layer_index=self.layer_index, branch=run.branch)
        return AttentionContext(layer_index=self.layer_index)

    def _stock_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attn_mask: torch.Tensor | None) -> torch.Tensor:
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=self._parallel_config)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, kv_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Attention on diffusers' ``(B, S, H, D)`` layout; returns ``(B, S, H, D)``."""
        run = self.run
        if self.method is None or run is None:
            name = type(self).__name__
            if name not in _warned_unbound and not torch.compiler.is_compiling():
                _warned_unbound.add(name)
                logger.warning("gen: an unbound %s (built with no arguments, outside gen.sparsify) runs the stock "
                               "dense attention; gen binds it at the next forward of a sparsified transformer.", name)
            return self._stock_attention(query, key, value, attn_mask)
        ctx = self._context()
        fallback = run.fallback
        dense = fallback is not None or self.method.is_dense(ctx)
        if not torch.compiler.is_compiling():
            run.stats.record(self.layer_index, dense, run.layout, fallback)
        if context_parallel_config(self._parallel_config) is not None:
            # Ulysses: the method (or the stock dense attention) runs inside diffusers' all-to-all
            return ulysses_attention(self, query, key, value, attn_mask, kv_valid, ctx, dense)
        if dense:
            return self._stock_attention(query, key, value, attn_mask)
        layout = run.layout
        if layout is None:
            raise ValueError(
                "no token layout for this call: the processor was installed by hand without the "
                "geometry hook. Use gen.sparsify(...) or gen.attention.processors.install(...)."
            )
        return self._method_attention(query, key, value, layout, ctx, kv_valid, run.order)

    def _method_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout,
                          ctx: AttentionContext, kv_valid: torch.Tensor | None,
                          order: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The method on ``(B, S, H, D)`` tensors of the whole sequence, seen in ``order``
        (``(forward, inverse)`` indices, or None); returns ``(B, S, H, D)`` in the input order."""
        ctx.kv_valid = kv_valid
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if order is not None:
            forward, inverse = order
            q, k, v = q.index_select(2, forward), k.index_select(2, forward), v.index_select(2, forward)
        out = self.method.attention(q, k, v, layout, ctx)
        if order is not None:
            out = out.index_select(2, inverse)
        return out.transpose(1, 2)

    def _sequence_shards(self) -> int:
        """Ranks the call's sequence is split over (the Ulysses degree; 1 without context
        parallelism): whole-sequence inputs such as HunyuanVideo's mask are that many
        times the local length."""
        cp = context_parallel_config(self._parallel_config)
        return 1 if cp is None else cp.ulysses_degree * cp.ring_degree
