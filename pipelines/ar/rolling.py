"""Rolling Forcing (TencentARC/RollingForcing) over ``CausalWanRunner``: notes section 2.

A *window* of ``levels`` chunks sits at increasing noise levels: the newest chunk at the
first (noisiest) listed timestep, the oldest at the last. Each window step is **one**
forward over the whole window (full attention inside it, per-frame timesteps; with
``substeps`` k > 1, k forwards, each moving every chunk a k-th of the way to its next
level), after which

* every chunk not at the last level is re-noised to its next level with fresh noise,
* the oldest chunk's ``x0`` is final: it leaves the window (yielded) and one clean forward
  at ``t = context_t`` commits its keys/values as context,
* the window slides by one chunk (a fresh-noise chunk enters at the noisiest level).

With ``N`` chunks there are ``N + levels - 1`` window steps: the window fills (steps
``0 .. levels-2`` start at chunk 0 and hold 1, 2, ... chunks at the noisiest levels) and
drains at the end (no new chunk enters; the lowest levels finish). Flow matching as in
``schedules``: ``x0 = x_t - sigma_t v``, ``x_t' = (1 - sigma_t') x0 + sigma_t' eps``.

Attention context of every forward: ``[sink | most recent committed frames | own frames]``,
at most ``max_attention_frames`` frames. The sink is the first chunk (pinned); with
``positions="relative"`` (default) the attended frames are numbered 0, 1, ... in order, so
the sink is re-roped right before the working frames exactly as the reference re-ropes it
(``start_frame = current_start - working - sink``), and relative distances never exceed
the span (no 1024-frame RoPE cap).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch

from .cache import Positions
from .runner import CausalWanRunner, RunnerConfig
from .schedules import NoiseSampler, Sampler, step_to, warp_timestep, warped_timesteps

__all__ = ["RollingConfig", "RollingForcingAR", "substep_timesteps"]


@dataclass(frozen=True)
class RollingConfig:
    """Rolling Forcing (defaults: ``configs/rolling_forcing_dmd.yaml``, notes section 2).

    Attributes:
        chunk_frames: latent frames per chunk (3).
        steps: listed denoising steps; one window level per step (1000, 800, 600, 400, 200),
            so the window is ``len(steps) * chunk_frames`` = 15 latent frames.
        shift: timestep shift (5); ``warp``: map the list through the shifted schedule
            (True: 1000, 952.4, 882.4, 769.2, 555.6).
        context_t: timestep of the clean commit pass (0).
        sink_frames: pinned first frames, re-roped before the working frames (3 = the first
            chunk; 0 = no sink).
        max_attention_frames: most frames one forward attends, sink and own frames included
            (21: sink 3 + working 3 + window 15 once the window is full).
        positions: ``"relative"`` (re-roped sink, unbounded length) or ``"absolute"``.
        sampler: how a chunk moves to its next level: ``"renoise"`` (the reference: x0 plus
            fresh noise) or ``"euler"`` (the flow ODE step; see ``ChunkConfig``).
        substeps: forwards per window step (1: the reference, for few-step distilled
            models). With k > 1 each level's span of listed timesteps (the last level's down
            to 0) is cut into k equal parts, mapped through the same shift: a model trained
            on the full flow-matching range (``shapes-wan-causal``) gets ``levels * k``
            denoising steps per chunk instead of ``levels``.
    """

    chunk_frames: int = 3
    steps: tuple[int, ...] = (1000, 800, 600, 400, 200)
    shift: float = 5.0
    warp: bool = True
    context_t: float = 0.0
    sink_frames: int = 3
    max_attention_frames: int = 21
    positions: Positions = "relative"
    sampler: Sampler = "renoise"
    substeps: int = 1

    @property
    def levels(self) -> int:
        """Chunks in the window (one per denoising level)."""
        return len(self.steps)

    @property
    def window_frames(self) -> int:
        """Latent frames in the window (15 by default)."""
        return self.levels * self.chunk_frames

    def __post_init__(self):
        if self.chunk_frames <= 0:
            raise ValueError(f"chunk_frames must be positive, got {self.chunk_frames}.")
        if not self.steps:
            raise ValueError("steps must list at least one timestep (one window level each).")
        if isinstance(self.substeps, bool) or not isinstance(self.substeps, int) or self.substeps < 1:
            raise ValueError(f"substeps must be an int >= 1 (forwards per window step), got {self.substeps!r}.")
        if self.max_attention_frames < self.window_frames:
            raise ValueError(
                f"max_attention_frames={self.max_attention_frames} is smaller than the window "
                f"({self.levels} levels x {self.chunk_frames} frames = {self.window_frames}); raise it or "
                "use fewer steps / smaller chunks."
            )
        if self.sink_frames < 0 or self.sink_frames + self.window_frames > self.max_attention_frames:
            raise ValueError(
                f"sink_frames={self.sink_frames} does not fit: sink + window ({self.window_frames}) must be at "
                f"most max_attention_frames={self.max_attention_frames}."
            )
        if self.sink_frames and self.sink_frames % self.chunk_frames:
            raise ValueError(
                f"sink_frames={self.sink_frames} must be whole chunks of {self.chunk_frames} frames (the sink is "
                "the first chunk(s) as committed)."
            )


def substep_timesteps(config: RollingConfig) -> list[list[float]]:
    """Per window level, the ``substeps + 1`` timesteps in [0, 1000] its chunk passes: from
    the level's own timestep to the next level's (the last level's to 0).

    The span between two listed steps is cut into ``substeps`` equal parts in listed units,
    and each cut is mapped like a listed step (``warp_timestep`` with ``warp``). With
    ``substeps=1`` level ``l`` is ``[timesteps[l], timesteps[l + 1]]`` (``0`` after the last).
    """
    steps, k = [float(s) for s in config.steps] + [0.0], config.substeps

    def mapped(step: float) -> float:
        return warp_timestep(step, config.shift) if config.warp else step

    return [[mapped(steps[lv] + (steps[lv + 1] - steps[lv]) * j / k) for j in range(k + 1)]
            for lv in range(len(config.steps))]


class RollingForcingAR:
    """Rolling-window generation: yields each chunk's clean latents as it leaves the window.

    Args:
        transformer: stock ``WanTransformer3DModel``.
        config: ``RollingConfig``.
        backend: cache attention backend (None: Triton on CUDA, PyTorch elsewhere).
        rope_tables: optional temporal ``(cos, sin)`` tables (FLEX).
    """

    def __init__(self, transformer, config: RollingConfig = RollingConfig(), *, backend: str | None = None,
                 rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.transformer, self.config, self.backend = transformer, config, backend
        self.rope_tables = rope_tables
        self.timesteps = warped_timesteps(config.steps, config.shift, config.warp)
        self.substep_timesteps = substep_timesteps(config)
        self.runner: CausalWanRunner | None = None

    def runner_config(self) -> RunnerConfig:
        """KV slots: the sink, the window (written transiently every step) and enough committed
        frames that the commit pass (own chunk + sink + most recent) fills the attention span."""
        cfg = self.config
        cache = cfg.max_attention_frames + cfg.window_frames - cfg.chunk_frames
        return RunnerConfig(cache_frames=cache, sink_frames=cfg.sink_frames, span_frames=cfg.max_attention_frames,
                            positions=cfg.positions, backend=self.backend)

    def window_steps(self, num_chunks: int) -> list[list[int]]:
        """Chunks in the window at each step, oldest first: ``N + levels - 1`` steps."""
        lv = self.config.levels
        return [list(range(max(0, w - lv + 1), min(num_chunks - 1, w) + 1)) for w in range(num_chunks + lv - 1)]

    def generate(self, prompt_embeds: torch.Tensor, num_frames: int, *, height: int, width: int,
                 noise: NoiseSampler | None = None, switches=()) -> Iterator[torch.Tensor]:
        """Yield clean latents ``(B, C, chunk, height, width)`` chunk by chunk, in order.

        Args:
            prompt_embeds: ``(B, L, text_dim)`` text encoder output.
            num_frames: latent frames; must be whole chunks.
            height, width: latent size.
            noise: the sampler; chunk ``b`` starts from ``noise.initial(b)`` and is re-noised
                after level ``i`` with ``noise.renoise(b, i)``.
            switches: not supported (Rolling Forcing has no recache); must be empty.
        """
        cfg = self.config
        if switches:
            raise ValueError("prompt switches are not supported by the rolling schedule; use --schedule sink.")
        if num_frames <= 0 or num_frames % cfg.chunk_frames:
            raise ValueError(f"num_frames={num_frames} must be a positive multiple of chunk_frames={cfg.chunk_frames}.")
        model = self.transformer
        param = next(model.parameters())
        noise = noise or NoiseSampler(0, param.device)
        batch, c_in, cf = prompt_embeds.shape[0], model.config.in_channels, cfg.chunk_frames
        n_chunks = num_frames // cf
        shape = (batch, c_in, cf, height, width)
        rope = self.rope_tables or (None, None)
        self.runner = runner = CausalWanRunner(model, self.runner_config(), batch=batch, height=height,
                                               width=width, rope_cos=rope[0], rope_sin=rope[1])
        sub, k = self.substep_timesteps, cfg.substeps
        state: dict[int, torch.Tensor] = {}  # chunk -> its latents at its current level (window only)
        with runner:
            runner.set_prompt(prompt_embeds)
            for w, chunks in enumerate(self.window_steps(n_chunks)):
                if w < n_chunks:
                    state[w] = noise.initial(w, shape)
                level = {b: w - b for b in chunks}  # 0 = noisiest (newest)
                frames = range(chunks[0] * cf, (chunks[-1] + 1) * cf)
                for j in range(k):
                    x = torch.cat([state[b] for b in chunks], dim=2)
                    t = torch.tensor([sub[level[b]][j] for b in chunks for _ in range(cf)], device=param.device)
                    v = runner.forward(x, t, frames, "denoise")
                    x0 = x.float() - (t / 1000).view(1, 1, -1, 1, 1) * v.float()
                    for i, b in enumerate(chunks):
                        x0_b = x0[:, :, i * cf : (i + 1) * cf]
                        nxt = sub[level[b]][j + 1]
                        if nxt > 0:
                            sl = slice(i * cf, (i + 1) * cf)
                            state[b] = step_to(x[:, :, sl], x0_b, v[:, :, sl], sub[level[b]][j] / 1000, nxt / 1000,
                                               cfg.sampler, partial(noise.renoise, b, level[b] * k + j, shape))
                        else:  # the oldest chunk is final: commit its clean K/V and emit it
                            del state[b]
                            runner.forward(x0_b, cfg.context_t, range(b * cf, (b + 1) * cf), "commit")
                            yield x0_b
