"""Chunk autoregressive schedules over ``CausalWanRunner``: Self-Forcing/CausVid and LongLive.

``ChunkAR`` is the Self-Forcing loop (``pipeline/causal_inference.py`` in the notes): per
chunk of ``chunk_frames`` latent frames, ``len(steps)`` denoising forwards at the warped
timesteps with fresh noise between them, then one clean forward at t = 0 that commits the
chunk's K/V as context. Flow matching: the model predicts ``v = noise - x0``, so
``x0 = x_t - sigma_t * v`` and re-noising is ``x_t' = (1 - sigma_t') x0 + sigma_t' eps``.

``SinkWindowAR`` is the same loop with LongLive's cache: an attention span of
``window_frames`` latent frames including ``sink_frames`` pinned first frames; the oldest
non-sink frames are evicted as the video grows, and a prompt switch re-encodes the window
under the new prompt in one forward (KV-recache), keeping or re-anchoring the sink.

Noise comes from ``NoiseSampler``: each chunk's initial noise and each re-noise draw is
seeded from ``(seed, chunk, step)``, so a run is reproducible chunk by chunk whatever the
order of calls (and FLEX's antiphase sampler plugs in as another ``initial``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from .cache import Positions
from .runner import CausalWanRunner, RunnerConfig

Sampler = Literal["renoise", "euler"]

__all__ = ["ChunkAR", "ChunkConfig", "NoiseSampler", "SinkWindowAR", "SinkWindowConfig", "step_to", "warp_timestep", "warped_timesteps"]


def warped_timesteps(steps: tuple[int, ...] = (1000, 750, 500, 250), shift: float = 5.0, warp: bool = True) -> list[float]:
    """Timesteps in [0, 1000] for a few-step distilled Wan (the notes' table).

    With ``warp`` each listed step ``k`` maps through ``warp_timestep`` (the shifted
    schedule at ``sigma = k / 1000``), e.g. the Self-Forcing list (1000, 750, 500, 250) at
    shift 5 gives (1000, 937.5, 833.3, 625.0). Without ``warp`` the list is used as is
    (CausVid 3-step).
    """
    if not steps or any(not 0 < k <= 1000 for k in steps):
        raise ValueError(f"steps must be timesteps in (0, 1000], got {steps}.")
    if not warp:
        return [float(k) for k in steps]
    return [warp_timestep(k, shift) for k in steps]


def warp_timestep(step: float, shift: float) -> float:
    """A listed timestep ``step`` in [0, 1000] on the shifted schedule: ``1000 s u / (1 + (s - 1) u)``
    with ``u = step / 1000`` (the entry ``1000 - step`` of ``linspace(1, 0, 1001)`` shifted
    as ``s sigma / (1 + (s - 1) sigma)``, for any ``step``, whole or not)."""
    u = step / 1000.0
    return 1000.0 * shift * u / (1.0 + (shift - 1.0) * u)


def step_to(x: torch.Tensor, x0: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor,
            sigma_next: float | torch.Tensor, sampler: str, fresh: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Latents at ``sigma_next`` from ``x`` at ``sigma`` and the prediction ``v`` (``x0 = x - sigma v``).

    ``"renoise"``: ``(1 - s') x0 + s' eps`` with ``eps = fresh()``; ``"euler"``: ``x + (s' - s) v``.
    """
    if sampler == "euler":
        return x.float() + (sigma_next - sigma) * v.float()
    return (1 - sigma_next) * x0 + sigma_next * fresh()


class NoiseSampler:
    """Gaussian noise, reproducible per ``(seed, chunk, step)``.

    ``initial(chunk, shape)`` is a chunk's starting noise; ``renoise(chunk, step, shape)``
    the fresh ``eps`` used to re-noise after denoising step ``step``. Subclass and override
    ``initial`` for structured noise (FLEX antiphase sampling).
    """

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.seed, self.device, self.dtype = int(seed), torch.device(device), dtype

    def _draw(self, key: tuple[int, ...], shape) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((self.seed, *key)) & 0x7FFF_FFFF_FFFF)
        return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(self.device, self.dtype)

    def initial(self, chunk: int, shape) -> torch.Tensor:
        return self._draw((0, chunk), shape)

    def renoise(self, chunk: int, step: int, shape) -> torch.Tensor:
        return self._draw((1, chunk, step), shape)


@dataclass(frozen=True)
class ChunkConfig:
    """Self-Forcing / CausVid chunk loop (defaults: Self-Forcing, notes section 1).

    Attributes:
        chunk_frames: latent frames generated per chunk (3; 1 = frame-wise).
        steps: listed denoising steps (1000, 750, 500, 250).
        shift: timestep shift (5).
        warp: map the list through the shifted schedule (True).
        context_t: timestep of the clean commit pass (0).
        positions: RoPE positions of cached keys, "absolute" (as trained) or "relative".
        sampler: ``"renoise"`` (Self-Forcing: predict x0, re-noise with fresh noise to the
            next level; for few-step distilled models) or ``"euler"`` (the flow ODE step
            ``x += (sigma_next - sigma) v``; for models trained on the whole flow-matching
            range, such as ``shapes-wan-causal``).
    """

    chunk_frames: int = 3
    steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    warp: bool = True
    context_t: float = 0.0
    positions: Positions = "absolute"
    sampler: Sampler = "renoise"

    def __post_init__(self):
        if self.chunk_frames <= 0:
            raise ValueError(f"chunk_frames must be positive, got {self.chunk_frames}.")
        if self.sampler not in ("renoise", "euler"):
            raise ValueError(f"sampler must be 'renoise' or 'euler', got {self.sampler!r}.")


@dataclass(frozen=True)
class SinkWindowConfig(ChunkConfig):
    """LongLive: frame sink + short window (defaults from ``longlive_inference.yaml``).

    Attributes:
        window_frames: attention span in latent frames, sink included (12).
        sink_frames: pinned first frames (3, the first chunk).
        keep_sink_on_switch: at a prompt switch keep the first prompt's sink K/V (LongLive
            ``global_sink: true``); False re-anchors the sink to the oldest recached frames.
    """

    window_frames: int = 12
    sink_frames: int = 3
    keep_sink_on_switch: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.window_frames < self.chunk_frames:
            raise ValueError(
                f"window_frames={self.window_frames} is smaller than a chunk ({self.chunk_frames} frames); "
                "the window must hold at least the chunk being generated."
            )
        if self.sink_frames < 0 or self.sink_frames + self.chunk_frames > self.window_frames:
            raise ValueError(
                f"sink_frames={self.sink_frames} does not fit the window: sink + one chunk "
                f"({self.chunk_frames}) must be at most window_frames={self.window_frames}."
            )


Switch = tuple[int, torch.Tensor]  # (latent frame where the new prompt starts, prompt_embeds)


class ChunkAR:
    """Chunk-by-chunk generation: yields each chunk's clean latents as soon as it is committed.

    Args:
        transformer: stock ``WanTransformer3DModel``.
        config: ``ChunkConfig`` (or ``SinkWindowConfig`` via ``SinkWindowAR``).
        backend: cache attention backend (None: Triton on CUDA, PyTorch elsewhere).
        rope_tables: optional temporal ``(cos, sin)`` tables (FLEX).
    """

    def __init__(self, transformer, config: ChunkConfig = ChunkConfig(), *, backend: str | None = None,
                 rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.transformer, self.config, self.backend = transformer, config, backend
        self.rope_tables = rope_tables
        self.timesteps = warped_timesteps(config.steps, config.shift, config.warp)
        self.runner: CausalWanRunner | None = None

    def runner_config(self, num_frames: int) -> RunnerConfig:
        """No eviction: the cache holds the whole video (Self-Forcing's 21-frame default)."""
        return RunnerConfig(cache_frames=num_frames, positions=self.config.positions, backend=self.backend)

    def chunks(self, num_frames: int) -> list[range]:
        """Latent frame ranges of the chunks; the last one may be shorter."""
        c = self.config.chunk_frames
        return [range(s, min(s + c, num_frames)) for s in range(0, num_frames, c)]

    def generate(self, prompt_embeds: torch.Tensor, num_frames: int, *, height: int, width: int,
                 noise: NoiseSampler | None = None, switches: list[Switch] = (),
                 on_recache: Callable[[list[int]], None] | None = None) -> Iterator[torch.Tensor]:
        """Yield clean latents ``(B, C, f, height, width)`` chunk by chunk.

        Args:
            prompt_embeds: ``(B, L, text_dim)`` text encoder output.
            num_frames: latent frames to generate.
            height, width: latent size.
            noise: the sampler (default ``NoiseSampler(0)`` on the model's device).
            switches: ``(latent_frame, prompt_embeds)`` prompt changes; the frame is rounded
                up to a chunk start. ``SinkWindowAR`` recaches the window at each.
            on_recache: called with the frames re-encoded at each switch (for tests/logs).
        """
        if num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {num_frames}.")
        model = self.transformer
        param = next(model.parameters())
        noise = noise or NoiseSampler(0, param.device)
        batch = prompt_embeds.shape[0]
        c_in = model.config.in_channels
        switches = sorted(switches, key=lambda s: s[0])
        for f, _ in switches:
            if not 0 < f < num_frames:
                raise ValueError(f"a prompt switch at latent frame {f} is outside the video (1..{num_frames - 1}).")
        rope = self.rope_tables or (None, None)
        self.runner = runner = CausalWanRunner(model, self.runner_config(num_frames), batch=batch, height=height,
                                               width=width, rope_cos=rope[0], rope_sin=rope[1])
        ts = self.timesteps
        with runner:
            runner.set_prompt(prompt_embeds)
            for ci, frames in enumerate(self.chunks(num_frames)):
                while switches and switches[0][0] <= frames[0]:
                    _, embeds = switches.pop(0)
                    runner.set_prompt(embeds)
                    done = self.recache(runner, frames[0])
                    if on_recache is not None:
                        on_recache(done)
                shape = (batch, c_in, len(frames), height, width)
                x = noise.initial(ci, shape)
                x0 = x
                for i, t in enumerate(ts):
                    v = runner.forward(x, t, frames, "denoise")
                    x0 = x.float() - (t / 1000) * v.float()
                    if i + 1 < len(ts):
                        s = ts[i + 1] / 1000
                        x = step_to(x, x0, v, t / 1000, s, self.config.sampler, partial(noise.renoise, ci, i, shape))
                runner.forward(x0, self.config.context_t, frames, "commit")
                yield x0

    def recache(self, runner: CausalWanRunner, current: int) -> list[int]:
        """Prompt switch without a window: nothing is re-encoded (Self-Forcing has no recache)."""
        return []


class SinkWindowAR(ChunkAR):
    """LongLive: sink + short window with eviction, and KV-recache on prompt switch."""

    def __init__(self, transformer, config: SinkWindowConfig = SinkWindowConfig(), **kwargs):
        super().__init__(transformer, config, **kwargs)

    def runner_config(self, num_frames: int) -> RunnerConfig:
        cfg = self.config
        return RunnerConfig(cache_frames=cfg.window_frames, sink_frames=cfg.sink_frames,
                            positions=cfg.positions, backend=self.backend)

    def recache(self, runner: CausalWanRunner, current: int) -> list[int]:
        """Re-encode the window (the committed non-sink frames in the cache) at t = 0 under the
        current prompt, in one forward; the sink is kept (and attended) or re-anchored."""
        cache = runner.cache
        frames = sorted(cache.clean_frames())
        if not frames:
            return []
        if any(b - a != 1 for a, b in zip(frames, frames[1:])) or frames[-1] != current - 1:
            raise RuntimeError(f"window frames {frames} are not the last frames before {current}.")
        keep = self.config.keep_sink_on_switch
        # the clean latents of the window are needed: re-encode from the kept outputs
        latents = self._window_latents(frames)
        runner.forward(latents, self.config.context_t, frames, "recache", keep_sink=keep)
        return frames

    def generate(self, prompt_embeds, num_frames, **kwargs):
        self._history: dict[int, torch.Tensor] = {}  # latent frame -> clean latent, window only
        for x0 in super().generate(prompt_embeds, num_frames, **kwargs):
            start = max(self._history, default=-1) + 1
            for i in range(x0.shape[2]):
                self._history[start + i] = x0[:, :, i : i + 1]
            # keep only what a recache can need: the window's frames (memory stays flat)
            for f in [f for f in self._history if f <= start + x0.shape[2] - 1 - self.config.window_frames]:
                del self._history[f]
            yield x0

    def _window_latents(self, frames: list[int]) -> torch.Tensor:
        return torch.cat([self._history[f] for f in frames], dim=2)
