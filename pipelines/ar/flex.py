"""FLEX ("Train Short, Inference Long", arXiv 2602.14027): training-free horizon extension.

The paper's formulas are not public (notes section 4): each part below implements what its
abstract/README says, with the formula written out, and each is switchable in ``FlexConfig``
so it can be matched to the paper later. All three combine with every schedule.

1. **Frequency-aware temporal RoPE modulation** (``flex_rope_tables``). Temporal pair ``j``
   of ``d_t`` dims rotates at ``w_j = theta^(-2j/d_t)`` rad/frame, period ``lambda_j = 2 pi / w_j``
   frames. Over the training length ``L`` it completes ``r_j = L / lambda_j`` turns. Pairs that
   completed many turns were seen at every phase ("high frequency": extrapolate, keep ``w_j``);
   pairs that never completed a turn are under-trained ("low frequency": interpolate,
   ``w_j / s`` with ``s = L_target / L >= 1``, so ``L_target`` frames cover the phases that
   ``L`` did). In between, a linear blend (YaRN "NTK-by-parts")::

       gamma_j = clamp((r_j - split) / (blend - split), 0, 1)
       w'_j    = gamma_j * w_j + (1 - gamma_j) * w_j / s

   ``split`` (1 turn) and ``blend`` (2 turns) are the documented defaults: with ``L = 21``
   frames and Wan's 22 temporal pairs, pairs 0-1 (periods 6.3, 9.5 frames) are kept, pair 2
   (14.5 frames, 1.45 turns) is blended, pairs >= 3 (>= 22 frames) are interpolated.
2. **Antiphase noise sampling** (``AntiphaseNoiseSampler``): a chunk's initial noise shares
   one field ``z0`` across its frames with alternating sign, plus independent noise::

       eps_i = (-1)^i sqrt(a) z0 + sqrt(1 - a) z_i        (i = frame within the chunk)

   Each frame stays standard normal; neighbouring frames are anti-correlated
   (``corr(eps_i, eps_{i+1}) = -a``, ``corr(eps_i, eps_{i+2}) = +a``): the noise carries energy
   at the highest temporal frequency (the "high-frequency dynamic prior") instead of the
   flat spectrum of i.i.d. frames. Re-noising between steps is unchanged.
3. **Inference-only attention sink**: the cache's pinned sink (``KVCache``), enabled for a
   model trained without one. ``flex_chunk_config`` turns the plain chunk loop (whole video
   in the cache) into a sink + window of the training length; the sink and rolling
   schedules already pin one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedules import ChunkConfig, NoiseSampler, SinkWindowConfig

__all__ = ["AntiphaseNoiseSampler", "FlexConfig", "flex_chunk_config", "flex_rope_tables", "rope_gamma"]


@dataclass(frozen=True)
class FlexConfig:
    """FLEX parts and their parameters (defaults documented in the module docstring).

    Attributes:
        rope: modulate the temporal RoPE frequencies (True).
        train_frames: latent frames the model was trained on, ``L`` (21: Wan/Self-Forcing 81 video frames).
        split: turns over ``L`` below which a pair is fully interpolated (1.0).
        blend: turns over ``L`` above which a pair is kept as is (2.0); linear in between.
        antiphase: antiphase initial noise (True).
        antiphase_strength: ``a`` in [0, 1), the shared antiphase share of each frame's variance (0.5).
        sink: use an inference-only attention sink (True).
        sink_frames: its size in latent frames (3, the first chunk).
    """

    rope: bool = True
    train_frames: int = 21
    split: float = 1.0
    blend: float = 2.0
    antiphase: bool = True
    antiphase_strength: float = 0.5
    sink: bool = True
    sink_frames: int = 3

    def __post_init__(self):
        if self.train_frames <= 0:
            raise ValueError(f"train_frames must be positive, got {self.train_frames}.")
        if not 0 <= self.split < self.blend:
            raise ValueError(f"need 0 <= split < blend (turns over the training length), got {self.split}, {self.blend}.")
        if not 0 <= self.antiphase_strength < 1:
            raise ValueError(f"antiphase_strength must lie in [0, 1), got {self.antiphase_strength}.")
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}.")


def _stock_omegas(rope) -> torch.Tensor:
    """Temporal angular frequencies ``(t_dim/2,)`` (rad per frame) read back from the model's table."""
    t = rope.t_dim
    cos, sin = rope.freqs_cos[1, :t:2].double(), rope.freqs_sin[1, :t:2].double()  # position 1: angle = w
    return torch.atan2(sin, cos)


def rope_gamma(omegas: torch.Tensor, train_frames: int, split: float, blend: float) -> torch.Tensor:
    """Per-pair extrapolation weight ``gamma_j`` in [0, 1] (1 = kept, 0 = interpolated)."""
    turns = train_frames * omegas / (2 * math.pi)
    return ((turns - split) / (blend - split)).clamp(0, 1)


def flex_rope_tables(transformer, config: FlexConfig, target_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal RoPE tables ``(P, t_dim)`` (cos, sin; interleaved pairs like the model's) with
    the modulated frequencies ``w'_j`` for a video of ``target_frames`` latent frames.

    ``P = max(model table length, target_frames)``. With ``config.rope`` False, or a target
    no longer than the training length (``s = 1``), the tables equal the model's.
    """
    if target_frames <= 0:
        raise ValueError(f"target_frames must be positive, got {target_frames}.")
    rope = transformer.rope
    t = rope.t_dim
    omegas = _stock_omegas(rope)
    n_pos = max(rope.freqs_cos.shape[0], target_frames)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None]
    # start from the model's own table (bit-identical where nothing changes), extended if needed
    cos = (angles * omegas).cos().repeat_interleave(2, 1)
    sin = (angles * omegas).sin().repeat_interleave(2, 1)
    stock = rope.freqs_cos.shape[0]
    cos[:stock], sin[:stock] = rope.freqs_cos[:, :t].double(), rope.freqs_sin[:, :t].double()
    s = max(1.0, target_frames / config.train_frames)
    if config.rope and s > 1:
        g = rope_gamma(omegas, config.train_frames, config.split, config.blend)
        for j in (g < 1).nonzero().flatten().tolist():  # only the interpolated/blended pairs change
            w = g[j] * omegas[j] + (1 - g[j]) * omegas[j] / s
            cos[:, 2 * j : 2 * j + 2] = (angles * w).cos()
            sin[:, 2 * j : 2 * j + 2] = (angles * w).sin()
    return cos, sin


class AntiphaseNoiseSampler(NoiseSampler):
    """``NoiseSampler`` whose chunk initial noise is antiphase across the chunk's frames
    (formula in the module docstring); re-noise draws stay i.i.d. Shapes ``(B, C, F, H, W)``."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 strength: float = 0.5):
        super().__init__(seed, device, dtype)
        if not 0 <= strength < 1:
            raise ValueError(f"antiphase strength must lie in [0, 1), got {strength}.")
        self.strength = strength

    def initial(self, chunk: int, shape) -> torch.Tensor:
        b, c, f, h, w = shape
        z = self._draw((0, chunk), shape).float()
        z0 = self._draw((2, chunk), (b, c, 1, h, w)).float()
        sign = torch.tensor([(-1.0) ** i for i in range(f)], device=z.device).view(1, 1, f, 1, 1)
        a = self.strength
        return (math.sqrt(a) * sign * z0 + math.sqrt(1 - a) * z).to(self.dtype)


def flex_chunk_config(config: ChunkConfig, flex: FlexConfig) -> ChunkConfig:
    """The inference-only sink for the plain chunk loop: a ``SinkWindowConfig`` whose span is
    the training length with ``flex.sink_frames`` pinned (unchanged when ``flex.sink`` is off
    or the config already has a window)."""
    if not flex.sink or isinstance(config, SinkWindowConfig):
        return config
    return SinkWindowConfig(chunk_frames=config.chunk_frames, steps=config.steps, shift=config.shift,
                            warp=config.warp, context_t=config.context_t, positions=config.positions,
                            window_frames=flex.train_frames, sink_frames=flex.sink_frames)
