"""How close two renders are: PSNR and SSIM on uint8 frames.

Both take ``(F, H, W, 3)`` uint8 arrays (or ``(H, W, 3)`` for one image) of the same
shape, e.g. a dense and a sparse render from the same seed, and compare them as they
came out of the pipeline (before video encoding, so codec noise does not count).

- PSNR (dB) = 10 log10(255² / MSE), the MSE taken over every pixel and channel of the
  whole clip; ``inf`` when the clips are identical.
- SSIM is the structural similarity of Wang, Bovik, Sheikh and Simoncelli (IEEE TIP
  2004): an 11x11 Gaussian window with sigma 1.5 pixels, C1 = (0.01·255)², C2 = (0.03·255)²,
  computed per colour channel over the window positions that fit inside the frame, then
  averaged over positions, channels and frames. 1.0 means identical. Frames smaller
  than the window use a window as large as the frame.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["psnr", "ssim"]

_WINDOW = 11  # pixels
_SIGMA = 1.5  # pixels
_C1 = (0.01 * 255.0) ** 2
_C2 = (0.03 * 255.0) ** 2


def _check(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare frames of shapes {a.shape} and {b.shape}; render both at one size.")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"compare uint8 frames (0..255), got {a.dtype} and {b.dtype}.")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3) or (H, W, 3), got {a.shape}.")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 clips (``inf`` if identical)."""
    a, b = _check(a, b)
    # accumulate per frame in float64: a whole 81x720x1280 clip in float64 would be 1.8 GB
    total = sum(float(np.square(fa.astype(np.float64) - fb.astype(np.float64)).sum()) for fa, fb in zip(a, b))
    mse = total / a.size
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian(size: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * _SIGMA**2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM between two uint8 clips (1.0 = identical); see the module docstring."""
    a, b = _check(a, b)
    size = min(_WINDOW, a.shape[1], a.shape[2])
    g = _gaussian(size)
    # separable filter: one pass along rows, one along columns ("valid" positions only)
    rows, cols = g.view(1, 1, size, 1), g.view(1, 1, 1, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, rows), cols)

    scores = []
    for fa, fb in zip(a, b):  # one frame at a time bounds memory on long clips
        x = torch.from_numpy(fa).to(torch.float64).permute(2, 0, 1).unsqueeze(1)  # (3, 1, H, W)
        y = torch.from_numpy(fb).to(torch.float64).permute(2, 0, 1).unsqueeze(1)
        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx
        vy = blur(y * y) - my * my
        cxy = blur(x * y) - mx * my
        s = ((2 * mx * my + _C1) * (2 * cxy + _C2)) / ((mx * mx + my * my + _C1) * (vx + vy + _C2))
        scores.append(float(s.mean()))
    return float(np.mean(scores))
