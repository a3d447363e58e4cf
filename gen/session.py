"""The run core: every command that renders goes through here.

A :class:`RenderJob` says what to render (model, prompt, seed, size, steps, guidance,
attention method); :meth:`RenderJob.resolved` fills in the model's defaults once and
checks every value before anything loads. A :class:`Session` loads each model once and
runs jobs: it installs the attention method, calls the pipeline with a per-step callback,
times the steps, restores the pipeline and returns a :class:`RunOutput` (frames or
latents, timings, the attention summary). ``gen render``, ``gen batch``, the demo,
``gen eval-tiny``, ``gen capture``, ``gen calibrate`` and ``gen bench e2e``/``fidelity``
all use it::

    from gen.session import RenderJob, Session
    session = Session()
    out = session.run(RenderJob("a red circle moving right on a blue background", seed=3))
    out.frames.shape  # (17, 128, 128, 3) uint8

The denoising loop itself is the diffusers pipeline's; the one loop gen runs itself is
:class:`TransformerLoop` (the transformer alone with random weights, for benchmarks of
checkpoints that are not on the machine), and the autoregressive runner
(``gen.pipelines.ar``), which has a different shape of work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gen.values import (
    check_device,
    check_dtype,
    check_guidance,
    check_prompt,
    check_seed,
    check_steps,
    check_tokens,
    check_ulysses,
)

logger = logging.getLogger("gen.session")

__all__ = [
    "STOCK",
    "JOB_FIELDS",
    "ModelCache",
    "RenderJob",
    "RunOutput",
    "Session",
    "TransformerLoop",
    "frames_of",
    "pipeline_kwargs",
]

STOCK = "stock"
"""Attention name meaning the pipeline's own attention: gen installs nothing."""

StepCallback = Callable[[int, int], None]
"""``on_step(done, total)`` after each denoising step; raising from it stops the run."""


@dataclass(frozen=True)
class RenderJob:
    """One clip or image to render. ``None`` takes the model's default.

    Attributes:
        prompt: the text prompt.
        model: registry name (``gen models``); default the built-in ``shapes-wan``.
        attention: attention method (``gen methods``), or ``"stock"`` for the pipeline's
            own attention with gen not installed.
        overrides: the method's config fields over the model's preset.
        negative_prompt: used by Wan and HunyuanVideo (ignored by FLUX).
        seed: seed of a CPU generator (so results repeat across devices).
        height, width: pixels. frames: frames of video (1 for image models).
        steps: denoising steps. guidance: guidance scale.
        image: input image path for image-to-video models.
        out: output file; where the caller decides the name (``gen batch``), a name
            relative to its output folder.
        id: a name for the job (``gen batch`` uses it in file names and the index).
    """

    prompt: str
    model: str = "shapes-wan"
    attention: str = "dense"
    overrides: Mapping = field(default_factory=dict)
    negative_prompt: str | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    image: str | None = None
    out: str | None = None
    id: str | None = None

    @property
    def spec(self):
        """The model's ``ModelSpec``."""
        from gen.pipelines import get_spec

        return get_spec(self.model)

    def resolved(self) -> RenderJob:
        """A copy with the model's defaults filled in and every value checked, without
        loading anything.

        Raises:
            ValueError: unknown model or method, bad method parameters, a geometry the
                model cannot take (with the nearest valid values), steps/seed/guidance out
                of range, an empty prompt, a missing or unwanted input image.
        """
        from gen.pipelines import check_geometry

        spec = self.spec
        check_prompt(self.prompt)
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be text, got {type(self.negative_prompt).__name__}.")
        height = spec.height if self.height is None else self.height
        width = spec.width if self.width is None else self.width
        frames = (spec.frames if self.frames is None else self.frames) if spec.is_video else \
            (1 if self.frames is None else self.frames)
        check_geometry(spec, height, width, frames)
        check_tokens(spec.token_grid(height, width, frames), what=f"{width}x{height} pixels, {frames} frame(s)")
        steps = check_steps(spec.steps if self.steps is None else self.steps)
        guidance = check_guidance(spec.guidance if self.guidance is None else self.guidance)
        seed = check_seed(self.seed)
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must be a mapping of method parameters, got {type(self.overrides).__name__}.")
        if self.attention != STOCK:
            self.method()  # unknown names and bad parameters fail here, before any load
        elif self.overrides:
            raise ValueError("the stock attention takes no parameters; drop the overrides or choose a method.")
        image = self.image
        if spec.task == "i2v":
            if not image:
                raise ValueError(f"{spec.name} turns an image into a video: give an input image (--image PATH).")
            if not Path(image).expanduser().is_file():
                raise ValueError(f"input image {image} does not exist.")
            image = str(image)
        elif image:
            raise ValueError(f"{spec.name} does not take an input image (--image is for image-to-video models).")
        return dataclasses.replace(
            self, model=spec.name, overrides=dict(self.overrides), height=height, width=width, frames=frames,
            steps=steps, guidance=guidance, seed=seed, image=image or None,
        )

    def method(self):
        """The attention method object (preset for the model, overrides applied); ``None``
        for the stock attention."""
        from gen.attention.methods import get_method

        if self.attention == STOCK:
            return None
        spec = self.spec
        return get_method(self.attention, model=spec.name, family=spec.family, **dict(self.overrides))

    def to_dict(self) -> dict:
        """The job as plain JSON-able data (every field)."""
        d = dataclasses.asdict(self)
        d["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(self.overrides).items()}
        return d

    @classmethod
    def from_dict(cls, data: Mapping) -> RenderJob:
        """A job from a mapping of field names (``ValueError`` naming unknown fields)."""
        unknown = sorted(set(data) - set(JOB_FIELDS))
        if unknown:
            raise ValueError(f"unknown job field(s) {', '.join(map(repr, unknown))}; "
                             f"a job has: {', '.join(JOB_FIELDS)}.")
        if "prompt" not in data:
            raise ValueError("a job needs a prompt.")
        return cls(**dict(data))

    def key(self) -> str:
        """A hash of everything that decides the output's content (the resolved job minus
        its file name and id, plus the input image's bytes): equal keys render equal
        frames on the same machine. ``gen batch`` resumes on it."""
        job = self.resolved()
        d = job.to_dict()
        d.pop("out")
        d.pop("id")
        if job.image:
            d["image"] = hashlib.sha256(Path(job.image).expanduser().read_bytes()).hexdigest()
        text = json.dumps(d, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


JOB_FIELDS = tuple(f.name for f in dataclasses.fields(RenderJob))
"""Names of the fields of a :class:`RenderJob` (what a ``gen batch`` manifest line may set)."""


@dataclass
class RunOutput:
    """What one job produced.

    Attributes:
        job: the resolved job.
        frames: ``(F, H, W, 3)`` uint8 frames (``None`` when the run kept latents).
        latents: the pipeline's latent output when asked for (``decode=False``), else None.
        seconds: wall time of the pipeline call (loading excluded).
        load_seconds: time spent loading the model for this job (0 when it was loaded).
        step_seconds: wall time of each denoising step (synchronised on CUDA).
        attention: the sparsify handle's summary (``{}`` for the stock attention).
        config: the method's config as it ran (``None`` for the stock attention).
        method: the method object that ran (recorders read what they kept from it).
    """

    job: RenderJob
    frames: np.ndarray | None
    seconds: float
    load_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    attention: dict = field(default_factory=dict)
    config: object | None = None
    latents: torch.Tensor | np.ndarray | None = None
    method: object | None = None


def pipeline_kwargs(spec, *, prompt, negative_prompt, height: int, width: int, frames: int,
                    steps: int, guidance: float, generator, image=None) -> dict:
    """Keyword arguments for ``pipe(...)`` of the model family, asking for numpy output.
    ``prompt``, ``negative_prompt`` and ``generator`` may be lists (one per clip)."""
    kw = dict(prompt=prompt, height=height, width=width, num_inference_steps=steps,
              guidance_scale=guidance, generator=generator, output_type="np")
    if spec.is_video:
        kw["num_frames"] = frames
    if spec.takes_negative_prompt and negative_prompt is not None:
        kw["negative_prompt"] = negative_prompt
    if spec.task == "i2v":
        if image is None:
            raise ValueError(f"{spec.name} turns an image into a video: pass --image PATH.")
        kw["image"] = image
    elif image is not None:
        raise ValueError(f"{spec.name} does not take an input image (--image is for image-to-video models).")
    return kw


def frames_of(output, spec, index: int = 0) -> np.ndarray:
    """``(F, H, W, 3)`` uint8 frames of clip ``index`` of a pipeline output (``output_type="np"``)."""
    arr = np.asarray(output.images[index])[None] if spec.task == "t2i" else np.asarray(output.frames[index])
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr


def read_image(path, width: int, height: int):
    """The input image at ``path`` as RGB resized to the render's size (``ValueError`` if
    it cannot be read; the message does not quote the path, which may be a server's)."""
    from PIL import Image

    try:
        return Image.open(path).convert("RGB").resize((width, height))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the input image ({type(err).__name__}); give a PNG or JPEG.") from None


class ModelCache:
    """Pipelines by model name, each loaded once by ``loader(name)`` and reused.

    Tiny and bundled models stay loaded (a few MB each). Of the real checkpoints only the
    one used last is kept: two 14B pipelines do not fit one GPU, so switching frees the
    other. ``loads`` counts the loads per model (how tests see "loaded once").
    """

    def __init__(self, loader: Callable[[str], object]) -> None:
        self._loader = loader
        self._pipes: dict[str, object] = {}
        self._lock = threading.Lock()
        self.loads: Counter[str] = Counter()

    def loaded(self, name: str):
        """The pipeline of ``name`` if it is loaded, else ``None`` (never loads)."""
        return self._pipes.get(name)

    def put(self, name: str, pipe) -> None:
        """Use ``pipe`` (already loaded by the caller) for ``name``."""
        with self._lock:
            self._pipes[name] = pipe

    def get(self, name: str) -> tuple[object, float]:
        """``(pipeline, seconds spent loading it now)``; 0 s when it was already loaded."""
        from gen.pipelines import get_spec

        with self._lock:  # two requests for one model must not load it twice
            if name in self._pipes:
                return self._pipes[name], 0.0
            if not get_spec(name).is_local:
                for other in [n for n in self._pipes if not get_spec(n).is_local]:
                    logger.info("unloading %s to make room for %s", other, name)
                    del self._pipes[other]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            t0 = time.perf_counter()
            pipe = self._loader(name)
            self._pipes[name] = pipe
            self.loads[name] += 1
            return pipe, time.perf_counter() - t0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Session:
    """Loads each model once and runs jobs on it.

    Args:
        device: ``cuda``/``cpu``; default CUDA when available.
        dtype: ``bf16``/``fp16``/``fp32`` or None for the model's own (fp32 on the CPU).
        model_path: a local diffusers folder to load (every model this session loads).
        loader: ``loader(name) -> pipeline`` instead of ``gen.pipelines.load`` (tests).
        progress: show the pipeline's own step bar (None leaves the pipeline's setting).
        ulysses: ranks that share each attention call (diffusers' Ulysses context
            parallelism, ``gen.parallel.enable_ulysses``), applied to every pipeline right
            after it loads; 1 (default) runs on this process alone. Needs a process group
            of that size (``torchrun``, ``gen.parallel.init_distributed``); every rank runs
            the same jobs with the same seeds and gets the same frames.
    """

    def __init__(self, *, device=None, dtype=None, model_path=None, loader: Callable[[str], object] | None = None,
                 progress: bool | None = None, ulysses: int = 1) -> None:
        self.device = check_device(device)
        self.dtype = check_dtype(dtype)
        self.model_path = model_path
        self.progress = progress
        self.ulysses = check_ulysses(ulysses, unit="ranks per attention call")
        if loader is None:
            def loader(name: str):
                from gen.pipelines import load

                return load(name, device=self.device, dtype=self.dtype, model_path=self.model_path)
        self.models = ModelCache(loader)

    def pipeline(self, model: str):
        """``(pipeline, seconds spent loading it now)`` of ``model``, loaded once."""
        from gen.pipelines import get_spec

        pipe, seconds = self.models.get(get_spec(model).name)
        if self.ulysses > 1:
            from gen.parallel import enable_ulysses

            enable_ulysses(pipe, self.ulysses)  # once per pipeline: a no-op when it is parallel already
        if self.progress is not None:
            pipe.set_progress_bar_config(disable=not self.progress)
        return pipe, seconds

    def adopt(self, model: str, pipe) -> None:
        """Run ``model``'s jobs on ``pipe``, a pipeline the caller loaded."""
        from gen.pipelines import get_spec

        self.models.put(get_spec(model).name, pipe)

    def run(self, job: RenderJob, *, method=None, install: bool = True, on_step: StepCallback | None = None,
            decode: bool = True) -> RunOutput:
        """Render one job.

        Args:
            job: what to render (resolved here).
            method: an attention method object to install instead of ``job.attention``
                (capture and calibration install their own recorders).
            install: False runs the pipeline as it is (the caller installed gen already,
                e.g. a benchmark that wraps the handle); the summary is then empty.
            on_step: ``on_step(done, total)`` after each denoising step; raise from it to
                stop (the pipeline is restored, nothing is returned).
            decode: False skips the VAE and returns the latents (``RunOutput.latents``).
        """
        return self.run_group([job], method=method, install=install, on_step=on_step, decode=decode)[0]

    def run_group(self, jobs: Sequence[RenderJob], *, method=None, install: bool = True,
                  on_step: StepCallback | None = None, decode: bool = True) -> list[RunOutput]:
        """Render several jobs in one pipeline call (a batch of prompts): they must differ
        only in prompt, negative prompt, seed, out and id. Each clip's frames equal what
        its own generator gives. Returns one output per job; times are the shared call's."""
        if not jobs:
            return []
        resolved = [j.resolved() for j in jobs]
        first = resolved[0]
        same = ("model", "attention", "overrides", "height", "width", "frames", "steps", "guidance", "image")
        for j in resolved[1:]:
            diff = [f for f in same if getattr(j, f) != getattr(first, f)]
            if diff:
                raise ValueError(f"jobs of one group must agree on {', '.join(diff)}.")
        spec = first.spec
        if method is None and install:
            method = first.method()
        image = read_image(first.image, first.width, first.height) if first.image else None
        pipe, load_seconds = self.pipeline(spec.name)
        many = len(resolved) > 1
        kwargs = pipeline_kwargs(
            spec,
            prompt=[j.prompt for j in resolved] if many else first.prompt,
            negative_prompt=([j.negative_prompt or "" for j in resolved] if any(j.negative_prompt for j in resolved)
                             else None) if many else first.negative_prompt,
            height=first.height, width=first.width, frames=first.frames, steps=first.steps,
            guidance=first.guidance,
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in resolved] if many
            else torch.Generator("cpu").manual_seed(first.seed),
            image=image,
        )
        if not decode:
            kwargs["output_type"] = "latent"
        marks: list[float] = []
        started: list[float] = []
        device = self.device

        def on_forward(module, args, kw):
            if not started:  # the denoising loop begins with the first transformer call
                _sync(device)
                started.append(time.perf_counter())

        def on_step_end(_pipe, step, _t, callback_kwargs):
            _sync(device)
            marks.append(time.perf_counter())
            if on_step is not None:
                on_step(step + 1, first.steps)
            return {}

        kwargs["callback_on_step_end"] = on_step_end
        handle = None
        if install and method is not None:
            from gen.api import sparsify

            handle = sparsify(pipe, method, model=spec.name)
        label = getattr(method, "name", None) or (first.attention if install else "as installed")
        logger.info("rendering %s: %s, %dx%d, %d frame(s), %d steps, seed %s, attention %s", spec.name,
                    repr(first.prompt) + (f" (+{len(resolved) - 1} more)" if many else ""), first.width,
                    first.height, first.frames, first.steps, ",".join(str(j.seed) for j in resolved),
                    handle.method.config if handle is not None else label)
        hook = pipe.transformer.register_forward_pre_hook(on_forward, with_kwargs=True) \
            if getattr(pipe, "transformer", None) is not None else None
        try:
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                output = pipe(**kwargs)
            _sync(device)
            seconds = time.perf_counter() - t0
            summary = handle.summary() if handle is not None else {}
        finally:
            if hook is not None:
                hook.remove()
            if handle is not None:
                handle.restore()
        step_seconds = [b - a for a, b in zip(started[:1] + marks[:-1], marks)]
        installed = handle.method if handle is not None else None
        config = installed.config if installed is not None else None
        results = []
        for i, job in enumerate(resolved):
            if decode:
                frames, latents = frames_of(output, spec, i), None
            else:
                frames, latents = None, (output.images if spec.task == "t2i" else output.frames)[i]
            results.append(RunOutput(job, frames, seconds, load_seconds if i == 0 else 0.0, list(step_seconds),
                                     summary, config, latents, installed))
        return results


class TransformerLoop:
    """The transformer alone, in a flow-matching Euler loop on random inputs: how
    ``gen bench e2e --random-weights`` times a real architecture whose weights are not
    on the machine (no text encoder, no VAE; the attention work is the same as a real run's).

    Args:
        spec: the model's spec. model: its transformer. passes: transformer calls per
            step (2 with classifier-free guidance). latents: the initial latents.
        key: the name of the transformer's latent input. kwargs: its other inputs.
    """

    def __init__(self, spec, model, *, latents: torch.Tensor, key: str, kwargs: dict, steps: int, passes: int,
                 device) -> None:
        self.model, self.device, self.steps, self.passes = model, device, steps, passes
        self.latents, self.key, self.kwargs = latents, key, kwargs
        #: what the pipeline divides the scheduler's timestep by (FLUX: 1000; the family adapter's)
        self.timestep_divisor = spec.adapter.timestep_divisor

    def _call(self, x: torch.Tensor, t: float) -> torch.Tensor:
        ts = torch.full((x.shape[0],), t / self.timestep_divisor, device=self.device, dtype=x.dtype)
        out = None
        for _ in range(self.passes):  # cond and uncond with CFG, at the same timestep
            out = self.model(**{self.key: x}, timestep=ts, **self.kwargs, return_dict=False)[0]
        return out

    def warmup(self) -> None:
        """One untimed transformer step."""
        self._call(self.latents, 1000.0)
        _sync(self.device)

    def run(self, tick: Callable[[str], None]) -> tuple[float, list[float]]:
        """``(total seconds, seconds per step)`` of the whole loop; ``tick`` after each step."""
        sigmas = torch.linspace(1.0, 0.0, self.steps + 1).tolist()
        x = self.latents.clone()
        times = []
        _sync(self.device)
        t_start = time.perf_counter()
        for i in range(self.steps):
            t0 = time.perf_counter()
            v = self._call(x, 1000.0 * sigmas[i])
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # flow-matching Euler step
            _sync(self.device)
            times.append(time.perf_counter() - t0)
            tick(f"step {i + 1}/{self.steps}")
        return time.perf_counter() - t_start, times
