"""Streaming output: decode latent chunks as they finish and append them to an open mp4.

``StreamingWanDecoder`` drives diffusers' ``AutoencoderKLWan`` decoder one latent frame
at a time with its causal feature cache (``vae._feat_map``, reset by ``clear_cache``)
carried *across* chunks, exactly as ``AutoencoderKLWan._decode`` does inside one call:
``clear_cache()`` once at the start of the video, then per latent frame
``vae.decoder(z[:, :, i:i+1], feat_cache=vae._feat_map, feat_idx=[0], first_chunk=i==0)``.
So decoding chunk by chunk gives the same pixels as one decode of the whole video, and
memory holds one chunk (plus the cache's last conv frames), not the video. Tiled VAE
decoding is not used here. The first latent frame gives 1 video frame, each later one 4.

``Mp4Stream`` keeps an ffmpeg writer (``gen._io.Mp4Writer``) open on a hidden partial file
next to the target and renames it into place on ``close()``; on error or interruption the
partial file is removed and ffmpeg stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["Mp4Stream", "StreamingWanDecoder"]


class StreamingWanDecoder:
    """Chunk-by-chunk decode with ``AutoencoderKLWan``'s causal cache kept between calls.

    Args:
        vae: ``AutoencoderKLWan`` (not tiled: ``use_tiling`` is ignored).

    ``decode(latents)`` takes normalised latents ``(B, z, f, h, w)`` (what the transformer
    makes; de-normalised with the VAE config's ``latents_mean``/``latents_std`` as
    ``WanPipeline`` does) and returns pixels ``(B, 3, frames, H, W)`` in [-1, 1].
    """

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self.inv_std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        self.vae.clear_cache()
        self.frames_in = 0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        z = latents.to(dtype) * self.inv_std.to(latents.device, dtype) + self.mean.to(latents.device, dtype)
        x = vae.post_quant_conv(z)  # 1x1x1 conv: no temporal state
        outs = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                    first_chunk=self.frames_in == 0))
            self.frames_in += 1
        out = torch.cat(outs, 2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)

    def close(self) -> None:
        """Free the decoder's feature cache."""
        self.vae.clear_cache()


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """``(3, F, H, W)`` in [-1, 1] -> ``(F, H, W, 3)`` uint8."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


class Mp4Stream:
    """An mp4 written frame batch by frame batch, published atomically on ``close()``.

    Use as a context manager; ``append(frames)`` takes ``(F, H, W, 3)`` uint8 (odd sizes are
    cropped to even ones, as H.264 in yuv420p needs). The first ``append`` creates a hidden
    partial file next to the target (``tmp``; ``gen._io.PartialFile``: the owner's pid in its
    name, swept by later runs if this one is killed) and starts ``gen._io.Mp4Writer`` on it,
    whose ffmpeg process dies with this one; nothing is on disk before. ``close(ok=False)``
    (any exception in the ``with`` block) stops ffmpeg and removes the partial file.
    """

    def __init__(self, path: str | os.PathLike, fps: int):
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"streaming output must be an .mp4 file, got {self.path.name!r}.")
        self.fps = fps
        self.frames = 0
        self.tmp: Path | None = None
        self._part = None
        self._writer = None

    def _open(self) -> None:
        from gen._io import Mp4Writer, PartialFile, _critical

        with _critical:  # the partial file is ours before any signal can interrupt
            self._part = PartialFile(self.path)
            self.tmp = self._part.tmp
            self._writer = Mp4Writer(self.tmp, self.fps)

    def append(self, frames: np.ndarray) -> None:
        if self._part is None:
            self._open()
        for frame in frames:
            self._writer.append(frame)
            self.frames += 1

    def close(self, ok: bool = True) -> Path:
        part, writer = self._part, self._writer
        if not ok or part is None:
            try:
                if writer is not None:
                    writer.abort()
            finally:
                if part is not None:
                    part.discard()
            if ok:
                raise ValueError(f"{self.path.name}: no frames were written.")
            return self.path
        try:
            writer.close()
            return part.publish()
        except BaseException:
            writer.abort()
            part.discard()
            raise

    def __enter__(self) -> Mp4Stream:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(ok=exc_type is None)
