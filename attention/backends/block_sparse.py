"""The block-sparse attention backends, in order of preference, and the call record.

* ``triton``: gen's kernel, on CUDA tensors.
* ``sdpa``: plans that visit every block, through torch's fused attention (CPU): the
  same kernel stock attention runs, with the LSE from the same call.
* ``masked``: plans that keep most blocks (CPU): torch's fused attention over every key
  with the plan as an additive mask, kept on the plan (cheaper than gathering above about
  half the blocks for small blocks, 0.7 for large; small calls only).
* ``gather``: sparse plans on the CPU: each query block's visited key blocks gathered and
  run through torch's fused attention, which also gives the LSE.
* ``flex``: sparse plans through compiled ``flex_attention`` (CPU), when the call is big
  enough for the sparse kernel to pay (``FLEX_MIN_WORK``), needs no LSE (torch 2.13's
  compiled CPU flex returns none), runs without autograd and not inside a compiled graph.
* ``torch``: the PyTorch reference, which runs everything (the oracle, and the fallback).

``backend=`` may name any of them; a named backend that cannot run raises saying why.
"""

from __future__ import annotations

from functools import partial

import torch

from gen.kernels import triton_available_for

from .. import reference
from .flex import flex_available, flex_block_sparse_attention
from .gather import gathered_attention, gathered_attention_in_order
from .masked import (
    MASKED_MAX_ELEMENTS,
    masked_attention,
    masked_attention_in_order,
    masked_min_density,
)
from .registry import Backend, Call, register
from .sdpa import dense_attention, flash_cpu_available

__all__ = ["FLEX_MIN_WORK", "describe", "triton_can_run", "triton_worth_it"]

#: Smallest call (``B*H*Sq*Skv*density`` score elements) the automatic choice sends to
#: compiled flex_attention on the CPU: its first call per shape compiles (12 s seen on a
#: 2-core CPU), which a small call does not repay. A judgement, not a measured crossover.
FLEX_MIN_WORK = 2_000_000


def describe(q: torch.Tensor, k: torch.Tensor, plan, *, return_lse: bool = False) -> Call:
    """The :class:`Call` record of a block-sparse call (no device sync on CUDA)."""
    compiling = torch.compiler.is_compiling()
    full = density = None
    if q.device.type != "cuda":  # on CUDA no chooser needs them: Triton runs every plan
        full = getattr(plan, "is_full", None)
        dens = getattr(plan, "cached_density", None)
        density = dens() if callable(dens) else None
    return Call(device=q.device, dtype=q.dtype, batch=q.shape[0], heads=q.shape[1], q_len=q.shape[2],
                kv_len=k.shape[2], head_dim=q.shape[3], full=full, density=density, return_lse=return_lse,
                compiling=compiling, grad=torch.is_grad_enabled(), block_m=plan.block_m,
                mask_batch=plan.kv_counts.shape[0], mask_heads=plan.kv_counts.shape[1])


def triton_can_run(call: Call) -> str | None:
    ok, why = triton_available_for(call.device)  # CUDA, or the interpreter (tests)
    return None if ok else why


def triton_worth_it(call: Call) -> str | None:
    if call.device.type != "cuda":
        return f"{call.device.type} tensors: the interpreter is for tests (ask for backend='triton')"
    return None


def _triton_run(q, k, v, plan, **kw):
    from gen.kernels import block_sparse_attention

    return block_sparse_attention(q, k, v, plan, **kw)


def _sdpa_can_run(call: Call) -> str | None:
    if call.device.type != "cpu":
        return "used on the CPU only (on CUDA gen's kernel runs dense plans too)"
    if call.full is None:
        return "plan fullness unknown (a plan built inside a compiled graph)"
    if not call.full:
        return "the plan skips blocks"
    if call.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{call.dtype} (fused attention takes fp32/bf16/fp16)"
    return None


def cpu_fused_can_run(call: Call, compiled_reason: str) -> str | None:
    """Why a CPU backend built on torch's fused attention cannot run ``call`` (None: it
    can): the CPU only, not inside a compiled graph (``compiled_reason`` says why), the
    fused kernel present, fp32/bf16/fp16."""
    if call.device.type != "cpu":
        return "used on the CPU only"
    if call.compiling:
        return f"inside a compiled graph ({compiled_reason})"
    why = flash_cpu_available()
    if why:
        return why
    if call.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{call.dtype} (fused attention takes fp32/bf16/fp16)"
    return None


def _gather_can_run(call: Call) -> str | None:
    return cpu_fused_can_run(call, "its chunking reads mask values on the host")


def _masked_can_run(call: Call) -> str | None:
    why = _gather_can_run(call)
    if why:
        return why
    if call.density is None:
        return "plan density unknown"
    return None


def _masked_worth_it(call: Call) -> str | None:
    need = masked_min_density(call.block_m)
    if call.density < need:
        return f"density {call.density:.2f} < {need:g}: gathering the visited blocks is cheaper"
    elements = call.mask_batch * call.mask_heads * call.q_len * call.kv_len
    if elements > MASKED_MAX_ELEMENTS:
        return f"its {elements:.3g}-element mask would exceed {MASKED_MAX_ELEMENTS:.3g}"
    return None


def _flex_can_run(call: Call) -> str | None:
    if call.device.type != "cpu":
        return "used on the CPU only (on CUDA it is the benchmark baseline)"
    why = flex_available()
    if why:
        return why
    if call.compiling:
        return "inside a compiled graph (flex is compiled on its own)"
    if call.return_lse:
        # torch 2.13's inductor: "torch.compile on CPU only supports inference and
        # return_lse is not supported yet"
        return "compiled flex on the CPU returns no log-sum-exp (torch's limit), which this call needs"
    if call.grad:
        return "compiled flex on the CPU is inference-only (run under torch.no_grad())"
    if call.dtype not in (torch.float32, torch.bfloat16):
        return f"{call.dtype} (compiled flex on the CPU takes fp32/bf16)"
    return None


def _flex_worth_it(call: Call) -> str | None:
    if call.work < FLEX_MIN_WORK:
        return f"call too small for the compiled sparse kernel to pay ({call.work:.3g} < {FLEX_MIN_WORK:.3g} score elements)"
    return None


register(Backend("triton", "block_sparse", _triton_run, triton_can_run, "gen's Triton kernel on CUDA",
                 triton_worth_it))
# the dispatch (gen.attention.block_sparse_attention) checks inputs and plan once before it
# chooses; the CPU backends then skip those checks (~10 us a call at 320 tokens)
register(Backend("sdpa", "block_sparse", partial(dense_attention, prechecked=True), _sdpa_can_run,
                 "dense plan: torch's fused attention (the kernel stock attention runs)"))
register(Backend("masked", "block_sparse", partial(masked_attention, prechecked=True), _masked_can_run,
                 "dense-ish plan: torch's fused attention over every key with the plan as a mask",
                 _masked_worth_it, run_in_order=masked_attention_in_order))
register(Backend("gather", "block_sparse", partial(gathered_attention, prechecked=True), _gather_can_run,
                 "sparse plan: torch's fused attention on each query block's gathered key blocks",
                 run_in_order=gathered_attention_in_order))
register(Backend("flex", "block_sparse", flex_block_sparse_attention, _flex_can_run,
                 "sparse plan: compiled flex_attention with the plan as its BlockMask", _flex_worth_it))
register(Backend("torch", "block_sparse", reference.block_sparse_attention, lambda call: None,
                 "the PyTorch reference (runs anything)"))
