"""Work-arounds for installed-library quirks, each narrow, idempotent and explained."""

from __future__ import annotations

__all__ = ["realign_cpu_tensors"]

def realign_cpu_tensors(modules, alignment: int = 64) -> int:
    """Copy CPU parameters and buffers that sit at unaligned addresses into fresh memory.

    ``from_pretrained`` memory-maps safetensors files, so a loaded tensor can start at
    any byte offset of the file. The CPU GEMM kernels pick a different code path for
    unaligned operands, which changes float32 results in the last bit (about 1e-7
    relative), so a loaded pipeline would not reproduce the one it was saved from
    exactly. Fresh allocations are 64-byte aligned. Returns the number of tensors copied.
    """
    copied = 0
    for module in modules:
        tensors = [*module.parameters(recurse=True), *module.buffers(recurse=True)]
        for t in tensors:
            if t.device.type == "cpu" and t.numel() and t.data_ptr() % alignment:
                t.data = t.data.clone()
                copied += 1
    return copied
