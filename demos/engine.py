"""What the demo does, without Gradio: load each model once, run it with an attention
method, compare against dense, draw block masks.

``app.py`` only maps widgets onto these calls, so everything here can be used (and
tested) from plain Python::

    engine = Engine(outputs_dir="outputs/demo")
    result = engine.run(RunRequest(model="tiny-wan", method="dense", prompt="a red ball"))
    print(result.path, result.seconds)

Runs go through gen's run core (``gen.session.Session``): the demo adds the compare
(two runs from one seed, PSNR/SSIM on the raw uint8 frames, before video encoding), a
step callback that cancels, and unique file names in its outputs folder.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gen.attention import BlockPlan, TokenLayout
from gen.pipelines import check_geometry, get_spec, list_models
from gen.render import default_output_path, write_output
from gen.session import STOCK, ModelCache, RenderJob, Session, read_image

from . import metrics

logger = logging.getLogger("gen.demos")

__all__ = [
    "BASELINES",
    "Cancelled",
    "CompareResult",
    "Engine",
    "MaskResult",
    "ModelCache",
    "RunRequest",
    "RunResult",
    "available_models",
]

DEFAULT_MODEL = "shapes-wan"
BASELINES = {
    STOCK: "stock diffusers attention",
    "dense": "gen dense (same kernels as the method)",
}
"""Compare-tab baselines: run label -> description."""


class Cancelled(Exception):  # noqa: N818 (a user action, not a failure)
    """The user asked to stop; raised from the pipeline's step callback."""

    def __init__(self, step: int | None = None, total: int | None = None) -> None:
        where = f" after step {step} of {total}" if step is not None else " before the first step"
        super().__init__(f"Cancelled{where}; nothing was saved.")


# -- models ------------------------------------------------------------------------------


def available_models() -> list[str]:
    """Model names the demo offers: the tiny ones always, real checkpoints only when their
    weights are complete in the local Hugging Face cache (gen never downloads)."""
    return [spec.name for spec, ok, _ in list_models() if ok or spec.is_local]


# -- requests and results ----------------------------------------------------------------


@dataclass(frozen=True)
class RunRequest:
    """One generation. Sizes in pixels; ``None`` takes the model's default.

    Attributes:
        model: registry name, e.g. ``"tiny-wan"``.
        method: attention method name (``gen methods``).
        overrides: the method's config fields (over the model's preset).
        prompt, negative_prompt: text; the negative prompt is used by Wan and HunyuanVideo.
        image: input image path, for image-to-video models only (ignored otherwise).
        seed: generator seed (a CPU generator, so results repeat across devices).
        steps, guidance, height, width, frames: sampling settings.
    """

    model: str
    method: str
    prompt: str
    overrides: dict = field(default_factory=dict)
    negative_prompt: str | None = None
    image: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None

    def resolved(self) -> RunRequest:
        """A copy with the model's defaults filled in and everything checked.

        Raises:
            ValueError: unknown model, geometry the model cannot take (with the nearest
                valid values), an empty prompt, a missing image for image-to-video.
        """
        spec = get_spec(self.model)
        height = self.height or spec.height
        width = self.width or spec.width
        frames = (self.frames or spec.frames) if spec.is_video else 1
        steps = self.steps or spec.steps
        guidance = spec.guidance if self.guidance is None else float(self.guidance)
        check_geometry(spec, height, width, frames)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}.")
        if not (self.prompt or "").strip():
            raise ValueError("Write a prompt first.")
        if spec.task == "i2v" and not self.image:
            raise ValueError(f"{spec.name} animates a picture: upload one under 'Input image' first.")
        return RunRequest(
            model=spec.name, method=self.method, prompt=self.prompt, overrides=dict(self.overrides),
            negative_prompt=self.negative_prompt or None, image=self.image if spec.task == "i2v" else None,
            seed=int(self.seed), steps=int(steps), guidance=guidance, height=int(height), width=int(width),
            frames=int(frames),
        )


@dataclass
class RunResult:
    """What one run produced.

    Attributes:
        path: the written file (mp4 for video models, png for image models).
        frames: ``(F, H, W, 3)`` uint8 frames as the pipeline returned them.
        seconds: wall time of the pipeline call (loading excluded).
        load_seconds: time spent loading the model for this run (0 when it was loaded).
        request: the resolved request (defaults filled in).
        label: ``"stock"`` or the method name.
        attention: ``SparseHandle.summary()`` (``{}`` for the stock attention).
        config: the method's config as it ran (preset and overrides applied); ``None``
            for the stock attention.
    """

    path: Path
    frames: np.ndarray
    seconds: float
    load_seconds: float
    request: RunRequest
    label: str
    attention: dict = field(default_factory=dict)
    config: object | None = None


@dataclass
class CompareResult:
    """A baseline and a method run from the same seed, and how they differ.

    Attributes:
        baseline, method: the two runs.
        speedup: baseline seconds / method seconds (pipeline calls only).
        psnr: PSNR in dB of the method's frames against the baseline's (``inf``: identical).
        ssim: mean SSIM, 1.0 = identical.
        first_run: True when this model, method and geometry had not run before in this
            process: times then include one-off costs (kernel compilation, allocator warm-up).
    """

    baseline: RunResult
    method: RunResult
    speedup: float
    psnr: float
    ssim: float
    first_run: bool


@dataclass
class MaskResult:
    """A block-mask picture of one attention call.

    Attributes:
        path: the PNG.
        layout: the token layout of the call.
        heads, layers: of the model's transformer.
        video_density: fraction of video query-key pairs the plan computes for this head.
        call_density: the same over the whole call with text (text is always dense),
            mean over heads.
        dense_reason: why this call runs the stock dense attention ("" when it does not).
        plan: the block plan drawn.
    """

    path: Path
    layout: TokenLayout
    heads: int
    layers: int
    video_density: float
    call_density: float
    dense_reason: str
    plan: BlockPlan


# -- the engine --------------------------------------------------------------------------


class Engine:
    """Loads models once (``ModelCache``) and runs, compares and draws masks.

    Args:
        loader: ``loader(name) -> pipeline``; default ``gen.pipelines.load`` on
            ``device``. Tests pass their own.
        outputs_dir: where every output is written under a unique name (default
            ``outputs/demo``); the only folder the app serves.
        device: for the default loader; default CUDA when available, else the CPU.
    """

    def __init__(self, loader: Callable[[str], object] | None = None, outputs_dir: str | Path | None = None,
                 device: str | None = None) -> None:
        self.session = Session(device=device, loader=loader, progress=False)
        self.device = str(self.session.device)
        self.models = self.session.models
        self.outputs_dir = Path(outputs_dir or "outputs/demo").expanduser().resolve()
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        # One pipeline call at a time, even when Gradio has already given up on a cancelled
        # event whose worker thread is still finishing its step.
        self._run_lock = threading.Lock()
        self._seen: set[tuple] = set()

    # -- files ---------------------------------------------------------------------------
    def output_path(self, spec, prompt: str, label: str, seed: int, folder: str = "") -> Path:
        """A new unique file under the outputs folder: gen's usual name plus a random
        suffix, so two runs in the same second (a compare) never share a file."""
        base = default_output_path(spec, prompt, label, seed, self.outputs_dir / folder)
        return base.with_name(f"{base.stem}-{uuid.uuid4().hex[:6]}{base.suffix}")

    # -- generation ----------------------------------------------------------------------
    def run(self, request: RunRequest, *, label: str | None = None,
            should_stop: Callable[[], bool] | None = None) -> RunResult:
        """Run ``request`` once and write its file.

        Args:
            request: what to render (resolved here).
            label: ``"stock"`` for the pipeline's own attention; default the method.
            should_stop: polled before the run and after every denoising step; when it
                returns True the run stops with ``Cancelled`` and writes nothing.

        Raises:
            ValueError: a request the model cannot take, or bad method parameters.
            Cancelled: ``should_stop`` said so.
        """
        req = request.resolved()
        spec = get_spec(req.model)
        label = label or req.method
        job = RenderJob(req.prompt, model=spec.name, attention=STOCK if label == STOCK else req.method,
                        overrides=req.overrides if label != STOCK else {}, negative_prompt=req.negative_prompt,
                        seed=req.seed, height=req.height, width=req.width, frames=req.frames, steps=req.steps,
                        guidance=req.guidance, image=req.image)
        method = job.method()
        if req.image:
            read_image(req.image, req.width, req.height)  # a bad upload fails before the model loads
        stop = should_stop or (lambda: False)

        def on_step(done: int, total: int) -> None:
            if stop():
                raise Cancelled(done, total)

        with self._run_lock:
            if stop():
                raise Cancelled()
            out = self.session.run(job, method=method, on_step=on_step)
        path = write_output(out.frames, self.output_path(spec, req.prompt, label, req.seed), spec.fps)
        return RunResult(path, out.frames, out.seconds, out.load_seconds, req, label, out.attention,
                         method.config if method is not None else None)

    def compare(self, request: RunRequest, *, baseline: str = STOCK,
                should_stop: Callable[[], bool] | None = None) -> CompareResult:
        """Run ``baseline`` (``"stock"`` or ``"dense"``) and then the request's method with the
        same seed and settings; time both and measure PSNR/SSIM between their frames."""
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}.")
        req = request.resolved()
        key = (req.model, req.method, baseline, req.height, req.width, req.frames)
        first = key not in self._seen
        # the model loads inside the first run; its time is reported, never counted as speed
        base = self.run(req, label=baseline, should_stop=should_stop) if baseline == STOCK else \
            self.run(dataclasses.replace(req, method="dense", overrides={}), should_stop=should_stop)
        meth = self.run(req, should_stop=should_stop)
        self._seen.add(key)
        return CompareResult(
            baseline=base, method=meth, speedup=base.seconds / max(meth.seconds, 1e-9),
            psnr=metrics.psnr(base.frames, meth.frames), ssim=metrics.ssim(base.frames, meth.frames),
            first_run=first,
        )

    # -- masks ---------------------------------------------------------------------------
    def model_shape(self, name: str) -> tuple[int, int]:
        """``(heads, attention layers)`` of a model's transformer, without loading it: the
        loaded pipeline's, else the architecture gen ships for the model."""
        from gen.masks import model_shape

        spec = get_spec(name)
        return model_shape(spec, self.models.loaded(spec.name))

    def mask(self, model: str, method: str, overrides: dict | None = None, *, height: int | None = None,
             width: int | None = None, frames: int | None = None, steps: int | None = None,
             layer: int = 0, head: int = 0, step: int = 0) -> MaskResult:
        """Draw the block mask ``method`` uses at one (layer, head, denoising step) of ``model``
        at this geometry, and measure its density (``gen.masks.mask_picture``, what
        ``gen masks`` draws; a dynamic method draws the plan of a real call of the model).

        Raises:
            ValueError: bad geometry, layer/head/step out of range.
        """
        from gen.masks import mask_picture

        spec = get_spec(model)
        name = f"{spec.name}-{method}-L{layer}-H{head}-S{step}-{uuid.uuid4().hex[:6]}.png"
        pic = mask_picture(method, spec.name, out=self.outputs_dir / "masks" / name, height=height, width=width,
                           frames=frames, layer=layer, head=head, step=step, overrides=overrides,
                           steps=steps, pipe=self.models.loaded(spec.name), token_limit=0)
        return MaskResult(pic.block_png, pic.layout, pic.heads, pic.layers, pic.video_density, pic.density,
                          pic.dense_reason, pic.plan)


_read_image = read_image  # the demo's name for it (its tests call it)
