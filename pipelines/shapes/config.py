"""What the ``shapes-wan`` models are made of and how they are trained: configs as data.

``COMPONENTS`` holds the literal constructor arguments of each pipeline component (the
same diffusers / transformers classes as Wan 2.1 T2V, at toy size); ``TrainConfig`` (with
``VaeTrain``, ``DitTrain`` and ``CausalTrain``) every training choice with its default.
``gen train-tiny`` trains with the defaults; changing any field changes the weights.

Sizes: 128x128 pixels, 17 frames (about 2 s at 8 fps) -> latents 16 x 5 x 16 x 16 ->
5 x 8 x 8 = 320 video tokens per attention call, 4 heads of 32; the causal model is trained
on windows of 15 latent frames (960 tokens) cut from 93-frame clips.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .tokenizer import shapes_vocabulary

__all__ = ["COMPONENTS", "CausalTrain", "DitTrain", "TrainConfig", "VaeTrain", "override_config", "setting_names"]

_VOCAB = 32  # >= len(shapes_vocabulary()) (25)
assert len(shapes_vocabulary()) <= _VOCAB

COMPONENTS: dict[str, dict[str, Any]] = {
    # Wan's UMT5 encoder at width 64; trained jointly with the transformer.
    "text_encoder": dict(
        vocab_size=_VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
    ),
    # Wan's VAE layout (4x time, 8x space, 16 latent channels, causal 3-D convs) with a thin
    # encoder (8 base channels) and a wider decoder (16): the decoder draws the pictures.
    # latents_mean/std are measured on the training clips after the VAE is trained.
    "vae": dict(
        base_dim=8, decoder_base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0,
        scale_factor_temporal=4, scale_factor_spatial=8,
    ),
    # Wan 2.1's transformer: 4 blocks of width 128 (4 heads x 32), text width 64.
    "transformer": dict(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
        out_channels=16, text_dim=64, freq_dim=64, ffn_dim=384, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
        rope_max_seq_len=1024,
    ),
    # The scheduler Wan 2.1 ships (flow-matching UniPC, shift 3).
    "scheduler": dict(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=3.0, solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
        final_sigmas_type="zero",
    ),
}  # fmt: skip
"""Per component: the literal constructor arguments (text encoder: ``UMT5Config``)."""


@dataclass(frozen=True)
class VaeTrain:
    """VAE training: first on still frames (the VAE's first-frame path; cheap, so many
    steps), then on whole clips (the causal temporal path), on random 8-aligned crops.

    The latent noise starts small (log-variance bias -6): with the posterior's initial
    std of 1 the decoder learns from noisy latents; PSNR after 600 still-frame steps
    was 23.6 dB with it at 0 and 24.9 dB at -6.

    Attributes:
        image_steps: optimiser steps on single frames.
        image_batch: frames per still-frame step.
        image_crop: still-frame crop in pixels (multiple of 8).
        steps: optimiser steps on clips.
        batch: clips per step.
        frames: frames per clip (4k + 1; 17 reaches the steady state of the causal caches:
            trained on 9 frames, frames 12-16 of a 17-frame clip came back in wrong colours).
        crop: clip crop in pixels (multiple of 8).
        centred: fraction of crops centred on the shape (the rest uniform: a uniform 32-pixel
            crop misses the shape 80% of the time).
        foreground_weight: loss weight of the shape's pixels (background pixels weigh 1): at
            weight 1 a purple triangle on gray vanished from the reconstruction.
        lr: peak AdamW learning rate over both phases (cosine decay to 10%, 50 warm-up steps).
        kl_weight: weight of the KL term (mean over latent elements) against the
            pixel loss (L1 + MSE, mean over pixels in [-1, 1]).
        stats_clips: full-size clips encoded to measure ``latents_mean``/``latents_std``.
    """

    image_steps: int = 1200
    image_batch: int = 16
    image_crop: int = 32
    steps: int = 300
    batch: int = 4
    frames: int = 17
    crop: int = 48
    centred: float = 0.8
    foreground_weight: float = 5.0
    lr: float = 2e-3
    kl_weight: float = 1e-4
    stats_clips: int = 64


@dataclass(frozen=True)
class DitTrain:
    """Text encoder + transformer training with Wan's flow-matching objective.

    Attributes:
        clips: training clips, encoded once to latents (each a fresh caption and motion).
        image_steps: optimiser steps on the clips' first latent frames (64 tokens each).
        image_batch: first frames per image step.
        steps: optimiser steps on whole clips.
        batch: clips per step.
        lr: peak AdamW learning rate over both phases (cosine decay to 10% after ``warmup``).
        warmup: linear warm-up steps.
        weight_decay: AdamW weight decay.
        ema: EMA decay of the saved weights (ramped as ``min(ema, (1 + n) / (10 + n))``).
        shift: shift of the training noise levels (``sigma = s*u / (1 + (s-1)*u)``, ``u``
            uniform). 1: uniform levels; with the scheduler's 3 most samples sat above
            sigma 0.5, where a small shape is invisible, and after 1000 image steps the
            shape had its caption's colour 1 time in 3 (11 in 12 with 1, lr 2e-3 and the
            larger shapes of ``clips.RADIUS``).
        clip_shift: the shift of the clip phase's noise levels (None: ``shift``). The
            motion of a clip is decided at high noise (``diagnose.py``, the README's table:
            teacher-forced, the shipped transformer keeps 88% of the motions from sigma
            0.6, 75% from 0.8, 21%, chance, from 1.0), where shift 1 puts a fifth of the
            training samples above 0.8 (shift 3: 43%) and the sampler (shift 3) takes 11
            of its 25 steps.
        drop_caption: fraction of captions replaced by ``""`` (what the pipeline's
            default negative prompt encodes), for classifier-free guidance.
        drop_motion: fraction of captions written without the motion clause.
        image_drop_motion: the same fraction in the first-frame phase (None:
            ``drop_motion``). On one frame the motion clause carries no information; 1
            there was meant to keep the transformer from learning to ignore the words
            before the clip phase, but did not make it listen to them (the README's
            experiments: 3% either way, ``diagnose.py --words``).
        foreground_weight: loss weight of the latent positions that code the shape, and
            one latent pixel around it (``data.latent_foreground``), against 1 elsewhere
            (None: 1, the plain flow-matching loss). The shape is 5-15% of a clip's
            latent, so a still blob at the mean position costs little under the plain
            loss; the VAE needed the same weighting (``VaeTrain.foreground_weight``).
        drop_background: fraction written without the background clause.
        frame_difference: weight of a second loss term, the mean squared change of the
            ``x0`` estimate's error from one latent frame to the next (``train.flow_loss``;
            None: none). A still blob where the clip moves costs the plain loss little (the
            shape is 5-15% of a latent) but is the whole of this term. Off: at 2, 2000 clip
            steps from the shipped weights left motion at 21%, as without it (the README's
            probe).
        text_local_heads: the text encoder's start: in every layer, heads 0 / 1 / 2 get this
            relative-position bias (a logit) towards the next / previous / same token, the
            other positions 0 (None: the stock init, attention near uniform over the prompt,
            which the weights shipped until 2026-12-03 used).
            With the stock init the transformer took the caption's colours as a bag of words:
            "a white triangle on a green background" and "a green triangle on a white
            background" gave guided ``x0`` estimates 1% apart after 7000 steps (another
            colour pair: 270%). With 4, a colour word carries the word after it (a shape or
            "background") from step 0: 300% apart after 500 first-frame steps, and the
            background right 16 times in 16 (``diagnose.py --words``; the README's probe).
        null_padding: the cross-attention's start (None: the stock init, which the weights
            shipped until 2026-12-03 used). The pipeline pads
            every prompt with zero rows to 512; here they become a zero key: the text
            projection's biases and every ``attn2.to_k`` bias start at 0 and stay there (not
            trained), so each padding row scores exactly 0, and ``attn2.norm_q`` /
            ``norm_k`` weights start at this value, so prompt tokens can outscore 500 rows
            at 0. Stock init: 93% of each cross-attention's weight on the padding at step 0;
            with 1.7: 68%. With both changes single frames read the caption's colour 56%
            after 1000 steps (the stock init: 25%; the README's probe).
        video_local_heads: the transformer's self-attention start: heads 0 and 1 of every
            block begin local (head 0 on the neighbouring tokens in time and space, head 1
            on the same place in every frame), this value scaling how sharply
            (``train._local_video_init``; 1: head 0 puts 74% of a token's weight on its
            3 x 3 x 3 neighbourhood, the stock init 8%). None: the stock init, near
            uniform over the clip, which the shipped weights used. In the README's latent-space probe (one blob,
            five motions, 2000 steps) the stock start left the samples' blob at an
            unrelated place in every frame; this start at 1 kept it in one place from frame
            to frame and followed a noised clip's motion from sigma 0.7 in 95% of clips
            (stock: 65%), but the caption still did not choose the motion.
        steer_start: the clip phase's start (None: none, the clip phase goes on from the
            first-frame phase's weights). A number builds ``steer.steer_start`` into the
            first-frame phase's (EMA) weights when the clip phase begins, this value the
            steered heads' look back in tokens per latent frame (under 1.57; the clips move
            0.375-0.75, ``clips.SPEED`` x 4 frames / 16 pixels a token), and holds the
            writer's path through the clip phase (``steer.hold_writer_path``: the text
            encoder, the text MLP and block 0's cross-attention). In the latent-space probe
            this start made the caption choose the motion (two motions 68-98%, five 55-72%
            at 1000 steps; the stock and local starts: chance); on the real clips not yet:
            motion 17-19% (chance) after 1500-2000 clip steps, the steered heads retrained
            into caption-blind looks (the shapes README, "Both axes, every motion word").
            Experimental: off by default. It needs clips of every motion of
            ``steer.MOTIONS``.
        first_frame_context: fraction of the clip phase's samples whose first latent frame is
            given clean (per-token timestep 0, no loss on it) while the later frames are
            noised, as Wan 2.2's text-image-to-video training does (None: every frame at
            one level, the plain text-to-video objective). With the first frame given, where
            the shape is in the later frames depends on the motion word alone, a first-order
            term of the loss where at one shared level it is a correlation between noisy
            frames. Experimental, off by default: 1500 clip steps at 0.5 did not make the
            transformer read the motion word; with ``steer_start`` on a fresh first-frame
            phase the word's teacher-forced use grew with the steps (41% more ``x0`` error
            under the opposite word at 6000) while the samples' motion stayed at 25-33%
            (the shapes README, "A clean first frame").
        text_len: text rows the embeddings are padded to (the pipeline's
            ``max_sequence_length``: training attends exactly as a plain ``pipe(prompt)``).
    """

    clips: int = 4000
    image_steps: int = 6000
    image_batch: int = 32
    steps: int = 6000
    batch: int = 12
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ema: float = 0.998
    shift: float = 1.0
    clip_shift: float | None = 3.0
    drop_caption: float = 0.1
    drop_motion: float = 0.1
    image_drop_motion: float | None = 1.0
    foreground_weight: float | None = None
    drop_background: float = 0.1
    frame_difference: float | None = None
    text_local_heads: float | None = 4.0
    null_padding: float | None = 1.7
    video_local_heads: float | None = None
    steer_start: float | None = None
    first_frame_context: float | None = None
    text_len: int = 512


@dataclass(frozen=True)
class CausalTrain:
    """Causal fine-tuning of the text-to-video transformer (diffusion forcing).

    Training windows of ``window_frames`` latent frames are cut from long clips (shapes
    wrap around the frame, so every motion continues): either consecutive frames from
    any offset, or, for a fraction ``sink_windows``, the clip's first chunk followed by
    consecutive frames from later on (what a frame sink with relative positions attends).
    Attention is block-causal over chunks of ``chunk_frames`` frames (a token sees every
    token up to the end of its chunk), each chunk at its own noise level drawn from a
    mixture (weights ``mix``) of three patterns:

    * ``independent``: every chunk its own level (diffusion forcing);
    * ``clean_context``: chunks before a random one are clean (t = 0, as committed
      context is), the rest independent (the chunk and sink schedules);
    * ``rolling``: clean context, then ``rolling_chunks`` chunks at rising levels that
      attend each other both ways (the rolling window), the rest independent.

    The sink chunk of a sink window is always clean. The text encoder is frozen.

    Attributes:
        clips: long clips, encoded once.
        frames: frames per long clip (4k + 1): 93 -> 24 latent frames.
        window_frames: latent frames per training window (15: 5 chunks).
        chunk_frames: latent frames per chunk (the schedules' ``chunk_frames``).
        sink_windows: fraction of windows that start with the clip's first chunk as a sink.
        rolling_chunks: chunks in a rolling run (the rolling preset's levels).
        steps, batch, lr, warmup, weight_decay, ema, shift, drop_caption: as ``DitTrain``.
        mix: weights of the ``(independent, clean_context, rolling)`` patterns.
    """

    clips: int = 400
    frames: int = 93
    window_frames: int = 15
    chunk_frames: int = 3
    sink_windows: float = 0.3
    rolling_chunks: int = 3
    steps: int = 1000
    batch: int = 4
    lr: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.01
    ema: float = 0.998
    shift: float = 1.0
    drop_caption: float = 0.1
    mix: tuple[float, float, float] = (0.2, 0.5, 0.3)


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``gen train-tiny`` does, from the seed.

    Attributes:
        seed: one seed for the data, the initial weights and the noise of training.
        size: clip height = width in pixels.
        frames: frames of a text-to-video clip (4k + 1).
        fps: frames per second the clips are shown at (the model's default fps).
        vae, dit, causal: the three training stages.
    """

    seed: int = 0
    size: int = 128
    frames: int = 17
    fps: int = 8
    vae: VaeTrain = field(default_factory=VaeTrain)
    dit: DitTrain = field(default_factory=DitTrain)
    causal: CausalTrain = field(default_factory=CausalTrain)


_SECTIONS = ("vae", "dit", "causal")
# Fields that are fractions of the data (in [0, 1]); counts must be >= 1 where named here.
_FRACTIONS = {"centred", "drop_caption", "drop_motion", "image_drop_motion", "drop_background", "sink_windows",
              "first_frame_context"}
_AT_LEAST_ONE = {"image_batch", "batch", "clips", "frames", "window_frames", "chunk_frames", "rolling_chunks",
                 "stats_clips", "size", "text_len"}


def setting_names() -> list[str]:
    """Every name ``override_config`` takes: ``seed``, ``size``, ``frames``, ``fps`` and
    ``<vae|dit|causal>.<field>``."""
    cfg = TrainConfig()
    names = [f.name for f in dataclasses.fields(cfg) if f.name not in _SECTIONS]
    for sec in _SECTIONS:
        names += [f"{sec}.{f.name}" for f in dataclasses.fields(getattr(cfg, sec))]
    return names


def _parse(name: str, text: str, kind: Any) -> Any:
    """``text`` as a value of the annotated type ``kind`` (int, float, ``float | None``,
    ``tuple[float, ...]``), with an error that says what was expected."""
    text = text.strip()
    args = typing.get_args(kind)
    if type(None) in args:  # optional: "none" turns it off
        if text.lower() in ("none", "null", ""):
            return None
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) is tuple:
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        want = len(typing.get_args(kind))
        if len(parts) != want:
            raise ValueError(f"{name} takes {want} comma-separated numbers, got {text!r}.")
        return tuple(_parse(name, p, typing.get_args(kind)[0]) for p in parts)
    try:
        if kind is int:
            value = int(text)
        else:
            value = float(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}, got {text!r}.") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {text!r}.")
    return value


def _check_value(name: str, value: Any) -> None:
    field_name = name.rsplit(".", 1)[-1]
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is None:
            continue
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
        if field_name in _FRACTIONS and v > 1:
            raise ValueError(f"{name} is a fraction: it must be between 0 and 1, got {value}.")
        if field_name in _AT_LEAST_ONE and v < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if field_name == "frames" and (value - 1) % 4:
        raise ValueError(f"{name} must be 4k+1 (Wan's VAE codes 4 frames per latent frame after the first), "
                         f"got {value}.")
    if field_name == "steer_start" and value is not None and not 0 < value < math.pi / 2:
        raise ValueError(f"{name} is the steered heads' look in tokens per latent frame: between 0 and 1.57 "
                         f"(the clips move 0.375-0.75), got {value}.")
    if field_name == "size" and value % 16:
        raise ValueError(f"size must be a multiple of 16 (8x VAE, 2x patches), got {value}.")


def override_config(cfg: TrainConfig, settings: Iterable[str]) -> TrainConfig:
    """``cfg`` with ``key=value`` settings applied (``gen train-tiny --set``).

    Keys are ``seed``, ``size``, ``frames``, ``fps`` or ``<vae|dit|causal>.<field>``
    (``setting_names()``); values are typed from the field: ``dit.steps=40000``,
    ``dit.clip_shift=3``, ``dit.foreground_weight=none``, ``causal.mix=0.2,0.5,0.3``.
    Unknown keys and values of the wrong type or out of range raise ``ValueError`` naming
    the setting.
    """
    known = setting_names()
    for item in settings:
        if "=" not in item:
            raise ValueError(f"--set takes key=value (e.g. dit.steps=40000), got {item!r}.")
        key, text = (part.strip() for part in item.split("=", 1))
        if key not in known:
            raise ValueError(f"unknown training setting {key!r}; the settings are: {', '.join(known)}.")
        section, _, name = key.rpartition(".")
        holder = getattr(cfg, section) if section else cfg
        kind = typing.get_type_hints(type(holder))[name]
        value = _parse(key, text, kind)
        _check_value(key, value)
        if section:
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(holder, **{name: value})})
        else:
            cfg = dataclasses.replace(cfg, **{name: value})
    return cfg
