"""What every Triton kernel file shares: constants, the interpreter check, device limits.

Module-level constants read inside a ``@triton.jit`` function must be ``tl.constexpr``:
the compiler refuses any other global (``NameError: Cannot access global variable``),
while the interpreter (``TRITON_INTERPRET=1``) reads plain Python globals happily, so a
plain float here passes every CPU test and crashes on the first GPU call. Host-side
constants stay plain floats.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "LN2",
    "LOG2E",
    "SMEM_LIMIT",
    "estimate_shared_memory",
    "fits_device",
    "tile_fits_registers",
    "interpreting",
    "interpreter_ready",
    "shared_memory_limit",
    "sm_count",
    "triton_available_for",
]

# Read inside kernels: lse = log2-sum-exp2 * ln 2.
LN2 = tl.constexpr(0.6931471805599453)
# Host side only: the launchers fold log2(e) into the softmax scale so kernels use exp2.
LOG2E = 1.4426950408889634

# Largest dynamic shared memory one program may use, bytes, by compute capability
# (major * 10 + minor). H100/H200 (sm_90): 227 KiB; A100 (sm_80): 163 KiB; consumer
# Ampere/Ada (sm_86/89): 99 KiB. Used to prune autotune configs before launch and by the
# ahead-of-time compile check.
SMEM_LIMIT = {90: 232448, 80: 166912, 86: 101376, 89: 101376, 87: 166912}


def estimate_shared_memory(conf: triton.Config, head_dim: int, elem_bytes: int) -> int:
    """Upper estimate, in bytes, of the shared memory ``conf`` needs at ``head_dim``.

    K and V tiles are multi-buffered ``num_stages`` deep (``BLOCK_N x D`` each), plus one
    ``BLOCK_M x BLOCK_N`` staging tile for P. Checked against ptxas figures for every
    config by the ahead-of-time compile test (``gen check kernels``): it must never
    under-estimate a config that is kept.
    """
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    d = 1 << (head_dim - 1).bit_length()
    kv = 2 * bn * d * elem_bytes * conf.num_stages
    return kv + bm * bn * elem_bytes + bm * d * elem_bytes


def tile_fits_registers(conf: triton.Config, head_dim: int) -> bool:
    """Whether ``conf``'s tile stays inside the register budget at ``head_dim`` (bf16/fp16,
    sm_90): the score tile ``BLOCK_M x BLOCK_N`` plus the accumulator ``BLOCK_M x D`` per
    warp group. Measured with ptxas by ``gen check kernels --full`` (Triton 3.9): with 4
    warps, 64x128 at D=128 and 128x128 at D=64 spill (80-190 B) while 64x64 at D=128 and
    64x128 at D=64 do not; with 8 warps 128x128 at D=128 fits (254 registers); at D=256
    only tiles up to 64x64 fit."""
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    d = 1 << (head_dim - 1).bit_length()
    if d > 128 and bm * bn > 64 * 64:
        return False
    return bm * bn + bm * d <= (12288 if conf.num_warps <= 4 else 32768)


def fits_device(conf: triton.Config, head_dim: int, elem_bytes: int, smem_limit: int) -> bool:
    """Whether ``conf`` at ``head_dim`` stays inside the register budget
    (:func:`tile_fits_registers`) and ``smem_limit`` bytes of shared memory
    (:func:`estimate_shared_memory`): what every kernel's autotune pruning checks."""
    return tile_fits_registers(conf, head_dim) and estimate_shared_memory(conf, head_dim, elem_bytes) <= smem_limit


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def interpreter_ready() -> bool:
    """Triton builds its library functions (tl.zeros, tl.sum, ...) for the interpreter
    only when ``TRITON_INTERPRET`` is set before triton is first imported."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def triton_available_for(device: torch.device) -> tuple[bool, str]:
    """Whether gen's Triton kernels can run on ``device``, and why not."""
    if device.type == "cuda":
        return True, "CUDA device"
    if interpreting():
        if not interpreter_ready():
            return False, (
                "TRITON_INTERPRET=1 was set after triton was imported; set it before the first "
                "`import triton` / `import gen` (e.g. in the shell), or use backend='torch'."
            )
        return True, "TRITON_INTERPRET=1 (interpreter, slow: for testing)"
    return False, (
        f"Triton kernels need a CUDA device, got {device.type}; set TRITON_INTERPRET=1 to run "
        "them through the (slow) interpreter, or use backend='torch'."
    )


@functools.cache
def _device_props(index: int):
    return torch.cuda.get_device_properties(index)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device`` (CUDA), else the sm_90 figure."""
    if device.type != "cuda":
        return SMEM_LIMIT[90]
    props = _device_props(_index(device))
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return int(optin) or SMEM_LIMIT.get(props.major * 10 + props.minor, SMEM_LIMIT[80])


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (CUDA); 0 elsewhere (no split decisions)."""
    if device.type != "cuda":
        return 0
    return int(_device_props(_index(device)).multi_processor_count)
