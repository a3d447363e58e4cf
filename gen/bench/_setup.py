"""The device and dtype every benchmark starts from, checked the same way.

A benchmark's ``dtype`` is the dtype of its inputs and weights, by name (``"bf16"``,
``"fp16"``, ``"fp32"``); its default follows the device: bf16 on a GPU, fp32 on the CPU,
where bf16 matmuls are emulated and time something else.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "bench_device", "bench_dtype"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench_device(device: str | torch.device | None, *, prefer_cuda: bool = True) -> torch.device:
    """``device`` (checked by ``gen.values.check_device``), or CUDA when available (and
    ``prefer_cuda``), else the CPU.

    Raises:
        ValueError: an unknown device, or CUDA asked for where torch sees none.
    """
    from gen.values import check_device

    if device is None and not prefer_cuda:
        return torch.device("cpu")
    return check_device(device)


def bench_dtype(name: str | None, device: torch.device, *, what: str = "dtype") -> str:
    """The dtype name ``name``, or the device's default (bf16 on CUDA, fp32 on the CPU).

    Raises:
        ValueError: a name outside ``DTYPES`` (the message names ``what``).
    """
    name = name or ("bf16" if device.type == "cuda" else "fp32")
    if name not in DTYPES:
        raise ValueError(f"{what} must be one of {sorted(DTYPES)}, got {name!r}.")
    return name
