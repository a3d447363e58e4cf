"""Long-horizon autoregressive video: Python API behind ``gen long``.

::

    from gen.long import long_video, long_video_frames
    long_video("a red circle moving right on a blue background", out="circle.mp4", schedule="sink",
               seconds=12)
    for frames in long_video_frames("a red ball", seconds=4):   # (F, H, W, 3) uint8 batches
        ...

Schedules: ``"chunk"`` (Self-Forcing/CausVid: 3-frame chunks, 4 steps, whole video in the
cache), ``"sink"`` (LongLive: 12-frame span with a 3-frame sink, eviction, KV-recache at
prompt switches), ``"rolling"`` (Rolling Forcing: 5 chunks at rising noise denoised jointly,
re-roped 3-frame sink, 21-frame span; no prompt switches). ``flex=True`` adds FLEX
(``gen.pipelines.ar.flex``: modulated temporal RoPE, antiphase noise, inference-only sink).
Each chunk is decoded as soon as it is committed (the Wan VAE's causal
cache carried across chunks) and appended to the open mp4, which is renamed into place at
the end; memory does not grow with the video under ``"sink"``.

Weights: the registry's model, default ``"shapes-wan-causal"`` (the small Wan gen trains
block-causal on shape clips; its schedule settings come from
``gen.pipelines.ar.presets``). The transformer is used as is unless ``checkpoint`` names a
public causal checkpoint (Self-Forcing, CausVid, LongLive, Rolling Forcing), converted by
``gen.pipelines.ar.checkpoints`` and loaded into it.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gen.values import MAX_SECONDS, check_device, check_prompt, check_seconds, check_seed

__all__ = ["SCHEDULES", "LongResult", "default_long_path", "long_video", "long_video_frames", "parse_switch"]

SCHEDULES = ("chunk", "sink", "rolling")


@dataclass(frozen=True)
class LongResult:
    """What ``long_video`` wrote: ``path``, ``frames`` (video frames), ``fps``, ``seconds`` (wall time)."""

    path: Path
    frames: int
    fps: int
    seconds: float


def parse_switch(text: str) -> tuple[float, str]:
    """``"T:new prompt"`` -> ``(T seconds, "new prompt")``; ValueError on bad input."""
    head, sep, prompt = text.partition(":")
    try:
        t = float(head)
    except ValueError:
        t = math.nan
    if not sep or not prompt.strip() or not math.isfinite(t):
        raise ValueError(f"a switch must look like 'SECONDS:new prompt' (e.g. '5:a cat'), got {text!r}.")
    return t, prompt.strip()


def _schedule(name: str, transformer, backend, flex=None, model: str | None = None):
    from gen.pipelines.ar.flex import flex_chunk_config
    from gen.pipelines.ar.presets import schedule_config
    from gen.pipelines.ar.rolling import RollingForcingAR
    from gen.pipelines.ar.schedules import ChunkAR, SinkWindowAR

    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}.")
    config = schedule_config(name, model)  # the model's preset (gen.pipelines.ar.presets)
    if name == "chunk":
        if flex is not None and flex.sink:  # FLEX's inference-only sink: sink + training-length window
            return SinkWindowAR(transformer, flex_chunk_config(config, flex), backend=backend)
        return ChunkAR(transformer, config, backend=backend)
    if name == "sink":
        return SinkWindowAR(transformer, config, backend=backend)
    return RollingForcingAR(transformer, config, backend=backend)


def long_video_frames(
    prompt: str,
    *,
    model: str = "shapes-wan-causal",
    schedule: str = "sink",
    seconds: float = 5.0,
    switches: Sequence[tuple[float, str]] = (),
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    backend: str | None = None,
    stats: dict | None = None,
    flex: bool = False,
    checkpoint: str | Path | Sequence[str | Path] | None = None,
    model_path: str | Path | None = None,
    max_seconds: float = MAX_SECONDS,
) -> Iterator[np.ndarray]:
    """Generate and decode chunk by chunk; yield ``(F, H, W, 3)`` uint8 frame batches.

    Args:
        prompt: the first prompt.
        model: registry name (a Wan text-to-video model).
        schedule: ``"chunk"``, ``"sink"`` or ``"rolling"``.
        seconds: video length at the model's fps (rounded up to whole chunks); at most
            ``max_seconds`` (default one hour: a longer request is refused before any work).
        switches: ``(seconds, prompt)`` prompt changes, each strictly inside the video.
        seed: noise seed.
        height, width: pixels (default: the model's).
        device: ``"cuda"``/``"cpu"`` (default cuda when available).
        backend: cache attention backend (None: Triton on CUDA).
        stats: if given, filled with ``fps`` (output video fps) and ``latent_frames``.
        flex: add FLEX with its default ``FlexConfig`` (chunk: the inference-only sink makes it
            a sink + 21-frame window; sink/rolling keep their own sink).
        checkpoint: a causal checkpoint file (``.pt``/``.safetensors``) to load into the
            transformer, or ``(base, lora)`` for LongLive.
        model_path: load the model's pipeline from this folder instead (e.g. retrained weights).

    Raises:
        ValueError: unknown schedule or non-Wan model, non-positive length, a switch
            outside ``(0, seconds)``, switches with ``"rolling"``, an unrecognised checkpoint
            or one whose shapes do not match the model.
    """
    from gen.pipelines import registry
    from gen.pipelines.ar.flex import AntiphaseNoiseSampler, flex_rope_tables
    from gen.pipelines.ar.presets import flex_config
    from gen.pipelines.ar.schedules import NoiseSampler
    from gen.pipelines.ar.stream import StreamingWanDecoder, to_uint8

    spec = registry.get_spec(model)
    if spec.family != "wan" or spec.task != "t2v":
        raise ValueError(f"long video needs a Wan text-to-video model, got {spec.name!r}.")
    if schedule not in SCHEDULES:
        _schedule(schedule, None, None)  # raises the message
    check_seconds(seconds, limit=max_seconds)
    check_seed(seed)
    for text in (prompt, *(p for _, p in switches)):
        check_prompt(text)
    for t, _ in switches:
        if not 0 < t < seconds:
            raise ValueError(f"switch time {t}s is outside the video (0, {seconds}s); pick a time inside it.")
    if schedule == "rolling" and switches:
        raise ValueError("prompt switches are not supported by the rolling schedule; use --schedule sink.")
    height, width = height or spec.height, width or spec.width
    registry.check_geometry(spec, height, width, 1)
    dev = check_device(device)
    paths = [] if checkpoint is None else [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    if paths:
        from gen.pipelines.ar.checkpoints import check_checkpoint_files, load_causal_checkpoint

        check_checkpoint_files(*paths)  # before the model loads
    pipe = registry.load(spec.name, model_path=model_path).to(dev)
    if paths:
        load_causal_checkpoint(pipe.transformer, *paths)
    fcfg = flex_config(spec.name) if flex else None
    sched = _schedule(schedule, pipe.transformer, backend, fcfg, spec.name)
    chunk = sched.config.chunk_frames
    video_frames = round(seconds * spec.fps)
    latent = -(-((max(video_frames, 1) - 1) // 4 + 1) // chunk) * chunk
    if fcfg is not None:
        sched.rope_tables = flex_rope_tables(pipe.transformer, fcfg, latent)
    sampler = (AntiphaseNoiseSampler(seed, dev, strength=fcfg.antiphase_strength)
               if fcfg is not None and fcfg.antiphase else NoiseSampler(seed, dev))

    from gen.render import warn_outside_vocabulary

    for text in (prompt, *(p for _, p in switches)):
        warn_outside_vocabulary(spec, text)

    def embed(text: str) -> torch.Tensor:
        with torch.no_grad():
            return pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=512, device=dev)[0]

    sw = [(max(1, (round(t * spec.fps) - 1) // 4 + 1), embed(p)) for t, p in switches]
    sw = [(min(f, latent - 1), e) for f, e in sw]
    if stats is not None:
        stats.update(fps=spec.fps, latent_frames=latent)
    decoder = StreamingWanDecoder(pipe.vae)
    try:
        for x0 in sched.generate(embed(prompt), latent, height=height // 8, width=width // 8,
                                 noise=sampler, switches=sw):
            yield to_uint8(decoder.decode(x0)[0])
    finally:
        decoder.close()


def default_long_path(prompt: str, *, model: str = "shapes-wan-causal", schedule: str = "sink", seed: int = 0,
                      folder: str | Path = "outputs") -> Path:
    """``outputs/<model>-long-<schedule>-<prompt words>-s<seed>-<time>-<pid>.mp4``: a new name
    for every call (``gen.render.default_output_path``), never one fixed file."""
    from gen.pipelines import registry
    from gen.render import default_output_path

    return default_output_path(registry.get_spec(model), prompt, f"long-{schedule}", seed, folder)


def long_video(prompt: str, out: str | Path | None = None, *, progress: bool = True, **kwargs) -> LongResult:
    """Generate a long video into ``out`` (.mp4), appending frames as chunks finish.

    Takes the arguments of ``long_video_frames``; ``progress`` shows a bar with frames and FPS.
    ``out`` None picks a new name under ``outputs/`` (``default_long_path``); an existing
    ``out`` is replaced (with a warning) once the new video is complete.

    The file appears atomically when the video is complete: until then frames go to a hidden
    partial file next to it, removed (and ffmpeg stopped) on an error, Ctrl-C, SIGTERM or
    SIGHUP (``gen._io.exit_on_sigterm``: the command exits with 143 after a SIGTERM).
    Partial files of runs killed outright (SIGKILL) are removed when the next run starts
    writing in that folder; this one sweeps them before it loads the model.

    Raises:
        ValueError: ``out`` not an ``.mp4`` or not writable, and what ``long_video_frames`` raises.
    """
    from gen._io import exit_on_sigterm, note_replacing, sweep_stale_partials
    from gen.values import check_writable_folder

    if out is None:
        defaults = inspect.signature(long_video_frames).parameters
        path = default_long_path(prompt, **{k: kwargs.get(k, defaults[k].default) for k in ("model", "schedule", "seed")})
    else:
        path = Path(out).expanduser()
        if path.suffix.lower() != ".mp4":
            raise ValueError(f"streaming output must be an .mp4 file, got {path.name!r}.")
        if path.is_dir():
            raise ValueError(f"{path} is a folder; give a file name ending in .mp4.")
    check_writable_folder(path.parent)
    if out is not None:
        note_replacing(path)
    with exit_on_sigterm():  # SIGTERM unwinds like Ctrl-C: no partial file, no ffmpeg left
        if path.parent.is_dir():
            sweep_stale_partials(path.parent)  # partial files of earlier runs that were killed
        return _long_video(prompt, path, progress, kwargs)


def _long_video(prompt: str, path: Path, progress: bool, kwargs: dict) -> LongResult:
    from tqdm.auto import tqdm

    from gen.pipelines.ar.stream import Mp4Stream

    stats: dict = {}
    frames = long_video_frames(prompt, stats=stats, **kwargs)
    start = time.perf_counter()
    try:
        first = next(frames)  # loads the model and fixes the fps before the file is opened
        total = (stats["latent_frames"] - 1) * 4 + 1
        with Mp4Stream(path, stats["fps"]) as stream, tqdm(total=total, unit="frame", disable=not progress) as bar:
            stream.append(first)
            bar.update(len(first))
            for batch in frames:
                stream.append(batch)
                bar.update(len(batch))
                bar.set_postfix(fps=f"{stream.frames / (time.perf_counter() - start):.1f}")
            n = stream.frames
    finally:
        frames.close()  # the decoder's cache is freed now, not when the generator is collected
    return LongResult(path, n, stats["fps"], time.perf_counter() - start)
