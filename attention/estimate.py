"""Block estimation for dynamic methods: one entry point per operation over the backend
registry (``gen.attention.backends``), as :mod:`gen.attention.dispatch` is for attention.

``backend=None`` takes gen's Triton kernels on CUDA and the PyTorch reference elsewhere;
``"triton"`` or ``"torch"`` asks for one (an explicit backend that cannot run raises
``ValueError`` saying why). The contract of both operations is the reference's
(:mod:`gen.attention.estimate_reference`).
"""

from __future__ import annotations

import torch

from .backends import choose
from .backends.estimate import describe

__all__ = ["block_stats", "select_blocks"]


def block_stats(x: torch.Tensor, block: int, valid: torch.Tensor | None = None, deviation: bool = True, *,
                backend: str | None = None):
    """Block means (and mean absolute deviations) of ``x (B, H, S, D)`` over valid tokens;
    see :func:`gen.attention.estimate_reference.block_stats`."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (B, H, S, D), got {getattr(x, 'shape', type(x))}.")
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int (tokens), got {block!r}.")
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (x.shape[2],)):
        raise ValueError(f"valid must be a bool tensor of shape ({x.shape[2]},), got {valid.dtype} {tuple(valid.shape)}.")
    choice = choose("block_stats", describe(x, -(-x.shape[2] // block), x.shape[3]), backend)
    return choice.backend.run(x, block, valid, deviation)


def select_blocks(logits: torch.Tensor, text_logit: torch.Tensor | None, rectifiable: torch.Tensor,
                  forced: torch.Tensor, p: float, top_k: int, *, backend: str | None = None):
    """Cumulative-mass block selection with rectification terms; see
    :func:`gen.attention.estimate_reference.select_blocks`."""
    if logits.dim() != 4 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be fp32 (B, H, nq, nk), got {logits.dtype} {tuple(logits.shape)}.")
    if rectifiable.dtype != torch.bool or rectifiable.shape != logits.shape:
        raise ValueError(f"rectifiable must be bool shaped like logits {tuple(logits.shape)}.")
    if forced.dtype != torch.bool or tuple(forced.shape) != tuple(logits.shape[2:]):
        raise ValueError(f"forced must be bool (nq, nk) = {tuple(logits.shape[2:])}.")
    if text_logit is not None and tuple(text_logit.shape) != tuple(logits.shape[:3]):
        raise ValueError(f"text_logit must be (B, H, nq) = {tuple(logits.shape[:3])}.")
    choice = choose("select_blocks", describe(logits, logits.shape[2], logits.shape[3]), backend)
    return choice.backend.run(logits, text_logit, rectifiable, forced, float(p), int(top_k))
