"""Third-party attention baselines for ``gen bench kernels``, run on the same plan.

* ``flex``: torch ``flex_attention`` (compiled with ``torch.compile``) with a
  ``BlockMask`` of exactly the plan's visited blocks
  (:func:`gen.attention.backends.flex.plan_to_block_mask`). CUDA
  only: on the CPU its compiled path needs inductor's C++ build and says nothing about
  GPU speed, so the row is skipped with a note.
* ``xformers``: ``xformers.ops.memory_efficient_attention``, dense, when xformers is
  installed (``pip install gen-video[xformers]``); skipped with a note otherwise.

Each returns ``(time_ms, output)`` or raises :class:`Skip` with the reason.
"""

from __future__ import annotations

import torch

from gen.attention.backends.flex import _compiled_flex, plan_to_block_mask

__all__ = ["Skip", "plan_to_block_mask", "time_flex", "time_xformers"]


class Skip(Exception):
    """The baseline does not run here; ``str(err)`` says why."""


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
