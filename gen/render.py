"""Rendering one clip or image: load a model, sparsify it, run it, write the file.

Used by ``gen render``; callable from Python too::

    from gen.render import render
    result = render("a red circle moving right on a blue background", attention="radial", out="circle.mp4")
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger("gen.render")

__all__ = ["RenderResult", "render", "pipeline_kwargs", "write_output", "default_output_path"]

from gen.session import pipeline_kwargs  # noqa: E402  (re-exported: older imports name it here)


@dataclass
class RenderResult:
    """What a render produced.

    Attributes:
        path: the written file (mp4 for video models, png for image models).
        seconds: wall time of the pipeline call (loading excluded).
        load_seconds: wall time of loading the model.
        frames: number of frames written (1 for an image).
        seed: the seed used.
        attention: the handle's summary (method, sparse/dense calls, density per layout).
    """

    path: Path
    seconds: float
    load_seconds: float
    frames: int
    seed: int
    attention: dict = field(default_factory=dict)


_issued: set[Path] = set()
_issued_lock = threading.Lock()


def default_output_path(spec, prompt: str, method: str, seed: int, folder: str | os.PathLike = "outputs") -> Path:
    """``outputs/<model>-<method>-<prompt words>-s<seed>-<time>-<pid>.<ext>``: unique, never one
    fixed name (``-2``, ``-3``, ... are added if this process already chose the name in the
    same second or a file has it)."""
    words = "-".join(re.findall(r"[a-z0-9]+", prompt.lower())[:6]) or "clip"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ext = "png" if spec.task == "t2i" else "mp4"
    base = f"{spec.name}-{method}-{words}-s{seed}-{stamp}-{os.getpid()}"
    with _issued_lock:
        path, n = Path(folder) / f"{base}.{ext}", 1
        while path in _issued or path.exists():
            n += 1
            path = Path(folder) / f"{base}-{n}.{ext}"
        _issued.add(path)
    return path


def write_output(frames: np.ndarray, path: str | os.PathLike, fps: int) -> Path:
    """Write ``(F, H, W, 3)`` uint8 frames as an mp4 (``.mp4``) or one image (``.png``/``.jpg``),
    atomically: a hidden partial file in the same folder (the writer's pid in its name) renamed
    into place. On any error, Ctrl-C or SIGTERM/SIGHUP it is removed and nothing reaches
    ``path`` (``gen._io``: a SIGTERM here exits with 143); partial files of runs killed
    outright are removed by the next write in that folder. mp4s are encoded by
    ``gen._io.Mp4Writer``, whose ffmpeg process does not outlive this one."""
    import imageio.v3 as iio

    from gen._io import Mp4Writer, atomic_path, exit_on_sigterm

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".webp", ".mp4", ".gif"):
        raise ValueError(f"unsupported output extension {suffix!r}; use .mp4, .gif or .png.")
    if suffix not in (".mp4", ".gif") and frames.shape[0] != 1:
        raise ValueError(f"{path.name}: an image file holds one frame, got {frames.shape[0]}; use .mp4.")
    with exit_on_sigterm(), atomic_path(path) as tmp:
        if suffix == ".mp4":
            # H.264 in yuv420p needs even sizes; tiny models can produce odd ones (Mp4Writer crops)
            with Mp4Writer(tmp, fps) as writer:
                for frame in frames:
                    writer.append(frame)
        elif suffix == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
        else:
            iio.imwrite(tmp, frames[0])
    return path


def warn_outside_vocabulary(spec, prompt: str) -> None:
    """Log a warning when a shapes model is given a prompt outside its caption grammar
    (it still renders: unknown words become ``<unk>``)."""
    if not spec.is_bundled:
        return
    from gen.pipelines.shapes.grammar import CaptionError, parse_caption

    try:
        parse_caption(prompt)
    except CaptionError as err:
        logger.warning("%s only knows captions like %r: %s", spec.name, spec.prompt, err)


def render(
    prompt: str,
    *,
    model: str = "shapes-wan",
    attention: str = "dense",
    overrides: dict | None = None,
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    image: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    model_path: str | os.PathLike | None = None,
    pipe=None,
    session=None,
) -> RenderResult:
    """Render ``prompt`` with ``model`` and the ``attention`` method; write the file.

    Args:
        prompt: text prompt.
        model: registry name (``gen models``); default ``shapes-wan``, the small Wan trained by gen.
        attention: method name (``gen methods``); ``overrides`` are its config fields.
        steps, frames, height, width, guidance: default to the model's own (pixels, frames).
        seed: generator seed (CPU generator, so results repeat across devices).
        image: input image path for image-to-video models.
        out: output file (``.mp4``/``.gif`` for video, ``.png``/``.jpg``/``.webp`` for
            images); default a unique name under ``outputs/``. Checked before loading.
        device, dtype: default CUDA/bf16 when available, else CPU/fp32.
        model_path: local folder with the model's diffusers-format weights.
        pipe: an already loaded pipeline to reuse (skips loading).
        session: a ``gen.session.Session`` to run on (models it loaded stay loaded).

    Raises:
        ValueError: any bad value (model, method, geometry, steps, seed, guidance,
            output path, device, dtype), before the model is loaded.
    """
    from gen._io import note_replacing
    from gen.session import RenderJob, Session
    from gen.values import check_output_path

    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be text, got {type(prompt).__name__}.")
    job = RenderJob(prompt, model=model, attention=attention, overrides=dict(overrides or {}), steps=steps,
                    frames=frames, height=height, width=width, seed=seed, guidance=guidance,
                    negative_prompt=negative_prompt, image=None if image is None else str(image)).resolved()
    spec = job.spec
    warn_outside_vocabulary(spec, prompt)
    path = Path(out) if out else default_output_path(spec, prompt, attention, job.seed)
    check_output_path(path, video=spec.is_video)
    if out is not None:  # as gen.long.long_video: a named file that exists is announced, once
        note_replacing(path)
    if session is None:
        session = Session(device=device, dtype=dtype, model_path=model_path)
    if pipe is not None:
        session.adopt(spec.name, pipe)
    result = session.run(job)
    write_output(result.frames, path, spec.fps)
    return RenderResult(path, result.seconds, result.load_seconds, result.frames.shape[0], job.seed,
                        result.attention)
