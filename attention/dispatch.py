"""Backend choice for block-sparse attention.

``backend=None`` picks ``"triton"`` for CUDA tensors and ``"torch"`` (the reference)
otherwise, and logs the choice and why at DEBUG level on the ``gen.attention`` logger
(``logging.getLogger("gen.attention").setLevel("DEBUG")`` to see it). An explicit
backend that cannot run raises ``ValueError`` saying why.
"""

from __future__ import annotations

import logging

import torch

from gen.kernels import block_sparse_attention as _triton_bsa
from gen.kernels import triton_available_for

from . import reference

__all__ = ["BACKENDS", "block_sparse_attention", "select_backend"]

logger = logging.getLogger("gen.attention")

BACKENDS = ("triton", "torch")
_logged: set[tuple[str, str]] = set()


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """Resolve ``backend`` (None, "triton" or "torch") for tensors on ``device``."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or None (automatic).")
        if backend == "triton":
            ok, why = triton_available_for(device)
            if not ok:
                raise ValueError(why)
        return backend
    ok, why = triton_available_for(device)
    choice = "triton" if device.type == "cuda" and ok else "torch"
    reason = why if choice == "triton" else f"{device.type} tensors: the PyTorch reference is the CPU path"
    key = (device.type, choice)
    if key not in _logged and not torch.compiler.is_compiling():  # once per device type
        _logged.add(key)
        logger.debug("block-sparse attention backend: %s (%s)", choice, reason)
    return choice


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Block-sparse attention on the chosen backend.

    Same arguments and result as ``gen.kernels.block_sparse_attention`` (shapes
    ``(B, H, S, D)``), plus ``backend``: None (automatic), ``"triton"`` or ``"torch"``.
    """
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor, got {type(q).__name__}.")
    fn = _triton_bsa if select_backend(q.device, backend) == "triton" else reference.block_sparse_attention
    return fn(q, k, v, plan, scale=scale, kv_valid=kv_valid, kv_mask=kv_mask, return_lse=return_lse)
