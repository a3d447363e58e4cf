"""Simple vision for scoring ``shapes-wan`` clips against their captions.

Every pixel is given the name of its nearest palette colour (``grammar.COLORS``). The
background is the most common colour on the frame border; the foreground mask is every
pixel of another colour; the foreground colour is the most common colour in the mask.
The centroid of the mask, frame by frame, gives the track; its least-squares velocity
and its turning points give the motion (``still``, ``bouncing`` or a direction); the
mask's fill of its bounding box gives the shape (square ~1, circle ~0.79, triangle ~0.5);
its connected regions, how many objects a frame shows (a caption asks for one).

Thresholds are in pixels at 128x128 (scaled with the frame size) and were set on clips
drawn by ``clips.render_clip``, where every attribute reads back right (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grammar import COLORS, Caption

__all__ = ["ATTRIBUTES", "ClipReading", "read_clip", "score_clip", "score_reading"]

ATTRIBUTES = ("color", "background", "shape", "motion", "color_and_motion", "one_object")
"""The verdicts of ``score_clip``, in the order score tables show them."""

_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[n] for n in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class ClipReading:
    """What the vision read from a clip.

    Attributes:
        background: colour name of the background.
        color: colour name of the foreground (None: no foreground found).
        shape: ``circle``/``square``/``triangle`` from the mask's bounding-box fill (None: no mask).
        motion: ``left``/``right``/``up``/``down``/``still``/``bouncing`` (None: no track).
        velocity: least-squares ``(vx, vy)`` of the centroid in pixels per frame.
        coverage: mean fraction of pixels in the foreground mask.
        objects: median over frames of the connected foreground regions of at least 20
            pixels (at 128x128; 0: none): 1 is what a caption describes.
    """

    background: str
    color: str | None
    shape: str | None
    motion: str | None
    velocity: tuple[float, float]
    coverage: float
    objects: int = 0


def _labels(frames: np.ndarray) -> np.ndarray:
    """``(F, H, W)`` palette index of each pixel of ``(F, H, W, 3)`` uint8 frames."""
    px = frames.astype(np.float32).reshape(-1, 1, 3)
    d = ((px - _PALETTE[None]) ** 2).sum(-1)
    return d.argmin(-1).reshape(frames.shape[:3])


def _regions(mask: np.ndarray, min_area: float, wrap: bool) -> int:
    """Connected regions (4-neighbour) of a 2-D mask with at least ``min_area`` pixels;
    ``wrap``: the frame is a torus (a shape split across an edge is one region)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n == 0:
        return 0
    parent = np.arange(n + 1)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if wrap:  # join regions that meet across opposite edges
        for a, b in ((lab[:, 0], lab[:, -1]), (lab[0], lab[-1])):
            for i, j in zip(a.tolist(), b.tolist()):
                if i and j:
                    parent[find(i)] = find(j)
    roots = np.array([find(i) for i in range(n + 1)])
    areas = np.bincount(roots[lab[mask]], minlength=n + 1)
    return int((areas >= min_area).sum())


def _motion(xs: np.ndarray, ys: np.ndarray, t: np.ndarray, scale: float) -> tuple[str, float, float]:
    vx = float(np.polyfit(t, xs, 1)[0])
    vy = float(np.polyfit(t, ys, 1)[0])
    ry, rx = np.ptp(ys), np.ptp(xs)
    if max(rx, ry) < 6 * scale and np.hypot(vx, vy) < 0.5 * scale:
        return "still", vx, vy
    # turning points of y: a bounce reverses vertically (prominence 4 px), a slide does not
    dy = np.diff(ys)
    dy = dy[np.abs(dy) > 0.5 * scale]
    turns = int(np.sum(np.sign(dy[1:]) != np.sign(dy[:-1]))) if dy.size > 1 else 0
    if turns >= 1 and ry > 8 * scale and ry > 1.5 * rx:
        return "bouncing", vx, vy
    if abs(vx) >= abs(vy):
        return ("right" if vx > 0 else "left"), vx, vy
    return ("down" if vy > 0 else "up"), vx, vy


def read_clip(frames: np.ndarray, *, wrap: bool = False) -> ClipReading:
    """Read background, foreground colour, shape and motion from ``(F, H, W, 3)`` uint8 frames.

    ``wrap=True`` reads long clips whose shape leaves one edge and re-enters at the other
    (circular centroids, unwrapped track); the bounding-box shape reading is only right
    in frames where the shape is whole.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3) RGB, got shape {frames.shape}.")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255 + 0.5).astype(np.uint8)
    n, h, w, _ = frames.shape
    scale = min(h, w) / 128.0
    lab = _labels(frames)
    border = np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    mask = lab != bg
    coverage = float(mask.mean())
    objects = int(np.median([_regions(m, 20 * scale**2, wrap) for m in mask]))
    if mask.sum() < 20 * scale**2 * n:
        return ClipReading(_NAMES[bg], None, None, None, (0.0, 0.0), coverage, objects)
    color = _NAMES[int(np.bincount(lab[mask], minlength=len(_NAMES)).argmax())]
    yy, xx = np.mgrid[0:h, 0:w]
    xs, ys, ts, fills = [], [], [], []
    for i in range(n):
        m = mask[i]
        area = int(m.sum())
        if area < 20 * scale**2:
            continue
        if wrap:  # circular means: a shape split across an edge has its centre across it
            ax, ay = 2 * np.pi * (xx[m] + 0.5) / w, 2 * np.pi * (yy[m] + 0.5) / h
            xs.append(float(np.angle(np.exp(1j * ax).mean()) % (2 * np.pi) * w / (2 * np.pi)))
            ys.append(float(np.angle(np.exp(1j * ay).mean()) % (2 * np.pi) * h / (2 * np.pi)))
        else:
            xs.append(float((xx * m).sum() / area))
            ys.append(float((yy * m).sum() / area))
        ts.append(i)
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        fills.append(area / box)
    if len(ts) < 3:
        return ClipReading(_NAMES[bg], color, None, None, (0.0, 0.0), coverage, objects)
    fill = float(np.median(fills))
    shape = "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"
    xs, ys = np.asarray(xs), np.asarray(ys)
    if wrap:  # unwrap the track across the edges (steps of more than half the frame)
        xs = np.unwrap(xs * 2 * np.pi / w) * w / (2 * np.pi)
        ys = np.unwrap(ys * 2 * np.pi / h) * h / (2 * np.pi)
    motion, vx, vy = _motion(xs, ys, np.asarray(ts, dtype=np.float64), scale)
    return ClipReading(_NAMES[bg], color, shape, motion, (vx, vy), coverage, objects)


def score_clip(frames: np.ndarray, caption: Caption, *, wrap: bool = False) -> dict[str, bool | None]:
    """Per attribute, whether the clip shows what ``caption`` says (None: the caption leaves it out).

    Keys (``ATTRIBUTES``): ``color``, ``background``, ``shape``, ``motion``,
    ``color_and_motion`` (both right) and ``one_object`` (the frames show one object, as
    every caption says). ``wrap``: as ``read_clip``.
    """
    return score_reading(read_clip(frames, wrap=wrap), caption)


def score_reading(r: ClipReading, caption: Caption) -> dict[str, bool | None]:
    """``score_clip`` of a clip already read (``read_clip``): for callers that keep the reading too."""
    out: dict[str, bool | None] = {
        "color": r.color == caption.color,
        "background": None if caption.background is None else r.background == caption.background,
        "shape": r.shape == caption.shape,
        "motion": None if caption.motion is None else r.motion == caption.motion,
    }
    out["color_and_motion"] = bool(out["color"]) and out["motion"] is not False
    out["one_object"] = r.objects == 1
    return out
