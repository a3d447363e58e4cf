"""Checks of the values a user hands gen, one function per kind of value.

The CLI, the Python API (``gen.render``, ``gen.batch``, the run core) and the demo call
these, so a value is refused the same way, with the same message, wherever it comes in,
and before any model is loaded. Each returns the value normalised (e.g. a dtype name as
a ``torch.dtype``) or raises ``ValueError`` with one line saying what to do.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

__all__ = [
    "MAX_STEPS",
    "VIDEO_SUFFIXES",
    "IMAGE_SUFFIXES",
    "check_device",
    "check_dtype",
    "check_guidance",
    "check_output_path",
    "check_prompt",
    "check_port",
    "check_tokens",
    "check_ulysses",
    "check_seconds",
    "check_seed",
    "check_steps",
]

MAX_TOKENS = 250_000
"""Video tokens per attention call above which a render is refused unless the
``GEN_MAX_TOKENS`` environment variable raises the limit: twice HunyuanVideo's 720p x 129
frames (118,800), the largest geometry the supported models were trained at."""

MAX_SECONDS = 3600.0
"""Longest video ``gen long`` makes unless asked for more (``max_seconds=``): one hour."""

MAX_STEPS = 1000
"""Denoising steps above this are refused: the schedulers of Wan, HunyuanVideo and FLUX
train on 1000 timesteps, so more steps only repeat timesteps."""

VIDEO_SUFFIXES = (".mp4", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_steps(value, what: str = "steps") -> int:
    """Denoising steps: an int in ``[1, MAX_STEPS]``."""
    if not _is_int(value):
        raise ValueError(f"{what} must be a whole number of denoising steps, got {value!r}.")
    if not 1 <= value <= MAX_STEPS:
        raise ValueError(f"{what} must be between 1 and {MAX_STEPS}, got {value}.")
    return value


def check_seed(value) -> int:
    """A generator seed: an int in ``[0, 2**63)`` (what ``torch.Generator.manual_seed`` takes)."""
    if not _is_int(value):
        raise ValueError(f"seed must be a whole number, got {value!r}.")
    if not 0 <= value < 2**63:
        raise ValueError(f"seed must be between 0 and 2**63 - 1, got {value}.")
    return value


def check_guidance(value) -> float:
    """A guidance scale: a finite number >= 0 (1 or less turns classifier-free guidance off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"guidance must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {value}.")
    return value


def check_prompt(value) -> str:
    """A prompt: a non-empty string."""
    if not isinstance(value, str):
        raise ValueError(f"the prompt must be text, got {type(value).__name__}.")
    if not value.strip():
        raise ValueError("the prompt is empty; write what the clip should show.")
    return value


def check_dtype(value) -> torch.dtype | None:
    """``None`` (the model's own) or a dtype name (``bf16``, ``fp16``, ``fp32``) or a
    floating ``torch.dtype`` other than fp64; returns the ``torch.dtype``."""
    if value is None or isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value.strip().lower() in _DTYPES:
        return _DTYPES[value.strip().lower()]
    raise ValueError(f"dtype must be bf16, fp16 or fp32, got {value!r}.")


def check_device(value) -> torch.device:
    """``None`` (CUDA when available, else the CPU) or a device this machine has."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {value!r}; use cpu or cuda (cuda:N for one GPU of several).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {value!r} asked for, but torch sees no CUDA device here; use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif dev.type != "cpu":
        raise ValueError(f"device {value!r} is not supported; use cpu or cuda.")
    return dev


def check_output_path(path, *, video: bool) -> Path:
    """An output file gen can write: a supported extension for the model's task (video:
    ``.mp4``/``.gif``; image: ``.png``/``.jpg``/``.webp``), not a folder, in a folder that
    exists or can be made, and that this user can write to. Checked before any work."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    allowed = VIDEO_SUFFIXES if video else IMAGE_SUFFIXES
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name ending in {' or '.join(allowed)}.")
    if suffix not in allowed:
        kind = "a video model writes" if video else "an image model writes"
        raise ValueError(f"{kind} {', '.join(allowed[:-1])} or {allowed[-1]}; {path.name!r} has "
                         f"{suffix or 'no extension'}.")
    check_writable_folder(path.parent)
    return path


def check_writable_folder(folder) -> Path:
    """``folder`` exists (or is made) and this user can create files in it."""
    folder = Path(folder).expanduser()
    parent = folder
    while not parent.exists():  # the nearest existing ancestor decides whether it can be made
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write under {folder}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {parent} (permission denied); choose another folder.")
    return folder


def check_seconds(value, *, limit: float = MAX_SECONDS) -> float:
    """A video length in seconds: finite, > 0 and at most ``limit`` (lift it on purpose)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"seconds must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"seconds must be a finite number > 0, got {value}.")
    if value > limit:
        raise ValueError(f"{value:g} s is more than the {limit:g} s limit; ask for less, or raise the limit "
                         f"(max_seconds=) if you mean it.")
    return value


def check_port(value) -> int:
    """A TCP port to serve on: 1 to 65535."""
    if not _is_int(value) or not 1 <= value <= 65535:
        raise ValueError(f"port must be a whole number from 1 to 65535, got {value!r}.")
    return value


def check_ulysses(value, *, unit: str = "processes per attention call") -> int:
    """The sequence-parallel degree: an int >= 1 (1: no sequence parallelism). ``unit``
    says in the message what is counted where it comes in."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"ulysses must be an int >= 1 ({unit}), got {value!r}.")
    return value


def check_tokens(grid: tuple[int, int, int], *, what: str) -> int:
    """``frames x rows x cols`` video tokens of one attention call, at most ``MAX_TOKENS``
    (or ``GEN_MAX_TOKENS``); the refusal says what the request would cost."""
    tokens = grid[0] * grid[1] * grid[2]
    limit = int(os.environ.get("GEN_MAX_TOKENS", MAX_TOKENS))
    if tokens > limit:
        # one bf16 attention score matrix per head, were it materialised: what dense attention costs
        gib = tokens * tokens * 2 / 2**30
        raise ValueError(f"{what} is {grid[0]}x{grid[1]}x{grid[2]} = {tokens:,} video tokens per attention call, "
                         f"more than the limit of {limit:,} (dense attention over it is {gib:,.0f} GiB of "
                         f"scores per head); ask for less, or set GEN_MAX_TOKENS if you mean it.")
    return tokens
