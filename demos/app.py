"""The Gradio app: generate with a sparse attention method, compare it with dense, look
at its block masks.

``create_app()`` builds the ``gr.Blocks`` (tests pass their own pipeline loader and
outputs folder); ``launch(app)`` serves it with safe defaults (127.0.0.1, no share
link, only the outputs folder served); ``serve()`` is what ``gen demo`` runs.

Layout: the shared inputs on the left (model, prompt, attention method and its
parameters, sampling), three tabs on the right:

- **Generate**: one run; the video or image, the seed used, time, attention density and
  what ran dense.
- **Compare**: a baseline (stock diffusers attention, or gen's dense kernels) and the
  method from the same seed side by side, with the speedup and PSNR/SSIM between them.
- **Masks**: the block mask of the method at the chosen geometry, layer, head and step.

Files: the outputs folder is checked first (``paths.check_outputs_dir``: never the
filesystem root, a system folder, the home folder, a repository root or a folder holding
other files) and is the only folder of ours the server reads. A file input (the I2V
image) takes only a file uploaded to this app, at most ``max_upload_mb``: a request that
names any other file on the server, or names a file in a text field, is refused before
Gradio reads or copies anything (``_guard_uploads``). Error messages never carry server
paths, and Gradio's own errors reach the page as a bare "Error" (``show_error=False``).

Serving rules: one pipeline run at a time (Generate and Compare share one queue slot,
``max_queue`` waiting at most); every model is loaded once and reused; every output
gets its own file under the outputs folder; errors come back as ``gr.Error`` messages
and the app keeps serving; Cancel stops a run at the next denoising step.

Empty means default: the sampling fields (steps, guidance, size, frames) and the method
parameters start empty and are filled with the model's defaults and the method's preset
for that model when the page loads and whenever the model changes; a field left empty
(or an API argument left out) takes the same default.

API (``gradio_client``): ``/generate``, ``/compare``, ``/masks`` and ``/cancel``, with
keyword parameters named like the inputs (``model``, ``attention``, ``prompt``, ``seed``,
``height``, ...); method parameters are ``<method>__<field>``, e.g. ``mask__pattern``::

    client.predict(model="tiny-wan", attention="mask", prompt="a red ball",
                   mask__pattern="same frame", api_name="/generate")
"""

from __future__ import annotations

import inspect
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr
import torch

from gen.attention.methods import MethodConfig, list_methods, method_class
from gen.pipelines import get_spec

from . import report
from .engine import BASELINES, DEFAULT_MODEL, STOCK, Cancelled, Engine, RunRequest, available_models
from .params import form_values, method_fields, overrides_from
from .paths import prepare_outputs_dir, sensitive_paths

logger = logging.getLogger("gen.demos")

__all__ = ["create_app", "launch", "serve", "THEME", "CSS"]

DEFAULT_OUTPUTS = "outputs/demo"
MAX_UPLOAD_MB = 20.0
"""Default cap on an uploaded input image, in MB (``create_app(max_upload_mb=...)``,
``gen demo --max-upload-mb``)."""
UPLOAD_ONLY = ("The image must be uploaded through the demo (the 'Input image' field, or "
               "gradio_client.handle_file from a script); the demo reads no other files.")

_TASKS = {"t2v": "text→video", "i2v": "image→video", "t2i": "text→image"}
_EXAMPLES = [
    "a red circle moving right on a blue background",
    "a yellow triangle bouncing on a gray background",
    "a white square moving up on a green background",
    "a paper boat drifting down a rain-soaked street at dusk",
]
# System fonts only: the default theme would fetch Google Fonts, and the demo must
# render the same with no network.
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
CSS = """
.gen-report table { font-size: 0.9em; }
.gen-report td:first-child { white-space: nowrap; }
.gen-report blockquote { font-size: 0.85em; opacity: 0.85; }
"""


class _Stops:
    """Per-session cancel flags: Cancel in one browser tab stops that tab's run only."""

    def __init__(self) -> None:
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        flag = threading.Event()  # a fresh flag: a Cancel pressed earlier does not carry over
        with self._lock:
            self._flags[session] = flag
        return flag

    def request(self, session: str) -> bool:
        with self._lock:
            flag = self._flags.get(session)
        if flag is not None:
            flag.set()
        return flag is not None

    def finish(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get(session) is flag:
                del self._flags[session]


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


# an absolute POSIX path (or ~/...): a slash that follows no word character, dot, colon or
# slash (so not "PSNR/SSIM" or the "//" of a URL), then path characters
_ABS_PATH = re.compile(r"(?<![\w.:/~])(?:~/|/)(?=[\w.~-])[^\s'\"`<>|,;()\[\]{}]*[^\s'\"`<>|,;()\[\]{}.:]")


def _no_paths(text: str) -> str:
    """``text`` with every absolute server path replaced by ``<path>``: messages go to
    whoever reaches the page, the server log keeps the full text."""
    return _ABS_PATH.sub("<path>", text)


def _gr_error(err: BaseException) -> gr.Error:
    """A message for the page: what went wrong and what to do; the app keeps serving.
    Server paths in the message are replaced by ``<path>`` (the log has them)."""
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, Cancelled):
        return gr.Error(str(err), title="Cancelled", print_exception=False)
    if isinstance(err, ValueError):  # bad input: geometry, parameters, missing weights
        message = _no_paths(str(err))
        if message != str(err):
            logger.info("demo request refused: %s", err)
        return gr.Error(message, print_exception=False)
    if isinstance(err, torch.OutOfMemoryError):
        return gr.Error("Out of memory: try fewer frames, a smaller size, fewer steps or a sparser method.",
                        title="Out of memory", print_exception=False)
    logger.exception("demo request failed")
    return gr.Error(f"{type(err).__name__}: {_no_paths(str(err))}. The app is still running; "
                    f"the server log has the traceback.")


# -- file inputs -------------------------------------------------------------------------


def _file_refs(value) -> Iterator[dict]:
    """Every file reference (a dict with a ``path`` or ``url`` key: Gradio's ``FileData``,
    with or without its ``meta``) anywhere in one input value of a request."""
    if isinstance(value, dict):
        if "path" in value or "url" in value:
            yield value
        for v in value.values():
            yield from _file_refs(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _file_refs(v)


def _upload_folder(app: gr.Blocks) -> Path:
    """Where this app's server puts uploads (``/gradio_api/upload``): the running server's
    ``uploaded_file_dir``, which Gradio takes from ``gradio.utils.get_upload_folder()``
    (``$GRADIO_TEMP_DIR``, else ``<tmp>/gradio``) when it starts."""
    folder = getattr(getattr(app, "server_app", None), "uploaded_file_dir", None)
    if not folder:
        from gradio.utils import get_upload_folder

        folder = get_upload_folder()
    return Path(folder).resolve()


def _check_upload(ref: dict, folder: Path, max_bytes: int) -> Path:
    """The file a request names, if it is a picture uploaded to this app (inside its upload
    folder once symbolic links are resolved, at most ``max_bytes``); else ``gr.Error``
    without any path in it. A reference without a local ``path`` (a URL or ``data:``
    URL only) is refused too: the page always uploads first."""
    path = ref.get("path")
    if not isinstance(path, str) or not path or "://" in path:
        raise gr.Error(UPLOAD_ONLY, print_exception=False)
    try:
        resolved = Path(path).resolve(strict=True)
        if not resolved.is_relative_to(folder) or not resolved.is_file():
            raise FileNotFoundError(path)
        size = resolved.stat().st_size
    except (OSError, RuntimeError):  # missing, a symlink loop, unreadable: all the same answer
        logger.warning("refused a file input outside the uploads: %r", path)
        raise gr.Error(UPLOAD_ONLY, print_exception=False) from None
    if size > max_bytes:
        raise gr.Error(f"The image is larger than the demo's limit of {max_bytes / 1e6:g} MB; upload a smaller one.",
                       print_exception=False)
    from PIL import Image

    try:
        with Image.open(resolved):  # reads the header only
            pass
    except Exception:
        raise gr.Error("The uploaded file is not a picture the demo can read; upload a PNG or JPEG.",
                       print_exception=False) from None
    return resolved


def _guard_uploads(app: gr.Blocks, file_inputs: set[int], max_bytes: int) -> None:
    """Check every request's inputs before Gradio processes them.

    A request can name any file on the server as an input (``{"path": ...}``, Gradio's
    ``FileData``). Gradio hands a reference without ``"meta"`` to the component as it is
    (``gr.Image`` then opens whatever path it names), copies one with ``"meta"`` into its
    upload cache (served by ``/gradio_api/file=``) after a check that depends on its
    request context, and quotes the paths in its errors. So here, ahead of all of that,
    a file reference is accepted only in an input of ``file_inputs`` (component ids) and
    only when ``_check_upload`` accepts it. The hook is this app's own ``preprocess_data``,
    which every endpoint goes through (queued or not, ``gradio_client`` or plain HTTP);
    the per-session copies Gradio makes of components do not bypass it.
    """
    original = getattr(app, "preprocess_data", None)
    if not inspect.iscoroutinefunction(original):  # fail closed on a Gradio that moved it
        raise RuntimeError("this Gradio version has no Blocks.preprocess_data: the demo cannot check "
                           "file inputs; install a gradio release the demo supports (pyproject.toml).")

    async def preprocess_data(block_fn, inputs, *args, **kwargs):
        folder = None
        for block, value in zip(block_fn.inputs, inputs):
            for ref in _file_refs(value):
                if getattr(block, "_id", None) not in file_inputs:
                    raise gr.Error("Files can only be sent to the 'Input image' field.", print_exception=False)
                folder = folder or _upload_folder(app)
                _check_upload(ref, folder, max_bytes)
        return await original(block_fn, inputs, *args, **kwargs)

    app.preprocess_data = preprocess_data


def _model_label(name: str) -> tuple[str, str]:
    spec = get_spec(name)
    # short enough for the dropdown's width; the vocabulary is in the info line below it
    kind = _TASKS[spec.task] + (", random weights" if spec.is_tiny else ", trained on shape clips" if spec.is_bundled
                                else "")
    return f"{name} ({kind})", name


def _model_info(name: str) -> str:
    spec = get_spec(name)
    size = f"{spec.width}×{spec.height}" + (f", {spec.frames} frames at {spec.fps} fps" if spec.is_video else "")
    # in code spans: Markdown would take <colour> for an HTML tag and drop it
    knows = (" Knows prompts of the form `a <colour> <shape> [moving left/right/up/down | standing still | bouncing] "
             "[on a <colour> background]`." if spec.is_bundled else "")
    return f"{spec.description}. Default {size}, {spec.steps} steps.{knows}"


def _methods_for(family: str) -> list[str]:
    return [m for m in list_methods() if family in method_class(m).families]


def _int_or_none(value) -> int | None:
    return None if value in (None, "") else int(value)


def _keywords(fn: Callable, names) -> Callable:
    """Give ``fn(..., **values)`` a signature that lists ``names`` as keyword-only
    parameters defaulting to ``None``.

    Gradio reads the handler's signature for the API: an input whose component starts
    empty (the I2V image, an optional method parameter) would otherwise be a required
    argument for ``gradio_client`` callers. ``fn`` still receives them in ``**values``.
    """
    sig = inspect.signature(fn)
    fixed = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in fixed}
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names if n not in taken]
    fn.__signature__ = sig.replace(parameters=[*fixed, *extra])
    return fn


def create_app(
    loader: Callable[[str], object] | None = None,
    outputs_dir: str | Path | None = None,
    *,
    default_model: str = DEFAULT_MODEL,
    default_method: str = "dense",
    device: str | None = None,
    max_queue: int = 8,
    models: list[str] | None = None,
    max_upload_mb: float = MAX_UPLOAD_MB,
) -> gr.Blocks:
    """Build the demo.

    Args:
        loader: ``loader(model_name) -> diffusers pipeline``; default ``gen.pipelines.load``
            on ``device``. Each model is loaded once and reused.
        outputs_dir: folder for every output (default ``outputs/demo``), and the only folder
            ``launch`` lets the server read: a new folder (created here), an empty one or
            one the demo used before (``paths.check_outputs_dir``).
        default_model: the model selected at start.
        default_method: the attention method selected at start.
        device: for the default loader; default CUDA when available, else the CPU.
        max_queue: requests that may wait for the one running pipeline (more are refused
            with "queue is full").
        models: model names to offer; default the tiny ones plus every real checkpoint
            whose weights are in the local Hugging Face cache.
        max_upload_mb: the largest input image accepted, in MB (``launch`` also makes it
            Gradio's ``max_file_size``).

    Returns:
        The ``gr.Blocks``, queue configured; ``app.gen_engine`` is its ``Engine``.

    Raises:
        ValueError: an outputs folder that is unsafe to serve (the message says why and
            what to do), or a ``max_upload_mb`` that is not positive.
    """
    if not max_upload_mb > 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb!r}.")
    outputs = prepare_outputs_dir(outputs_dir or DEFAULT_OUTPUTS)
    engine = Engine(loader=loader, outputs_dir=outputs, device=device)
    stops = _Stops()
    names = models or available_models()
    spec0 = get_spec(default_model)
    if spec0.name not in names:
        names = [spec0.name, *names]
    all_methods = list_methods()
    fields = {m: method_fields(m) for m in all_methods}
    shapes = {n: engine.model_shape(n) for n in names}  # (heads, layers); no loading
    max_heads = max(h for h, _ in shapes.values())
    max_layers = max(n for _, n in shapes.values())

    with gr.Blocks(title="gen demo: sparse attention for video diffusion", analytics_enabled=False) as app:
        gr.Markdown(
            "## gen · sparse attention for video and image diffusion\n"
            "Generate with an attention method, compare it against dense attention from the same seed, "
            "and look at the block masks it computes. The default `shapes-wan` is a small Wan 2.1 trained by gen "
            "on clips of moving shapes (prompts like the first examples); the `tiny-*` models have random "
            "weights: their pictures are noise, but the pipelines, attention calls, timings and masks are real."
        )
        with gr.Row(equal_height=False):
            # -- shared inputs ---------------------------------------------------------
            with gr.Column(scale=2, min_width=340):
                model = gr.Dropdown([_model_label(n) for n in names], value=spec0.name, label="Model", elem_id="model")
                model_info = gr.Markdown(_model_info(spec0.name))
                prompt = gr.Textbox(_EXAMPLES[0], label="Prompt", lines=2, max_lines=6, elem_id="prompt")
                negative = gr.Textbox("", label="Negative prompt", lines=1, max_lines=4,
                                      visible=spec0.takes_negative_prompt)
                image = gr.Image(label="Input image (first frame)", type="filepath", sources=["upload", "clipboard"],
                                 visible=spec0.task == "i2v", height=200)
                gr.Examples([[e] for e in _EXAMPLES], inputs=[prompt], label="Example prompts")
                with gr.Accordion("Attention", open=True):
                    method_choices = _methods_for(spec0.family)
                    method0 = default_method if default_method in method_choices else method_choices[0]
                    attention = gr.Dropdown(method_choices, value=method0, label="Attention method",
                                            elem_id="attention")
                    method_info = gr.Markdown(method_class(method0).summary)
                    groups, widgets = {}, {}
                    shared = set(MethodConfig.field_names())  # schedule and backend, in every method
                    for m in all_methods:
                        with gr.Column(visible=m == method0) as group:
                            for f in fields[m]:
                                if f.name not in shared:
                                    widgets[f.key] = _widget(f)
                            with gr.Accordion("Schedule and backend", open=False):
                                for f in fields[m]:
                                    if f.name in shared:
                                        widgets[f.key] = _widget(f)
                        groups[m] = group
                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        seed = gr.Number(42, label="Seed", precision=0, minimum=-1, maximum=2**32 - 1,
                                         info="-1 or 'Randomize' draws one")
                        randomize = gr.Checkbox(False, label="Randomize seed")
                    # empty = the model's default (filled in on page load and model change)
                    with gr.Row():
                        steps = gr.Number(None, label="Steps", elem_id="steps", precision=0, minimum=1,
                                          maximum=1000, placeholder="model default")
                        guidance = gr.Number(None, label="Guidance scale", minimum=0, maximum=100, step=0.5,
                                             placeholder="model default")
                    with gr.Row():
                        height = gr.Number(None, label="Height (px)", elem_id="height", precision=0, minimum=16,
                                           maximum=4096, step=16, placeholder="model default")
                        width = gr.Number(None, label="Width (px)", elem_id="width", precision=0, minimum=16,
                                          maximum=4096, step=16, placeholder="model default")
                        frames = gr.Number(None, label="Frames (4k+1)", elem_id="frames", precision=0, minimum=1,
                                           maximum=1025, step=4, visible=spec0.is_video, placeholder="model default")

            # -- tabs ------------------------------------------------------------------
            with gr.Column(scale=3, min_width=420):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate"):
                        with gr.Row():
                            gen_btn = gr.Button("Generate", variant="primary", scale=3, interactive=False,
                                                elem_id="generate")
                            gen_cancel = gr.Button("Cancel", variant="stop", scale=1, elem_id="cancel")
                        gen_video = gr.Video(label="Video", interactive=False, elem_id="gen-video",
                                             visible=spec0.is_video, autoplay=True, loop=True, height=360)
                        gen_image = gr.Image(label="Image", type="filepath", interactive=False, elem_id="gen-image",
                                             visible=not spec0.is_video, height=360)
                        used_seed = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="used-seed")
                        gen_report = gr.Markdown(elem_classes="gen-report", elem_id="gen-report")
                    with gr.Tab("Compare", id="compare"):
                        with gr.Row():
                            baseline = gr.Radio([(v, k) for k, v in BASELINES.items()], value=STOCK,
                                                label="Baseline", scale=3)
                        with gr.Row():
                            cmp_btn = gr.Button("Compare", variant="primary", scale=3, interactive=False,
                                                elem_id="compare")
                            cmp_cancel = gr.Button("Cancel", variant="stop", scale=1)
                        with gr.Row():
                            cmp_base_video = gr.Video(label="Baseline", interactive=False, elem_id="cmp-base-video",
                                                      visible=spec0.is_video, autoplay=True, loop=True, height=280)
                            cmp_meth_video = gr.Video(label="Method", interactive=False, elem_id="cmp-method-video",
                                                      visible=spec0.is_video, autoplay=True, loop=True, height=280)
                            cmp_base_image = gr.Image(label="Baseline", type="filepath", interactive=False,
                                                      elem_id="cmp-base-image", visible=not spec0.is_video, height=280)
                            cmp_meth_image = gr.Image(label="Method", type="filepath", interactive=False,
                                                      elem_id="cmp-method-image", visible=not spec0.is_video, height=280)
                        cmp_report = gr.Markdown(elem_classes="gen-report", elem_id="cmp-report")
                        with gr.Accordion("Numbers (JSON)", open=False):
                            cmp_numbers = gr.JSON(label="Comparison")
                    with gr.Tab("Masks", id="masks"):
                        heads0, layers0 = shapes[spec0.name]
                        with gr.Row():
                            layer = gr.Slider(0, max_layers - 1, value=0, step=1, label="Layer", elem_id="mask-layer")
                            head = gr.Slider(0, max_heads - 1, value=0, step=1, label="Head")
                            mask_step = gr.Slider(0, 999, value=spec0.steps - 1, step=1, label="Denoising step",
                                                  info="0-based; dense_steps makes early steps dense")
                        mask_btn = gr.Button("Show mask", variant="primary", interactive=False, elem_id="show-mask")
                        # no label overlay: it would cover the picture's own title
                        mask_image = gr.Image(label="Block mask", show_label=False, type="filepath",
                                              interactive=False, height=440, elem_id="mask-image")
                        mask_report = gr.Markdown(elem_classes="gen-report", elem_id="mask-report")
                        with gr.Accordion("Numbers (JSON)", open=False):
                            mask_numbers = gr.JSON(label="Mask")

        common = {
            "model": model, "attention": attention, "prompt": prompt, "negative_prompt": negative, "image": image,
            "seed": seed, "randomize_seed": randomize, "steps": steps, "guidance": guidance, "height": height,
            "width": width, "frames": frames,
        }

        def run_request(values: dict) -> RunRequest:
            used = int(values.get("seed") or 0)
            if values.get("randomize_seed") or used < 0:
                used = secrets.randbelow(2**31)
            method, spec = values["attention"], get_spec(values["model"])
            return RunRequest(
                model=spec.name, method=method, prompt=values.get("prompt") or "",
                overrides=overrides_from(method, values, model=spec.name, family=spec.family),
                negative_prompt=values.get("negative_prompt") or None,
                image=values.get("image"), seed=used, steps=_int_or_none(values.get("steps")),
                guidance=values.get("guidance"), height=_int_or_none(values.get("height")),
                width=_int_or_none(values.get("width")), frames=_int_or_none(values.get("frames")),
            )

        def loading_note(progress, model_name: str) -> None:
            if engine.models.loaded(model_name) is None:
                progress(0, desc=f"loading {model_name} (first use)")

        def generate(request: gr.Request, progress=gr.Progress(track_tqdm=True), **values):
            """One run with the chosen attention method: returns the video or image, the seed
            used and a report (time, density, what ran dense)."""
            session = _session(request)
            flag = stops.start(session)
            try:
                req = run_request(values)
                loading_note(progress, req.model)
                result = engine.run(req, should_stop=flag.is_set)
            except Exception as err:
                raise _gr_error(err) from None
            finally:
                stops.finish(session, flag)
            path = str(result.path)
            is_video = get_spec(req.model).is_video
            return (path if is_video else None, None if is_video else path, result.request.seed,
                    report.run_report(result))

        def compare(request: gr.Request, progress=gr.Progress(track_tqdm=True), baseline: str = STOCK, **values):
            """The baseline and the method from the same seed: both outputs, the speedup and
            PSNR/SSIM between them."""
            session = _session(request)
            flag = stops.start(session)
            try:
                req = run_request(values)
                loading_note(progress, req.model)
                result = engine.compare(req, baseline=baseline, should_stop=flag.is_set)
            except Exception as err:
                raise _gr_error(err) from None
            finally:
                stops.finish(session, flag)
            base, meth = str(result.baseline.path), str(result.method.path)
            video = get_spec(req.model).is_video
            return (base if video else None, meth if video else None, None if video else base,
                    None if video else meth, report.compare_report(result, engine.device),
                    report.compare_numbers(result, engine.device))

        def masks(layer: int = 0, head: int = 0, step: int = 0, **values):
            """The method's block mask at one layer, head and denoising step, and its density."""
            try:
                method = values["attention"]
                spec = get_spec(values["model"])
                name = spec.name
                kw = dict(height=_int_or_none(values.get("height")), width=_int_or_none(values.get("width")),
                          frames=_int_or_none(values.get("frames")), steps=_int_or_none(values.get("steps")),
                          layer=int(layer), head=int(head), step=int(step))
                overrides = overrides_from(method, values, model=name, family=spec.family)
                result = engine.mask(name, method, overrides, **kw)
            except Exception as err:
                raise _gr_error(err) from None
            steps_used = kw["steps"] or spec.steps
            return (str(result.path),
                    report.mask_report(result, name, method, kw["layer"], kw["head"], kw["step"], steps_used),
                    report.mask_numbers(result))

        def cancel(request: gr.Request):
            """Stop this session's running generation or comparison at its next denoising step."""
            if stops.request(_session(request)):
                gr.Info("Stopping at the next denoising step…")

        # Generate and Compare share one slot ("pipeline"): one model run at a time
        gen_event = gen_btn.click(
            _keywords(generate, [*common, *widgets]), inputs_kwargs={**common, **widgets},
            outputs=[gen_video, gen_image, used_seed, gen_report],
            api_name="generate", concurrency_id="pipeline", concurrency_limit=1,
        )
        cmp_event = cmp_btn.click(
            _keywords(compare, [*common, *widgets]), inputs_kwargs={**common, "baseline": baseline, **widgets},
            outputs=[cmp_base_video, cmp_meth_video, cmp_base_image, cmp_meth_image, cmp_report, cmp_numbers],
            api_name="compare", concurrency_id="pipeline", concurrency_limit=1,
        )
        mask_inputs = {k: common[k] for k in ("model", "attention", "height", "width", "frames", "steps")}
        mask_btn.click(
            _keywords(masks, [*mask_inputs, *widgets]),
            inputs_kwargs={**mask_inputs, "layer": layer, "head": head, "step": mask_step, **widgets},
            outputs=[mask_image, mask_report, mask_numbers], api_name="masks", concurrency_id="masks",
        )
        # queue=False: Cancel must get through while the one pipeline slot is busy
        gen_cancel.click(cancel, api_name="cancel", queue=False, cancels=[gen_event, cmp_event])
        cmp_cancel.click(cancel, queue=False, cancels=[gen_event, cmp_event], api_visibility="private")

        # -- keeping the form consistent with the model and method ---------------------
        preset_outputs = [widgets[f.key] for m in all_methods for f in fields[m]]

        def on_model(name: str, current_method: str):
            spec = get_spec(name)
            choices = _methods_for(spec.family)
            heads, layers = engine.model_shape(spec.name)
            video, image_task = spec.is_video, spec.task == "i2v"
            presets = {}
            for m in all_methods:
                presets.update(form_values(m, spec.name, spec.family))
            return [
                _model_info(spec.name),
                gr.update(visible=spec.takes_negative_prompt),
                gr.update(visible=image_task),
                gr.update(choices=choices, value=current_method if current_method in choices else choices[0]),
                spec.height, spec.width,
                gr.update(value=spec.frames, visible=video),
                spec.steps, spec.guidance,
                gr.update(visible=video), gr.update(visible=not video),
                gr.update(visible=video), gr.update(visible=video),
                gr.update(visible=not video), gr.update(visible=not video),
                gr.update(maximum=max(layers - 1, 1)), gr.update(maximum=max(heads - 1, 1)),
                gr.update(maximum=max(spec.steps - 1, 1), value=spec.steps - 1),
                # the buttons start disabled: a click before the form is filled would send
                # the empty fields, which the browser shows (and sends) as 0
                gr.update(interactive=True), gr.update(interactive=True), gr.update(interactive=True),
                *(presets[w.key] for m in all_methods for w in fields[m]),
            ]

        form_outputs = [model_info, negative, image, attention, height, width, frames, steps, guidance,
                        gen_video, gen_image, cmp_base_video, cmp_meth_video, cmp_base_image, cmp_meth_image,
                        layer, head, mask_step, gen_btn, cmp_btn, mask_btn, *preset_outputs]
        model.change(on_model, inputs=[model, attention], outputs=form_outputs, queue=False,
                     api_visibility="private", show_progress="hidden")
        app.load(on_model, inputs=[model, attention], outputs=form_outputs, queue=False,
                 api_visibility="private", show_progress="hidden")

        def on_method(name: str):
            cls = method_class(name)
            return [f"{cls.summary}" if cls.summary else "", *(gr.update(visible=m == name) for m in all_methods)]

        attention.change(on_method, inputs=[attention], outputs=[method_info, *groups.values()], queue=False,
                         api_visibility="private", show_progress="hidden")
        steps.change(lambda s: gr.update(maximum=max(int(s or 1) - 1, 1)), inputs=[steps], outputs=[mask_step],
                     queue=False, api_visibility="private", show_progress="hidden")

    app.queue(default_concurrency_limit=1, max_size=max_queue)
    app.gen_max_upload_bytes = int(max_upload_mb * 1e6)
    _guard_uploads(app, {image._id}, app.gen_max_upload_bytes)
    app.gen_engine = engine
    return app


def _widget(field):
    """The empty form field of one method parameter (see ``params``); the page fills it
    with the model's preset on load."""
    label = field.name.replace("_", " ")
    info = re.split(r"(?<=[.;])\s", field.doc.replace("``", "`"), maxsplit=1)[0]  # first sentence
    if field.kind == "pattern":
        return gr.Dropdown(list(field.choices), value=None, label=label,
                           info="a built-in pattern over token coordinates (gen.demos.patterns)")
    if field.kind == "choice":
        return gr.Dropdown(list(field.choices), value=None, label=label, info=info)
    if field.kind == "bool":
        return gr.Radio(list(field.choices), value=None, label=label, info=info)
    if field.kind in ("int", "float"):
        return gr.Number(None, label=label, info=info, precision=0 if field.kind == "int" else None,
                         placeholder="preset")
    return gr.Textbox(None, label=label, info=info, placeholder="preset; `none` for None, 1,2,3 for a tuple")


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, **kwargs):
    """Serve ``app`` (from ``create_app``) with the demo's safe defaults.

    Binds to ``host`` (127.0.0.1: this machine only), opens a public share link only when
    ``share=True``, and lets the server read files from the app's outputs folder only
    (``allowed_paths``; Gradio also serves its own upload cache). System and credential
    folders are ``blocked_paths`` on top. Uploads are capped at the app's
    ``max_upload_mb`` (``max_file_size``), and only ``gr.Error`` messages reach the page
    (``show_error=False``: Gradio's own errors can quote server paths). Extra ``kwargs`` go
    to ``gr.Blocks.launch`` (e.g. ``prevent_thread_lock=True`` in tests).
    """
    outputs = str(app.gen_engine.outputs_dir)
    kwargs.setdefault("max_file_size", getattr(app, "gen_max_upload_bytes", int(MAX_UPLOAD_MB * 1e6)))
    kwargs.setdefault("show_error", False)
    kwargs.setdefault("blocked_paths", sensitive_paths(keep=[outputs, _upload_folder(app)]))
    return app.launch(server_name=host, server_port=port, share=share, allowed_paths=[outputs],
                      theme=THEME, css=CSS, **kwargs)


def serve(host: str = "127.0.0.1", port: int = 7860, share: bool = False, outputs_dir: str | Path | None = None,
          device: str | None = None, max_upload_mb: float = MAX_UPLOAD_MB) -> None:
    """Build and serve the demo until interrupted (``gen demo``).

    Raises:
        ValueError: an outputs folder that is unsafe to serve (see ``create_app``).
    """
    app = create_app(outputs_dir=outputs_dir, device=device, max_upload_mb=max_upload_mb)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can run models here", host)
    logger.info("outputs go to %s", app.gen_engine.outputs_dir)
    launch(app, host=host, port=port, share=share)
