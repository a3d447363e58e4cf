"""Backend choice for block-sparse attention: one entry point over the backend registry.

``backend=None`` picks the first backend of ``gen.attention.backends`` that can run the
call (gen's Triton kernel on CUDA; on the CPU torch's fused attention for dense plans,
the same kernel on gathered key blocks for sparse ones, the PyTorch reference otherwise) and
logs the choice and why the others were skipped at DEBUG level on the ``gen.attention``
logger (``logging.getLogger("gen.attention").setLevel("DEBUG")`` to see it). An explicit
backend that cannot run raises ``ValueError`` saying why.
"""

from __future__ import annotations

import torch

from gen.kernels._checks import check_plan, check_qkv

from .backends import backends, choose
from .backends.block_sparse import describe
from .token_order import run_in_slots

__all__ = ["BACKENDS", "block_sparse_attention", "select_backend"]

BACKENDS = tuple(b.name for b in backends("block_sparse"))


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend a typical call on ``device`` gets: ``backend`` if it can run there,
    else (None) the first that can for a sparse plan of a mid-size call. Per-call choices
    depend on the plan and size too; see :func:`gen.attention.backends.explain`."""
    from .backends.registry import Call

    call = Call(device=torch.device(device), dtype=torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16,
                batch=1, heads=1, q_len=1024, kv_len=1024, head_dim=64, full=False, density=0.5)
    return choose("block_sparse", call, backend).name


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
    token_order=None,
):
    """Block-sparse attention on the chosen backend.

    Same arguments and result as ``gen.kernels.block_sparse_attention`` (shapes
    ``(B, H, S, D)``), plus ``backend``: None (automatic) or one of :data:`BACKENDS`
    (``"triton"``, ``"sdpa"``, ``"gather"``, ``"flex"``, ``"torch"``), and
    ``token_order``: a ``gen.attention.TokenPermutation`` the plan is expressed in. Then
    ``q, k, v`` and the result (and the LSE) are in the original token order
    (``n_in`` tokens) while the plan covers the ``n_out`` slots of the order (padding slots
    are never attended; ``kv_mask``, if given, is over the slots). The CPU gather backend
    permutes, blocks and gathers in one pass and the masked backend permutes its mask once;
    the others get permuted inputs.
    """
    # the checks every backend shares, first: one message per mistake, whichever backend
    check_qkv(q, k, v, allowed_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if token_order is not None:
        if token_order.n_in != q.shape[2] or token_order.n_in != k.shape[2]:
            raise ValueError(f"token_order covers {token_order.n_in} tokens but q has {q.shape[2]} and k {k.shape[2]}.")
        # the plan is over the order's slots: check it against inputs of that length
        slots = (q.shape[0], q.shape[1], token_order.n_out, q.shape[3])
        check_plan(plan, q[:, :, :1].expand(slots), k[:, :, :1].expand(slots))
    else:
        check_plan(plan, q, k)
    call = describe(q, k, plan, return_lse=return_lse)
    chosen = choose("block_sparse", call, backend)
    kw = dict(scale=scale, kv_valid=kv_valid, kv_mask=kv_mask, return_lse=return_lse)
    if token_order is None:
        return chosen.backend.run(q, k, v, plan, **kw)
    if chosen.backend.run_in_order is not None:
        return chosen.backend.run_in_order(q, k, v, plan, token_order, **kw)
    return run_in_slots(chosen.backend.run, q, k, v, plan, token_order, **kw)
