"""``TokenLayout``: the token grid of one attention call.

Counts are in tokens after patchify. Video tokens are frame-major
(``t * height * width + h * width + w``); text tokens, when the call has them, sit
before the video (``text_first=True``, FLUX) or after it (HunyuanVideo). Wan
self-attention has no text. Per-sample valid text length is a runtime quantity
(``kv_valid`` of the kernels), not part of the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TokenLayout"]


@dataclass(frozen=True)
class TokenLayout:
    """Token grid of one attention call.

    Args:
        frames: latent frames after temporal patchify (1 for images).
        height: token rows per frame after spatial patchify.
        width: token columns per frame after spatial patchify.
        text_len: text tokens in the same sequence (0 when none).
        text_first: True when text precedes the video tokens (FLUX), False when it
            follows them (HunyuanVideo).
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_first: bool = False

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"TokenLayout.{name} must be a positive int (tokens after patchify), got {v!r}.")
        if isinstance(self.text_len, bool) or not isinstance(self.text_len, int) or self.text_len < 0:
            raise ValueError(f"TokenLayout.text_len must be an int >= 0, got {self.text_len!r}.")

    @property
    def frame_len(self) -> int:
        """Tokens per frame (``height * width``)."""
        return self.height * self.width

    @property
    def video_len(self) -> int:
        """Video tokens (``frames * height * width``)."""
        return self.frames * self.frame_len

    @property
    def seq_len(self) -> int:
        """All tokens of the call (video + text)."""
        return self.video_len + self.text_len

    @property
    def grid(self) -> tuple[int, int, int]:
        """``(frames, height, width)``."""
        return (self.frames, self.height, self.width)

    @property
    def video_slice(self) -> slice:
        """Where the video tokens sit in the sequence."""
        start = self.text_len if self.text_first else 0
        return slice(start, start + self.video_len)

    @property
    def text_slice(self) -> slice:
        """Where the text tokens sit in the sequence (empty when there is none)."""
        start = 0 if self.text_first else self.video_len
        return slice(start, start + self.text_len)

    def video_coords(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Long ``(video_len, 3)``: the ``(t, h, w)`` of each video token in sequence order."""
        t, h, w = torch.meshgrid(
            torch.arange(self.frames, device=device),
            torch.arange(self.height, device=device),
            torch.arange(self.width, device=device),
            indexing="ij",
        )
        return torch.stack([t.flatten(), h.flatten(), w.flatten()], dim=1)

    def __str__(self) -> str:
        text = f" + {self.text_len} text ({'first' if self.text_first else 'last'})" if self.text_len else ""
        return f"{self.frames}x{self.height}x{self.width} video tokens{text} = {self.seq_len}"
