"""Rendering one clip or image: load a model, sparsify it, run it, write the file.

Used by ``gen render``; callable from Python too::

    from gen.render import render
    result = render("a red circle moving right on a blue background", attention="radial", out="circle.mp4")
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("gen.render")

__all__ = ["RenderResult", "render", "pipeline_kwargs", "write_output", "default_output_path"]


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


def pipeline_kwargs(spec, *, prompt: str, negative_prompt: str | None, height: int, width: int, frames: int,
                    steps: int, guidance: float, generator: torch.Generator, image=None) -> dict:
    """Keyword arguments for ``pipe(...)`` of the model family, asking for numpy output."""
    kw = dict(prompt=prompt, height=height, width=width, num_inference_steps=steps,
              guidance_scale=guidance, generator=generator, output_type="np")
    if spec.family == "wan":
        kw["num_frames"] = frames
        if negative_prompt is not None:
            kw["negative_prompt"] = negative_prompt
    elif spec.family == "hunyuan":
        kw["num_frames"] = frames
        if negative_prompt is not None:
            kw["negative_prompt"] = negative_prompt
    if spec.task == "i2v":
        if image is None:
            raise ValueError(f"{spec.name} turns an image into a video: pass --image PATH.")
        kw["image"] = image
    elif image is not None:
        raise ValueError(f"{spec.name} does not take an input image (--image is for image-to-video models).")
    return kw


def _frames_of(output, spec) -> np.ndarray:
    """``(F, H, W, 3)`` uint8 frames from a pipeline output."""
    if spec.task == "t2i":
        arr = np.asarray(output.images[0])[None]
    else:
        arr = np.asarray(output.frames[0])
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr


def default_output_path(spec, prompt: str, method: str, seed: int, folder: str | os.PathLike = "outputs") -> Path:
    """``outputs/<model>-<method>-<prompt words>-s<seed>-<time>.<ext>``: unique, never one fixed name."""
    words = "-".join(re.findall(r"[a-z0-9]+", prompt.lower())[:6]) or "clip"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ext = "png" if spec.task == "t2i" else "mp4"
    return Path(folder) / f"{spec.name}-{method}-{words}-s{seed}-{stamp}-{os.getpid()}.{ext}"


def write_output(frames: np.ndarray, path: str | os.PathLike, fps: int) -> Path:
    """Write ``(F, H, W, 3)`` uint8 frames as an mp4 (``.mp4``) or one image (``.png``/``.jpg``),
    atomically: a temporary file in the same folder renamed into place."""
    import imageio.v3 as iio

    from gen._io import atomic_path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".webp", ".mp4", ".gif"):
        raise ValueError(f"unsupported output extension {suffix!r}; use .mp4, .gif or .png.")
    with atomic_path(path) as tmp:
        if suffix == ".mp4":
            import imageio.v2 as iio2

            # H.264 in yuv420p needs even sizes; tiny models can produce odd ones
            h, w = frames.shape[1] - frames.shape[1] % 2, frames.shape[2] - frames.shape[2] % 2
            with iio2.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                 pixelformat="yuv420p", macro_block_size=2, quality=8) as writer:
                for frame in frames:
                    writer.append_data(frame[:h, :w])
        elif suffix == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
        else:
            if frames.shape[0] != 1:
                raise ValueError(f"{path.name}: an image file holds one frame, got {frames.shape[0]}; use .mp4.")
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
) -> RenderResult:
    """Render ``prompt`` with ``model`` and the ``attention`` method; write the file.

    Args:
        prompt: text prompt.
        model: registry name (``gen models``); default ``shapes-wan``, the small Wan trained by gen.
        attention: method name (``gen methods``); ``overrides`` are its config fields.
        steps, frames, height, width, guidance: default to the model's own (pixels, frames).
        seed: generator seed (CPU generator, so results repeat across devices).
        image: input image path for image-to-video models.
        out: output file (``.mp4`` for video, ``.png`` for images); default a unique name
            under ``outputs/``.
        device, dtype: default CUDA/bf16 when available, else CPU/fp32.
        model_path: local folder with the model's diffusers-format weights.
        pipe: an already loaded pipeline to reuse (skips loading).
    """
    from gen.api import sparsify
    from gen.pipelines import check_geometry, get_spec, load

    spec = get_spec(model)
    height = height or spec.height
    width = width or spec.width
    frames = frames or spec.frames
    steps = steps or spec.steps
    guidance = spec.guidance if guidance is None else guidance
    check_geometry(spec, height, width, frames)
    warn_outside_vocabulary(spec, prompt)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[dtype]

    pil_image = None
    if image is not None:
        from PIL import Image

        try:
            pil_image = Image.open(image).convert("RGB").resize((width, height))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read --image {image}: {err}") from None

    t0 = time.perf_counter()
    if pipe is None:
        pipe = load(model, device=device, dtype=torch_dtype, model_path=model_path)
    load_seconds = time.perf_counter() - t0
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs = pipeline_kwargs(spec, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                             frames=frames, steps=steps, guidance=guidance, generator=generator, image=pil_image)
    handle = sparsify(pipe, attention, model=spec.name, **(overrides or {}))
    logger.info("rendering %s: %s, %dx%d, %d frame(s), %d steps, attention %s",
                spec.name, repr(prompt), width, height, frames, steps, handle.method.config)
    try:
        t1 = time.perf_counter()
        with torch.inference_mode():
            output = pipe(**kwargs)
        seconds = time.perf_counter() - t1
        summary = handle.summary()
    finally:
        handle.restore()
    arr = _frames_of(output, spec)
    path = Path(out) if out else default_output_path(spec, prompt, attention, seed)
    if spec.task != "t2i" and path.suffix.lower() == ".png":
        raise ValueError("a video model writes .mp4 (or .gif); got a .png output path.")
    write_output(arr, path, spec.fps)
    return RenderResult(path, seconds, load_seconds, arr.shape[0], seed, summary)
