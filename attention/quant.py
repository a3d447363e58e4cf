"""INT8 block-sparse attention (PARO's quantized kernel): the entry points over the
backend registry.

* :func:`quantize_qk`: Q to int8 with one fp32 scale per 32 consecutive tokens, K with one
  per 64 (per batch and head, over all channels): ``scale = amax(|x|)/127``, ``x_int8 =
  round(x/scale)`` half to even, clamped to ``[-127, 127]``; a group whose scale is 0 (all
  zeros) gets scale 1 and integers 0.
* :func:`quantized_block_sparse_attention`: block-sparse attention on a ``BlockPlan``
  with the logits ``int32(q_int8 · k_int8) · q_scale[row group] · k_scale[key group] ·
  softmax scale``; ``quant="int8"`` keeps V in its dtype (P·V accumulated in fp32),
  ``"int8-pv"`` also quantizes P (fixed scale 1/127: ``P <= 1`` after subtracting the row
  max) and V (one scale per 64 keys and per channel), ``"none"`` is the plain
  block-sparse attention (``gen.attention.block_sparse_attention``).

The exact arithmetic, and why V gets per-channel block scales, is in
``gen.kernels.quant_attention`` (kernels) and :mod:`gen.attention.quant_reference` (the
PyTorch emulation: the oracle and the CPU path). ``backend=None`` takes the Triton kernels
on CUDA and the emulation elsewhere (ops ``"quantize_qk"`` and ``"quant_block_sparse"`` of
``gen.attention.backends``), logging why; ``"triton"`` or ``"torch"`` asks for one (one that
cannot run raises ``ValueError`` saying why).
"""

from __future__ import annotations

import torch

from gen.kernels._checks import check_plan, check_qkv

from .backends import choose
from .backends.quant import describe
from .quant_reference import QUANT_MODES, dequantize, quantize_v_reference

__all__ = ["QUANT_MODES", "dequantize", "quantize_qk", "quantize_v_reference", "quantized_block_sparse_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quantize_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize Q per 32 tokens and K per 64 tokens to int8.

    Args:
        q: ``(B, H, Sq, D)``; k ``(B, H, Skv, D)``; fp16/bf16/fp32, same dtype and device.
        kv_valid: optional int ``(B,)``: keys at positions ``>= kv_valid[b]`` are left out
            of their group's scale and quantize to 0.
        kv_mask: optional bool ``(Skv,)`` or ``(B, Skv)``: keys flagged False likewise.
        backend: None (automatic), ``"triton"`` or ``"torch"``.

    Returns:
        ``(q_int8, q_scale, k_int8, k_scale)``: int8 ``(B, H, Sq, D)`` and ``(B, H, Skv, D)``
        (contiguous), fp32 ``(B, H, ceil(Sq/32))`` and ``(B, H, ceil(Skv/64))``. Both
        backends give the same bits.
    """
    _check_inputs(q, k, k)
    chosen = choose("quantize_qk", describe(q, k), backend)
    return chosen.backend.run(q, k, kv_valid=kv_valid, kv_mask=kv_mask)


def quantized_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    quant: str = "int8",
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Block-sparse attention with quantized QK (and PV).

    Same contract as ``gen.attention.block_sparse_attention``: any lengths (ragged last
    blocks), per-sample key padding (``kv_valid``, ``kv_mask``), plans with batch/head dims
    ``B|1``/``H|1``, rows that see no valid key give zeros and ``lse = -inf``.

    Args:
        q: ``(B, H, Sq, D)``; k, v ``(B, H, Skv, D)``; fp16/bf16/fp32 (the Triton kernel:
            ``D`` a multiple of 16 in [32, 256], plan blocks powers of two in [32, 256];
            PARO uses 64 x 64).
        plan: ``gen.attention.BlockPlan`` for ``Sq``/``Skv``.
        quant: ``"int8"`` (INT8 QK, V in its dtype, P·V in fp32), ``"int8-pv"`` (INT8 QK
            and PV) or ``"none"`` (plain block-sparse attention).
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_valid: optional int ``(B,)``; kv_mask: optional bool ``(Skv,)``/``(B, Skv)``.
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.
        backend: None (automatic), ``"triton"`` or ``"torch"``; with ``quant="none"`` any
            block-sparse backend (``gen.attention.BACKENDS``).

    Returns:
        ``out (B, H, Sq, D)`` in ``q.dtype``, and ``lse`` when asked.
    """
    if not isinstance(quant, str) or quant not in QUANT_MODES:
        raise ValueError(f"unknown quant {quant!r}; use one of {', '.join(repr(m) for m in QUANT_MODES)}.")
    if quant == "none":
        from .dispatch import block_sparse_attention

        return block_sparse_attention(q, k, v, plan, scale=scale, kv_valid=kv_valid, kv_mask=kv_mask,
                                      return_lse=return_lse, backend=backend)
    _check_inputs(q, k, v)
    check_plan(plan, q, k)
    chosen = choose("quant_block_sparse", describe(q, k, plan, return_lse=return_lse), backend)
    return chosen.backend.run(q, k, v, plan, quant=quant, scale=scale, kv_valid=kv_valid, kv_mask=kv_mask,
                              return_lse=return_lse)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_qkv(q, k, v, allowed_dtypes=_DTYPES)
