"""Training data of the ``shapes-wan`` models: clip batches, latents, caption text.

Every clip is drawn from a seed (``clip_seed(seed, split, index)``), so the data set is a
function of the training seed; the ``"eval"`` split never shares a seed with
``"train"``. ``encode_clips`` turns clips into normalised Wan latents
(``(z - latents_mean) / latents_std``, the space the transformer works in) once, in
batches, with a progress bar; ``encode_text`` is ``WanPipeline``'s prompt encoding
(tokenise, encode, cut each prompt at its length, zero-pad to ``text_len``) with
gradients, so the text encoder can train with the transformer.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .clips import ClipMotion, render_clip, sample_motion
from .grammar import Caption, sample_caption

__all__ = [
    "ClipBatch",
    "LatentSet",
    "PaddedTextAttention",
    "caption_texts",
    "clip_batch",
    "clip_seed",
    "encode_clips",
    "encode_text",
    "fast_vae_norms",
    "latent_foreground",
    "latent_stats",
    "normalize_latents",
    "pixel_foreground",
]


def clip_seed(seed: int, split: str, index: int) -> int:
    """Seed of clip ``index`` of ``split`` (``"train"``, ``"vae"``, ``"causal"``, ``"eval"``...)."""
    return (seed * 1_000_003 + zlib.crc32(split.encode()) * 7_919 + index) % 2**63


@dataclass
class ClipBatch:
    """Clips drawn by ``clip_batch``.

    Attributes:
        video: ``(B, 3, F, H, W)`` in [-1, 1].
        captions: one ``Caption`` per clip.
        motions: one ``ClipMotion`` per clip (where the shape is at any frame).
        first: index of the first frame drawn, per clip.
    """

    video: torch.Tensor
    captions: list[Caption]
    motions: list[ClipMotion]
    first: list[int]


def clip_batch(seed: int, split: str, indices: Sequence[int], *, frames: int, size: int,
               wrap: bool = False, pick: Sequence[int] | None = None) -> ClipBatch:
    """Clips ``indices`` of ``split`` (``frames`` frames each, ``size`` pixels square).

    With ``pick`` (one frame index per clip), only that frame of each ``frames``-frame clip
    is drawn: ``video`` is ``(B, 3, 1, size, size)``.
    """
    videos, captions, motions, first = [], [], [], []
    for n, i in enumerate(indices):
        rng = np.random.default_rng(clip_seed(seed, split, int(i)))
        cap = sample_caption(rng)
        motion = sample_motion(cap, rng, frames=frames, size=size, wrap=wrap)
        start = 0 if pick is None else int(pick[n])
        count = frames if pick is None else 1
        videos.append(render_clip(cap, motion, frames=count, size=size, wrap=wrap, start=start))
        captions.append(cap)
        motions.append(motion)
        first.append(start)
    video = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3)  # (B, 3, F, H, W)
    return ClipBatch(video * 2.0 - 1.0, captions, motions, first)


def caption_texts(captions: Sequence[Caption], rng: np.random.Generator, *, drop_caption: float = 0.0,
                  drop_motion: float = 0.0, drop_background: float = 0.0) -> list[str]:
    """The prompt of each caption, some dropped to ``""`` or without a clause (fractions in [0, 1])."""
    out = []
    for cap in captions:
        if rng.random() < drop_caption:
            out.append("")
        else:
            out.append(cap.text(motion=rng.random() >= drop_motion, background=rng.random() >= drop_background))
    return out


def _rms_norm_channels_first(self, x: torch.Tensor) -> torch.Tensor:
    # WanRMS_norm.forward's math (F.normalize over channels, times sqrt(C) * gamma + bias)
    # with the sum of squares taken channel by channel: F.normalize reduces over the strided
    # channel axis, which took 42% of a CPU encode (0.9 of 2.2 s); this is 12x faster on it.
    # Under autograd one reduction is cheaper: each channel slice's backward would write a
    # full-size zero tensor.
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if torch.is_grad_enabled() and xf.requires_grad:
        ss = (xf * xf).sum(1)
    else:
        ss = xf[:, 0] * xf[:, 0]
        for c in range(1, xf.shape[1]):
            ss = ss + xf[:, c] * xf[:, c]
    inv = torch.rsqrt(ss.clamp_min(1e-24)).unsqueeze(1)
    return (xf * inv).to(x.dtype) * self.scale * self.gamma + self.bias


@contextmanager
def fast_vae_norms(vae: torch.nn.Module):
    """Within the block, the VAE's channel-first ``WanRMS_norm`` layers compute the same
    function faster on the CPU (training and data encoding only; restored on exit)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    patched = []
    for m in vae.modules():
        if isinstance(m, WanRMS_norm) and m.channel_first:
            m.forward = _rms_norm_channels_first.__get__(m)
            patched.append(m)
    try:
        yield vae
    finally:
        for m in patched:
            del m.forward


def latent_stats(latents: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of raw latents ``(N, C, T, h, w)``."""
    flat = latents.transpose(0, 1).flatten(1).double()
    return flat.mean(1).tolist(), flat.std(1).tolist()


def normalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """Raw VAE latents -> the transformer's space, as ``WanImageToVideoPipeline`` does."""
    mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
    return (z - mean) / std


@dataclass
class LatentSet:
    """Encoded training clips: ``latents (N, C, T, h, w)`` (normalised), their captions and
    where the shape is in latent space (``foreground``: bool ``(N, 1, T, h, w)``, see
    :func:`latent_foreground`; None when not asked for)."""

    latents: torch.Tensor
    captions: list[Caption]
    foreground: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.captions)


def pixel_foreground(video: torch.Tensor, captions: Sequence[Caption], threshold: float = 0.02) -> torch.Tensor:
    """Pixels of the shape (its anti-aliased edge included): bool ``(B, 1, F, H, W)`` from
    ``video (B, 3, F, H, W)`` in [-1, 1], every pixel that differs from the caption's
    background colour by more than ``threshold``."""
    from .grammar import COLORS

    bg = torch.tensor([COLORS[c.background or "black"] for c in captions], dtype=video.dtype) / 127.5 - 1.0
    return (video - bg.view(-1, 3, 1, 1, 1)).abs().amax(1, keepdim=True) > threshold


def latent_foreground(pixels: torch.Tensor, *, time: int = 4, space: int = 8, dilate: int = 1) -> torch.Tensor:
    """Latent positions that code any pixel of the shape: bool ``(B, 1, T, h, w)`` from
    ``pixels (B, 1, F, H, W)`` (``F = 1 + time * (T - 1)``: Wan's VAE codes frame 0 alone,
    then ``time`` frames per latent frame; ``space`` pixels per latent pixel), grown by
    ``dilate`` latent pixels each way (the shape's surroundings, where it may move)."""
    first = pixels[:, :, :1]
    rest = pixels[:, :, 1:]
    b, _, f, h, w = rest.shape
    x = torch.cat([first, rest.reshape(b, 1, f // time, time, h, w).amax(3)], 2).float()
    x = F.max_pool3d(x, (1, space, space))
    if dilate:
        x = F.max_pool3d(x, (1, 2 * dilate + 1, 2 * dilate + 1), stride=1, padding=(0, dilate, dilate))
    return x > 0


@torch.no_grad()
def encode_clips(vae, seed: int, split: str, count: int, *, frames: int, size: int, wrap: bool = False,
                 batch: int = 16, normalize: bool = True, progress: bool = True,
                 foreground: bool = False) -> LatentSet:
    """Encode clips ``0..count-1`` of ``split`` with ``vae`` (posterior mean), in batches;
    with ``foreground``, also where each shape is in latent space (:func:`latent_foreground`)."""
    from tqdm.auto import tqdm

    vae.eval()
    dev = next(vae.parameters()).device
    out, caps, fgs = [], [], []
    with fast_vae_norms(vae), tqdm(total=count, desc=f"encoding {split} clips", unit="clip",
                                   disable=not progress) as bar:
        for start in range(0, count, batch):
            idx = range(start, min(start + batch, count))
            clips = clip_batch(seed, split, idx, frames=frames, size=size, wrap=wrap)
            c = clips.captions
            z = vae.encode(clips.video.to(dev)).latent_dist.mode()
            out.append((normalize_latents(z, vae) if normalize else z).float().cpu())
            if foreground:
                fgs.append(latent_foreground(pixel_foreground(clips.video, c)))
            caps += c
            bar.update(len(idx))
    return LatentSet(torch.cat(out), caps, torch.cat(fgs) if foreground else None)


def encode_text(tokenizer, text_encoder, prompts: Sequence[str], *, text_len: int = 512,
                short: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``WanPipeline._get_t5_prompt_embeds`` with gradients: ``(B, text_len, d_model)``.

    Tokenises to the longest prompt (the encoder masks padding, so the prompt tokens'
    outputs are the same as at ``text_len``), keeps each prompt's own tokens and zero-pads
    to ``text_len`` as the pipeline does.

    With ``short=True`` the padding stops one row after the longest prompt and the prompt
    lengths come back too: ``(embeds (B, L + 1, d), lengths (B,))``, for
    ``PaddedTextAttention``, which attends as if the padding went on to ``text_len``.
    """
    dev = next(text_encoder.parameters()).device
    enc = tokenizer(list(prompts), padding="longest", max_length=text_len, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = enc.input_ids.to(dev), enc.attention_mask.to(dev)
    hidden = text_encoder(ids, mask).last_hidden_state
    hidden = hidden * mask[..., None].to(hidden.dtype)  # what the pipeline's cut + zero-pad leaves
    if short:
        return F.pad(hidden, (0, 0, 0, 1)), mask.sum(1)
    return F.pad(hidden, (0, 0, 0, text_len - hidden.shape[1]))


class PaddedTextAttention:
    """Wan ``attn2`` (cross-attention) over short text embeddings, equal to the stock
    processor over the same embeddings zero-padded to ``text_len`` rows.

    Every zero row of the padded text becomes the same key and value, so ``n`` of them weigh
    ``n`` times one of them in the softmax: each of the ``m`` zero rows kept gets an additive
    score ``log(n / m)``. Training takes 512 padded rows' worth of attention for the cost
    of a dozen (tested equal to the stock forward). Set ``bias`` per batch with
    ``set_lengths``, or encode the batch's prompts with ``encode``, which sets it.
    """

    def __init__(self, text_len: int = 512):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.text_len, self.stock, self.bias = text_len, WanAttnProcessor(), None

    def set_lengths(self, lengths: torch.Tensor, short_len: int) -> None:
        """``lengths (B,)`` prompt tokens per sample, ``short_len`` rows of the short embeddings."""
        lengths = lengths.long()
        if int(lengths.max()) >= short_len or short_len > self.text_len:
            raise ValueError(f"need at least one zero row: lengths up to {int(lengths.max())}, {short_len} rows.")
        n = (self.text_len - lengths).double()  # zero rows in the pipeline's padding
        m = (short_len - lengths).double()  # zero rows kept
        pos = torch.arange(short_len, device=lengths.device)
        bias = torch.where(pos[None] >= lengths[:, None], torch.log(n / m)[:, None], torch.zeros(()).double())
        self.bias = bias[:, None, None, :].float()  # (B, 1, 1, L): over heads and queries

    def encode(self, tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
        """The short prompt embeddings ``(B, L + 1, d)`` (``encode_text(..., short=True)``,
        with gradients), this processor's lengths set for them."""
        text, lengths = encode_text(tokenizer, text_encoder, prompts, text_len=self.text_len, short=True)
        self.set_lengths(lengths, text.shape[1])
        return text

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        bias = self.bias.to(hidden_states.device, hidden_states.dtype)
        return self.stock(attn, hidden_states, encoder_hidden_states, bias, rotary_emb)
