"""Named attention patterns for the ``mask`` method, so the demo can offer it without code.

``mask`` takes ``pattern=fn(qt, qh, qw, kt, kh, kw) -> bool tensor`` over the video tokens
of one call: long coordinate tensors in tokens (frame ``t``, row ``h``, column ``w`` after
VAE and patchify) that broadcast, queries ``(Nq, 1)`` against keys ``(1, Nk)``. The
functions below are plain module-level ``def``s (not lambdas) so their names show in
logs and the method's repr.

For an image model (FLUX) every token is in frame 0, so the frame patterns select
everything; use the spatial window there.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["PATTERNS", "DEFAULT_PATTERN", "pattern_name"]

SPATIAL_RADIUS = 2  # tokens (16 pixels each on Wan/HunyuanVideo/FLUX): a 5x5-token window


def frame_window(qt, qh, qw, kt, kh, kw):
    """Keys within one latent frame of the query (±1 frame), whole frames."""
    return (qt - kt).abs() <= 1


def frame_window_sink(qt, qh, qw, kt, kh, kw):
    """±1 frame plus every key of frame 0 (an attention sink on the first frame)."""
    return ((qt - kt).abs() <= 1) | (kt == 0)


def same_frame(qt, qh, qw, kt, kh, kw):
    """Only keys of the query's own latent frame (purely spatial attention)."""
    return qt == kt


def causal_frames(qt, qh, qw, kt, kh, kw):
    """Keys of the query's frame and all earlier frames (frame-causal)."""
    return kt <= qt


def spatial_window(qt, qh, qw, kt, kh, kw):
    """Keys within ±2 token rows and columns of the query, in every frame."""
    return ((qh - kh).abs() <= SPATIAL_RADIUS) & ((qw - kw).abs() <= SPATIAL_RADIUS)


PATTERNS: dict[str, Callable] = {
    "frame window ±1": frame_window,
    "frame window ±1 + first-frame sink": frame_window_sink,
    "same frame": same_frame,
    "causal frames": causal_frames,
    "spatial window ±2 tokens": spatial_window,
}
"""Label shown in the demo -> coordinate function."""

DEFAULT_PATTERN = "frame window ±1"


def pattern_name(fn) -> str | None:
    """The label of a built-in pattern function, ``None`` for anything else."""
    return next((name for name, f in PATTERNS.items() if f is fn), None)
