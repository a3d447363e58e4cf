"""Procedural clips for the ``shapes-wan`` models: one flat shape moving on a flat background.

``sample_motion(caption, rng, ...)`` draws the free parameters of a clip (size, start,
speed, bounce) for a caption, and ``render_clip(caption, motion, ...)`` draws the frames,
anti-aliased from signed distance fields (one pixel of smooth edge), so the same seed
always gives the same pixels. Units are pixels and frames; ``y`` grows downwards.

Motions: ``left/right/up/down`` move at constant speed; ``still`` stays put; ``bouncing``
hops vertically, ``|sin|``-shaped, on a floor. Short clips (``wrap=False``, the
text-to-video data) keep the whole shape inside the frame on every frame, bounded by the
shape's own extent (``shape_extent``: a triangle reaches 1.5 radii above its centre but
0.75 below it); long clips (``wrap=True``, the causal model's data) let a moving shape
leave one edge and come back in at the opposite one, so "moving right" stays true for a
video of any length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .grammar import BACKGROUNDS, COLORS, Caption

__all__ = ["ClipMotion", "DIRECTIONS", "render_clip", "sample_clip", "sample_motion", "shape_extent"]

# Unit velocity of each directional motion, image axes (x right, y down).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
}  # fmt: skip

_MARGIN = 2.0  # pixels kept between a non-wrapping shape and the frame edge
# Sizes at 128 px (scaled with the frame). Radii 10-17 px (2-5% of the frame) left the
# shape's colour to 1 in 3 generations after 1000 image steps: the shape gets too little
# of the loss.
RADIUS = (16.0, 26.0)
SPEED = (1.5, 3.0)  # pixels per frame


_SQUARE_HALF = 0.9  # half side of the square, in radii (same area as the circle to within 3%)
_TRIANGLE_HALF = 1.3  # half side of the triangle, in radii


def shape_extent(shape: str, radius: float) -> tuple[float, float, float, float]:
    """Distances ``(left, right, top, bottom)`` in pixels from the centre ``render_clip``
    draws ``shape`` around to the edges of its bounding box (``y`` down; the one pixel of
    anti-aliased edge not included).

    A circle reaches ``radius`` every way and a square ``0.9 radius``; the triangle points
    up and is centred on its centroid: half its side (``1.3 radius``) left and right, its
    circumradius (``1.5 radius``) up to the apex and its inradius (``0.75 radius``) down.
    """
    if shape == "circle":
        return (radius,) * 4
    if shape == "square":
        return (_SQUARE_HALF * radius,) * 4
    s = _TRIANGLE_HALF * radius
    return s, s, 2 * s / math.sqrt(3.0), s / math.sqrt(3.0)


@dataclass(frozen=True)
class ClipMotion:
    """The free parameters of one clip.

    Attributes:
        x, y: centre of the shape at frame 0 (pixels; for ``bouncing``, y is the floor,
            the lowest centre position).
        radius: size (pixels): circle radius, half the square's side, a triangle of the
            same visual weight.
        speed: pixels per frame (directional motions).
        amplitude: bounce height in pixels (``bouncing``).
        period: frames per bounce (``bouncing``).
        phase: bounce phase in [0, 1) of a period (``bouncing``).
    """

    x: float
    y: float
    radius: float
    speed: float = 0.0
    amplitude: float = 0.0
    period: float = 10.0
    phase: float = 0.0

    def centre(self, motion: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre ``(x, y)`` at frames ``t`` (not wrapped)."""
        t = np.asarray(t, dtype=np.float64)
        if motion in DIRECTIONS:
            dx, dy = DIRECTIONS[motion]
            return self.x + dx * self.speed * t, self.y + dy * self.speed * t
        if motion == "bouncing":
            hop = np.abs(np.sin(math.pi * (t / self.period + self.phase)))
            return np.full_like(t, self.x), self.y - self.amplitude * hop
        return np.full_like(t, self.x), np.full_like(t, self.y)


def sample_motion(caption: Caption, rng: np.random.Generator, *, frames: int, size: int = 128,
                  wrap: bool = False) -> ClipMotion:
    """Draw size, start, speed and bounce for ``caption`` (its motion must be set).

    Radii ``RADIUS``, speeds ``SPEED`` (px/frame), bounces 24-44 px high every 8-12 frames
    (at 128 px; scaled with ``size``). With ``wrap=False`` the whole shape (its
    ``shape_extent``, plus ``_MARGIN`` pixels) stays inside the frame on all ``frames``.
    """
    motion = caption.motion or "still"
    k = size / 128.0
    r = float(rng.uniform(RADIUS[0], RADIUS[1])) * k
    left, right, top, bottom = shape_extent(caption.shape, r)
    xlo, xhi = left + _MARGIN, size - right - _MARGIN  # where the centre may go
    ylo, yhi = top + _MARGIN, size - bottom - _MARGIN
    speed = float(rng.uniform(SPEED[0], SPEED[1])) * k
    if motion in DIRECTIONS and not wrap:
        dx, dy = DIRECTIONS[motion]
        (lo, hi), (clo, chi) = ((xlo, xhi), (ylo, yhi)) if dx else ((ylo, yhi), (xlo, xhi))
        travel = speed * (frames - 1)
        if travel > hi - lo:  # a long clip cannot stay inside: slow down to fit
            speed = (hi - lo) / max(frames - 1, 1)
            travel = speed * (frames - 1)
        along = float(rng.uniform(lo, max(lo, hi - travel)))  # max: rounding of a fitted travel
        start = along if (dx > 0 or dy > 0) else lo + hi - along  # mirrored: ends inside too
        across = float(rng.uniform(clo, chi))
        x, y = (start, across) if dx else (across, start)
        return ClipMotion(x, y, r, speed=speed)
    if motion == "bouncing":
        amp = float(rng.uniform(24.0, 44.0)) * k
        amp = min(amp, yhi - ylo)
        floor = float(rng.uniform(ylo + amp, yhi))
        return ClipMotion(float(rng.uniform(xlo, xhi)), floor, r, amplitude=amp,
                          period=float(rng.uniform(8.0, 12.0)), phase=float(rng.uniform(0.0, 1.0)))
    x = float(rng.uniform(0, size) if wrap else rng.uniform(xlo, xhi))
    y = float(rng.uniform(0, size) if wrap else rng.uniform(ylo, yhi))
    return ClipMotion(x, y, r, speed=speed if motion in DIRECTIONS else 0.0)


def _sdf(shape: str, px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) to ``shape`` centred at the origin."""
    if shape == "circle":
        return np.hypot(px, py) - r
    if shape == "square":
        a = _SQUARE_HALF * r
        qx, qy = np.abs(px) - a, np.abs(py) - a
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    # equilateral triangle pointing up, half-side s, centred on its centroid
    s = _TRIANGLE_HALF * r
    k = math.sqrt(3.0)
    x, y = np.abs(px) - s, -py + s / k
    flip = x + k * y > 0
    x, y = np.where(flip, (x - k * y) / 2, x), np.where(flip, (-k * x - y) / 2, y)
    x = x - np.clip(x, -2 * s, 0)
    return -np.hypot(x, y) * np.sign(y)


def render_clip(caption: Caption, motion: ClipMotion, *, frames: int, size: int = 128,
                wrap: bool = False, start: int = 0) -> np.ndarray:
    """Draw the clip: ``(frames, size, size, 3)`` float32 in [0, 1].

    Args:
        caption: what to draw (``motion``/``background`` None draw ``still`` / ``black``).
        motion: the clip's parameters (``sample_motion``).
        frames: number of frames.
        size: height = width in pixels.
        wrap: positions wrap around the frame edges (a shape leaving at the right comes
            back in at the left).
        start: index of the first frame drawn (the same clip continues across calls).
    """
    fg = np.asarray(COLORS[caption.color], dtype=np.float32) / 255.0
    bg = np.asarray(COLORS[caption.background or BACKGROUNDS[0]], dtype=np.float32) / 255.0
    coords = np.arange(size, dtype=np.float64) + 0.5
    t = np.arange(start, start + frames, dtype=np.float64)
    cx, cy = motion.centre(caption.motion or "still", t)
    out = np.empty((frames, size, size, 3), dtype=np.float32)
    for i in range(frames):
        px, py = coords[None, :] - cx[i], coords[:, None] - cy[i]
        if wrap:  # nearest periodic image of the centre
            px = (px + size / 2) % size - size / 2
            py = (py + size / 2) % size - size / 2
        cover = np.clip(0.5 - _sdf(caption.shape, px, py, motion.radius), 0.0, 1.0).astype(np.float32)
        out[i] = bg + (fg - bg) * cover[..., None]
    return out


def sample_clip(caption: Caption, seed: int, *, frames: int, size: int = 128, wrap: bool = False) -> np.ndarray:
    """``render_clip`` of the motion ``sample_motion`` draws from ``seed``."""
    rng = np.random.default_rng(seed)
    m = sample_motion(caption, rng, frames=frames, size=size, wrap=wrap)
    return render_clip(caption, m, frames=frames, size=size, wrap=wrap)
