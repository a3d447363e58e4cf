"""``gen capture``: record the q, k, v of chosen attention calls of a real pipeline run.

A :class:`CaptureMethod` is installed like any sparse method (``gen.sparsify``); its
``attention()`` receives exactly what a method receives: ``q, k, v`` as
``(B, H, S, D)`` after the projections, norms and RoPE, in the model's token order, with
the call's ``TokenLayout``. For the chosen (step, layer) pairs it keeps a CPU copy of
the chosen heads, then every call runs gen's ``dense`` attention, so the run itself is
a dense run. With classifier-free guidance (Wan) a step has two calls per layer; the
first of them (the pipeline's ``"cond"`` branch) is kept.

File (safetensors, no pickle): tensors ``q.s{step}.l{layer}``, ``k.…``, ``v.…``
(``(B, H_kept, S, D)`` in the run's dtype) and ``kv_valid.…`` (int ``(B,)``, valid keys
per sample, when the call has padded text); header metadata ``format`` =
``"gen.capture"`` and ``meta`` = JSON with the model, prompt, seed, geometry, number
of steps, the kept heads and per call its step, layer, branch and layout
(``frames, height, width, text_len, text_first``). :func:`load_capture` reads it back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gen.attention import AttentionContext, TokenLayout
from gen.attention.methods import SparseMethod
from gen.attention.methods.base import MethodConfig
from gen.attention.methods.dense import DenseAttention, DenseConfig

__all__ = ["CaptureConfig", "CaptureMethod", "CapturedCall", "Capture", "capture", "load_capture", "FORMAT"]

FORMAT = "gen.capture"


@dataclass(frozen=True)
class CaptureConfig(MethodConfig):
    """What to record.

    Args:
        steps: denoising steps (0-based) whose calls are kept.
        layers: attention layers (0-based, forward order as in ``dense_layers``) kept.
        heads: heads kept (``None`` = all).
    """

    steps: tuple[int, ...] = (0,)
    layers: tuple[int, ...] = (0,)
    heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "layers", "heads"):
            val = getattr(self, name)
            if val is None and name == "heads":
                continue
            val = tuple(val) if isinstance(val, (list, tuple)) else val
            if not isinstance(val, tuple) or not val or not all(isinstance(i, int) and i >= 0 for i in val):
                raise ValueError(f"{name} must be a non-empty list of ints >= 0, got {getattr(self, name)!r}.")
            object.__setattr__(self, name, tuple(sorted(set(val))))


@dataclass
class CapturedCall:
    """One recorded attention call: ``q, k, v`` ``(B, H_kept, S, D)`` on the CPU."""

    step: int
    layer: int
    branch: str | None
    layout: TokenLayout
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_valid: torch.Tensor | None = None

    @property
    def key(self) -> str:
        return f"s{self.step}.l{self.layer}"


class CaptureMethod(SparseMethod):
    """Records the chosen calls (see the module docstring), then runs ``dense``."""

    name = "capture"
    config_cls = CaptureConfig
    summary = "records q, k, v of chosen calls, runs dense (gen capture)"

    def __init__(self, config: CaptureConfig | None = None, *, model: str | None = None) -> None:
        super().__init__(config, model=model)
        self.inner = DenseAttention(DenseConfig(backend=self.config.backend), model=model)
        #: recorded calls by (step, layer), in the order they ran
        self.calls: dict[tuple[int, int], CapturedCall] = {}

    @property
    def needs_step(self) -> bool:
        return True  # the processors then pass the step index

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                  ctx: AttentionContext) -> torch.Tensor:
        cfg = self.config
        key = (ctx.step_index, ctx.layer_index)
        if ctx.step_index in cfg.steps and ctx.layer_index in cfg.layers and key not in self.calls:
            heads = list(cfg.heads) if cfg.heads is not None else list(range(q.shape[1]))
            if max(heads) >= q.shape[1]:
                raise ValueError(f"--heads {max(heads)} does not exist: the model has {q.shape[1]} heads.")
            idx = torch.tensor(heads, device=q.device)
            self.calls[key] = CapturedCall(
                ctx.step_index, ctx.layer_index, ctx.branch, layout,
                *(x.index_select(1, idx).detach().to("cpu", copy=True) for x in (q, k, v)),
                kv_valid=None if ctx.kv_valid is None else ctx.kv_valid.detach().to("cpu", copy=True),
            )
        return self.inner.attention(q, k, v, layout, ctx)


@dataclass
class Capture:
    """A capture file's content: its metadata and calls (ordered by step, then layer)."""

    meta: dict
    calls: list[CapturedCall] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the safetensors file atomically."""
        from safetensors.torch import save_file

        from gen._io import atomic_path

        if not self.calls:
            raise ValueError("nothing was captured: check --steps and --layers against the run "
                             f"({self.meta.get('num_steps')} steps).")
        tensors = {}
        for c in self.calls:
            for name, t in (("q", c.q), ("k", c.k), ("v", c.v), ("kv_valid", c.kv_valid)):
                if t is not None:
                    tensors[f"{name}.{c.key}"] = t.contiguous()
        meta = {**self.meta, "calls": [{"step": c.step, "layer": c.layer, "branch": c.branch,
                                         "layout": asdict(c.layout)} for c in self.calls]}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta)})
        return Path(path)


def load_capture(path: str | os.PathLike) -> Capture:
    """Read a ``gen capture`` file.

    Raises:
        ValueError: not a file ``gen capture`` wrote.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"capture file {path} does not exist; make one with `gen capture`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} is not a gen capture file (format {header.get('format')!r}).")
            meta = json.loads(header["meta"])
            calls = []
            for c in meta.pop("calls"):
                key = f"s{c['step']}.l{c['layer']}"
                kv = f"kv_valid.{key}"
                calls.append(CapturedCall(
                    c["step"], c["layer"], c["branch"], TokenLayout(**c["layout"]),
                    f.get_tensor(f"q.{key}"), f.get_tensor(f"k.{key}"), f.get_tensor(f"v.{key}"),
                    kv_valid=f.get_tensor(kv) if kv in f.keys() else None,
                ))
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read capture file {path}: {err}") from None
    return Capture(meta, calls)


def capture(
    model: str,
    prompt: str,
    *,
    steps: list[int],
    layers: list[int],
    heads: list[int] | None = None,
    out: str | os.PathLike,
    num_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    model_path: str | os.PathLike | None = None,
    pipe=None,
) -> Capture:
    """Run ``model``'s pipeline on ``prompt`` (dense attention) and save the q, k, v of
    the chosen ``steps`` x ``layers`` (``heads``: all when None) to ``out``.

    ``num_steps`` (default the model's) is the length of the run; ``steps`` must lie in
    it. The VAE does not run (latent output): only the transformer's inputs matter.
    Returns the :class:`Capture` written.
    """
    from gen.attention.processors import attention_modules
    from gen.session import STOCK, RenderJob, Session

    job = RenderJob(prompt, model=model, attention=STOCK, height=height, width=width, frames=frames,
                    steps=num_steps, guidance=guidance, seed=seed).resolved()
    spec = job.spec
    if spec.task == "i2v":
        raise ValueError(f"{spec.name} needs an input image; capture from a text-to-video or image model.")
    height, width, frames, num_steps, guidance = job.height, job.width, job.frames, job.steps, job.guidance
    bad = [s for s in steps if not 0 <= s < num_steps]
    if bad:
        raise ValueError(f"--steps {bad} outside the run's {num_steps} steps (0-based); raise --num-steps.")
    config = CaptureConfig(steps=tuple(steps), layers=tuple(layers), heads=None if heads is None else tuple(heads))
    session = Session(device=device, dtype=dtype, model_path=model_path, progress=False)
    if pipe is not None:
        session.adopt(spec.name, pipe)
    loaded, _ = session.pipeline(spec.name)
    n_layers = len(attention_modules(loaded.transformer))
    if max(layers) >= n_layers:
        raise ValueError(f"--layers {max(layers)} does not exist: {spec.name} has {n_layers} attention layers.")
    # the VAE does not run (latent output): only the transformer's inputs matter
    out_run = session.run(job, method=CaptureMethod(config, model=spec.name), decode=False)
    seconds = out_run.seconds
    recorded = out_run.method.calls
    meta = dict(model=spec.name, family=spec.family, prompt=prompt, seed=seed, height=height, width=width,
                frames=frames, num_steps=num_steps, guidance=guidance, steps=list(config.steps),
                layers=list(config.layers), heads=None if heads is None else list(config.heads),
                dtype=str(next(iter(recorded.values())).q.dtype).removeprefix("torch.") if recorded else None,
                seconds=round(seconds, 3), date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    result = Capture(meta, [recorded[k] for k in sorted(recorded)])
    result.save(out)
    return result
