"""Attention over a frame-slotted KV cache: pure-PyTorch reference and backend dispatch.

The long-video runner (``gen.pipelines.ar``) keeps each layer's keys and values in one
buffer of frame *slots* ``(B, n_slots * tokens_per_frame, H, D)``: pinned sink frames
and a ring of recent frames, with the current chunk's own keys written into their slots
before it attends. A call names the frames it attends by slot, in order
(``frame_slots``), so ``[sink | recent window | current chunk]`` is read straight from
the buffer by index arithmetic: nothing is concatenated or cloned.

Keys may be stored with their *temporal* rotary embedding not yet applied; the call
then passes one temporal position per attended frame (``key_pos``) and the tables
``rope_cos``/``rope_sin`` ``(P, D)`` (Wan's interleaved-pair convention, cos = 1 and
sin = 0 on the dims that are not rotated), and the rotation is applied as keys are
read. That is what lets a sink be re-roped next to the window (Rolling Forcing,
StreamingLLM), positions stay bounded for any video length, and FLEX's modulated
frequencies be swapped in without touching the cache.

``cache_attention_reference`` here is the oracle; ``gen.kernels.cache_attention`` is the
Triton kernel with the same contract, and ``cache_attention(..., backend=None)`` picks
one through the backend registry (``gen.attention.backends``, op ``"cache"``: Triton on
CUDA, this reference elsewhere).
"""

from __future__ import annotations

import math

import torch

from gen.kernels.cache_attention import check_cache_inputs

__all__ = ["apply_interleaved_rope", "cache_attention", "cache_attention_reference"]


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved (even, odd) pairs.

    ``x (..., D)``; ``cos``/``sin`` broadcast to ``x`` with the pair's value repeated on
    both members (diffusers' ``repeat_interleave_real=True`` tables). Computed in the
    wider of ``x``'s dtype and the tables' dtype, returned in ``x.dtype``.
    """
    dtype = torch.promote_types(x.dtype, cos.dtype)
    xf = x.to(dtype)
    x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2].to(dtype), sin[..., 1::2].to(dtype)
    out = torch.empty_like(xf)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.to(x.dtype)


def _rows(frame_slots: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    offs = torch.arange(tokens_per_frame, device=frame_slots.device)
    return (frame_slots.long()[:, None] * tokens_per_frame + offs).flatten()


def cache_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    frame_slots: torch.Tensor,
    *,
    tokens_per_frame: int,
    key_pos: torch.Tensor | None = None,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over the cache frames ``frame_slots`` (PyTorch, fp32 math).

    Args:
        q: queries ``(B, Sq, H, D)``, already roped at their own positions.
        k_cache, v_cache: ``(B, n_slots * tokens_per_frame, H, D)`` slot buffers.
        frame_slots: int ``(F,)``: the slots attended, in order (keys ``F * tokens_per_frame``).
        tokens_per_frame: tokens in one latent frame after patchify.
        key_pos: int ``(F,)``: temporal RoPE position of each attended frame (rows of the tables).
        rope_cos, rope_sin: ``(P, D)`` tables applied to keys at read (identity dims: 1 / 0).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.

    Returns:
        ``out (B, Sq, H, D)`` in ``q.dtype`` (and ``lse``). Math is fp32 (fp64 for fp64 inputs).
    """
    _, _, _, d, _ = check_cache_inputs(q, k_cache, v_cache, frame_slots, tokens_per_frame, key_pos, rope_cos, rope_sin)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = _rows(frame_slots, tokens_per_frame)
    k = k_cache.index_select(1, rows).to(work)
    v = v_cache.index_select(1, rows).to(work)
    if rope_cos is not None:
        pos = key_pos.long().repeat_interleave(tokens_per_frame)
        k = apply_interleaved_rope(k, rope_cos[pos][None, :, None].to(work), rope_sin[pos][None, :, None].to(work))
    qf = q.to(work).transpose(1, 2)  # (B, H, Sq, D)
    s = qf @ k.permute(0, 2, 3, 1) * scale  # (B, H, Sq, Skv)
    lse = torch.logsumexp(s, dim=-1)
    out = (torch.softmax(s, dim=-1) @ v.transpose(1, 2)).transpose(1, 2).to(q.dtype)
    return (out, lse.float()) if return_lse else out


def cache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    frame_slots: torch.Tensor,
    *,
    tokens_per_frame: int,
    key_pos: torch.Tensor | None = None,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Cache attention with a chosen backend from ``gen.attention.backends`` (op
    ``"cache"``): ``"triton"``, ``"torch"`` or None (Triton on CUDA, the PyTorch reference
    elsewhere). Same arguments as the reference."""
    from .backends import choose
    from .backends.cache import describe

    kwargs = dict(tokens_per_frame=tokens_per_frame, key_pos=key_pos, rope_cos=rope_cos, rope_sin=rope_sin, scale=scale)
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not isinstance(frame_slots, torch.Tensor):
        return cache_attention_reference(q, k_cache, v_cache, frame_slots, **kwargs)  # raises, saying what is wrong
    call = describe(q, frame_slots.numel() * tokens_per_frame)
    return choose("cache", call, backend).backend.run(q, k_cache, v_cache, frame_slots, **kwargs)
