"""Calibrated plan files: the one file format of the methods whose pattern comes from an
offline calibration over a real pipeline run (``sparse-vdit``, ``paro``).

A plan belongs to one model at one geometry and one number of denoising steps: its
per-head choices were measured on that model's attention at that token grid, step by
step. The file says so, and loading and running refuse anything else with a message
that says what to do.

File layout (safetensors: no pickle, loads without running code):

* the method's tensors (names and dtypes are the method's; e.g. sparse-vdit's
  ``modes``/``stripes``/``errors``, paro's ``orders``/``empty``/``masks``/...);
* header metadata, all strings:

  - ``format``: ``"gen.<method>"`` (``"gen.sparse-vdit"``, ``"gen.paro"``);
  - ``meta``: JSON of the method's meta dataclass. Every meta has the fields of
    :class:`CalibratedMeta` (model, family, token grid and text length, pixels and
    frames, steps, layers, heads, head dim, format version, ...), plus the method's own
    parameters;
  - ``sha256``: checksum of the tensor bytes (:func:`checksum`: each tensor's name,
    shape and raw bytes in the format's fixed order), so any corruption is caught, not
    only truncation.

Loading (:func:`load_plan_file`) refuses, with a ``ValueError`` naming the file and the
``gen calibrate <method>`` command that makes a new one: a missing file, a truncated or
corrupt one (safetensors cannot parse it), a safetensors file of another kind, a damaged
meta header, a newer format version, missing tensors, and a checksum mismatch (flipped
bytes, a tampered tensor). :func:`check_run` and :func:`check_call` refuse a plan used
for another model, geometry, head count or step count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .context import AttentionContext
from .layout import TokenLayout

__all__ = [
    "CalibratedMeta",
    "PlanFormat",
    "check_call",
    "check_run",
    "checksum",
    "describe_geometry",
    "load_plan_file",
    "meta_from_json",
    "meta_to_json",
    "save_plan_file",
    "steps_message",
]


@dataclass(frozen=True, kw_only=True)
class CalibratedMeta:
    """What every plan was made for (the fields the checks here read); each method's meta
    dataclass extends it with its own parameters.

    Attributes:
        model: registry name of the model (``"custom"`` for hand-made plans).
        family: ``"wan"``, ``"hunyuan"`` or ``"flux"``.
        grid: ``(frames, height, width)`` video tokens per attention call.
        text_len, text_first: text tokens in the same call and where they sit.
        steps, layers, heads: denoising steps, attention layers and heads per layer.
        head_dim: channels per head (None: not checked).
        height, width, frames: pixels and frames of the pipeline call (None: unknown).
        prompts, seed, guidance: of the calibration runs.
        gen_version: gen's version that wrote the plan.
        format_version: plan file format version.
    """

    model: str
    family: str
    grid: tuple[int, int, int]
    text_len: int
    text_first: bool
    steps: int
    layers: int
    heads: int
    head_dim: int | None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    prompts: tuple[str, ...] = ()
    seed: int | None = None
    guidance: float | None = None
    gen_version: str = ""
    format_version: int = 1

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(*self.grid, text_len=self.text_len, text_first=self.text_first)

    def geometry(self) -> str:
        """``"128x128 pixels, 17 frames (5x8x8 tokens)"`` for messages."""
        return describe_geometry(self)


@dataclass(frozen=True)
class PlanFormat:
    """What identifies one method's plan files.

    Args:
        method: the method's registry name (``"sparse-vdit"``); the header's ``format``
            is ``"gen.<method>"`` and the calibration command ``gen calibrate <method>``.
        kind: what to call a plan in messages (``"Sparse-vDiT plan"``).
        version: the newest format version this gen writes and reads.
        tensors: the tensor names every plan holds, in checksum order.
        per_step: why a plan is tied to its step count, for messages (``"the modes are
            chosen per step"``).
    """

    method: str
    kind: str
    version: int
    tensors: tuple[str, ...]
    per_step: str = "the plan is chosen per step"

    @property
    def tag(self) -> str:
        """The header's ``format`` value."""
        return f"gen.{self.method}"

    @property
    def hint(self) -> str:
        """The command that makes a plan."""
        return f"gen calibrate {self.method} --model MODEL --prompts FILE --out PLAN"


def checksum(tensors: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> str:
    """SHA-256 (hex) over ``names`` in order: each tensor's name, shape and raw bytes."""
    h = hashlib.sha256()
    for name in names:
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def meta_to_json(meta: Any) -> str:
    """A meta dataclass as sorted JSON (tuples become lists)."""
    return json.dumps(dataclasses.asdict(meta), sort_keys=True)


def meta_from_json(cls: type, text: str):
    """``cls(**json)`` for a meta dataclass: unknown keys are dropped (a newer gen may add
    fields), lists become tuples (``grid``, ``prompts``). ``ValueError``/``TypeError``/
    ``KeyError`` when the text is not such an object."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the meta header is not a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
    return cls(**data)


def save_plan_file(path: str | os.PathLike, fmt: PlanFormat, tensors: Mapping[str, torch.Tensor], meta: Any) -> Path:
    """Write ``tensors`` (exactly ``fmt.tensors``) and ``meta`` (a meta dataclass) to
    ``path`` with the checksum. Not atomic by itself: callers write through
    ``gen._io.atomic_path``."""
    from safetensors.torch import save_file

    missing = set(fmt.tensors) - set(tensors)
    if missing:
        raise ValueError(f"a {fmt.kind} needs the tensors {sorted(missing)}.")
    data = {name: tensors[name].detach().cpu().contiguous() for name in fmt.tensors}
    header = {"format": fmt.tag, "meta": meta_to_json(meta), "sha256": checksum(data, fmt.tensors)}
    save_file(data, str(path), metadata=header)
    return Path(path)


def load_plan_file(path: str | os.PathLike, fmt: PlanFormat,
                   parse_meta: Callable[[str], Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """Read and verify a plan file: ``(tensors, meta)``.

    Args:
        path: the file.
        fmt: the method's :class:`PlanFormat`.
        parse_meta: the header's JSON → the method's meta object (raise ``ValueError``,
            ``TypeError`` or ``KeyError`` on a damaged header).

    Raises:
        ValueError: missing, truncated or corrupt file; another kind of file; damaged
            meta; newer format; missing tensors; checksum mismatch. Each message names
            the file and how to make a new plan.
    """
    from safetensors import safe_open

    path = Path(path)
    redo = f"Make it again with `{fmt.hint}`."
    if not path.is_file():
        raise ValueError(f"no {fmt.kind} at {path}. Make one with `{fmt.hint}`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise ValueError(
            f"{path} cannot be read as a {fmt.kind}: the file is truncated or corrupt "
            f"({type(err).__name__}: {err}). {redo}"
        ) from None
    if header.get("format") != fmt.tag:
        raise ValueError(f"{path} is a safetensors file but not a {fmt.kind} (format "
                         f"{header.get('format')!r}, expected {fmt.tag!r}). {redo}")
    try:
        meta = parse_meta(header["meta"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: the plan's meta header is damaged ({err}). {redo}") from None
    if meta.format_version > fmt.version:
        raise ValueError(f"{path} is plan format {meta.format_version}; this gen reads up to "
                         f"{fmt.version}. Update gen, or calibrate again with this one.")
    missing = set(fmt.tensors) - set(tensors)
    if missing:
        raise ValueError(f"{path}: the plan lacks {sorted(missing)}; the file is corrupt. {redo}")
    if header.get("sha256") != checksum(tensors, fmt.tensors):
        raise ValueError(f"{path}: checksum mismatch, the plan's data is corrupt. {redo}")
    return tensors, meta


def describe_geometry(meta: CalibratedMeta) -> str:
    """``"128x128 pixels, 17 frames (5x8x8 tokens)"`` for messages."""
    t, h, w = meta.grid
    tokens = f"{t}x{h}x{w} tokens" + (f" + {meta.text_len} text" if meta.text_len else "")
    if meta.height is None:
        return tokens
    return f"{meta.width}x{meta.height} pixels, {meta.frames} frames ({tokens})"


def steps_message(meta: CalibratedMeta, fmt: PlanFormat, source: str, what: str) -> str:
    """Why a run with another step count is refused (``what``: ``"this run has 3"``)."""
    return (f"{source} was calibrated for {meta.steps} denoising steps and {what}: {fmt.per_step}. "
            f"Run with --steps {meta.steps}, or calibrate for this step count "
            f"(`gen calibrate {fmt.method} --model {meta.model} --steps N --prompts FILE --out PLAN`).")


def check_run(meta: CalibratedMeta, fmt: PlanFormat, source: str, *, model: str | None = None,
              height: int | None = None, width: int | None = None, frames: int | None = None,
              steps: int | None = None) -> None:
    """Refuse (``ValueError``) a plan made for another model, geometry or step count than
    the given ones (``None`` = not checked)."""
    if model is not None and model != meta.model:
        raise ValueError(
            f"{source} was calibrated for {meta.model}, not {model}: a plan holds one model's "
            f"per-head choices. Make one for {model}: `gen calibrate {fmt.method} --model {model} "
            "--prompts FILE --out PLAN`."
        )
    asked = (height, width, frames)
    have = (meta.height, meta.width, meta.frames)
    if any(a is not None and h is not None and a != h for a, h in zip(asked, have)):
        raise ValueError(
            f"{source} was calibrated at {describe_geometry(meta)}, but this run asks for "
            f"{width or meta.width}x{height or meta.height} pixels, {frames or meta.frames} frames. "
            f"Render at the plan's geometry, or calibrate for this one: `gen calibrate {fmt.method} "
            f"--model {meta.model} --height {height or meta.height} --width {width or meta.width} "
            f"--frames {frames or meta.frames} --prompts FILE --out PLAN`."
        )
    if steps is not None and steps != meta.steps:
        raise ValueError(steps_message(meta, fmt, source, f"this run has {steps}"))


def call_family(layout: TokenLayout) -> str:
    """The family whose adapter places text as the call's layout does (Wan: no text,
    HunyuanVideo: last, FLUX: first), for plan checks that hold a call but not its model."""
    from gen.attention.processors.adapter import adapter_for_layout

    return adapter_for_layout(layout).name


def check_call(meta: CalibratedMeta, fmt: PlanFormat, source: str, layout: TokenLayout, num_heads: int,
               head_dim: int | None, ctx: AttentionContext) -> tuple[int, int]:
    """Check one attention call against the plan; returns ``(step, layer)``.

    ``num_heads`` is the model's head count (under context parallelism the caller passes
    the whole model's, not the rank's). Refuses another family or head count, another
    token grid or text length, a layer outside the plan, a missing step index, and a run
    of another step count."""
    fam = call_family(layout)
    if (fam != meta.family or num_heads != meta.heads
            or (head_dim is not None and meta.head_dim is not None and head_dim != meta.head_dim)):
        dims = f" of {meta.head_dim}" if meta.head_dim is not None else ""
        raise ValueError(
            f"{source} was calibrated for {meta.model} ({meta.family}, {meta.layers} layers x "
            f"{meta.heads} heads{dims}); this model is {fam} with {num_heads} heads"
            + (f" of {head_dim}" if head_dim is not None else "")
            + f". Calibrate a plan for this model (`{fmt.hint}`)."
        )
    if layout.grid != tuple(meta.grid) or layout.text_len != meta.text_len:
        t, h, w = layout.grid
        raise ValueError(
            f"{source} was calibrated at {describe_geometry(meta)}, but this call has {t}x{h}x{w} tokens"
            + (f" + {layout.text_len} text" if layout.text_len else "")
            + ". Render at the plan's geometry, or calibrate for this one with --height, --width "
            f"and --frames (`{fmt.hint}`)."
        )
    layer, step = ctx.layer_index, ctx.step_index
    if layer is None or not 0 <= layer < meta.layers:
        raise ValueError(f"{source} covers {meta.layers} attention layers; this call is layer "
                         f"{layer}. Calibrate a plan for this model (`{fmt.hint}`).")
    if step is None:
        raise ValueError(f"{fmt.method} needs the denoising step of each call: run the model "
                         "inside its pipeline, or call gen.sparsify on the transformer and "
                         "pass timesteps in order.")
    if ctx.num_steps is not None and ctx.num_steps != meta.steps:
        raise ValueError(steps_message(meta, fmt, source, f"this run has {ctx.num_steps}"))
    if not 0 <= step < meta.steps:
        raise ValueError(steps_message(meta, fmt, source, f"this run reached step {step + 1}"))
    return step, layer
