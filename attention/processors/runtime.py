"""Run state shared by the sparse processors of one transformer, and the hook that fills it.

Nothing is passed by hand: a pre-forward hook on the transformer derives the
``TokenLayout`` of the call from the latent shape and patch size (plus text length and
order per model), and the step index comes from, in this order:

1. the ``step_index`` a pipeline gives ``transformer.cache_context(...)`` (Wan T2V);
2. otherwise the count of ``cache_context`` calls per name ("cond"/"uncond"), so CFG
   as two calls per step and batched CFG (one call) both count one per step; a
   timestep that goes up again starts a new run;
3. with no ``cache_context`` at all (a transformer called by hand): the timestep:
   equal → same step (CFG), lower → next step, higher → a new run from step 0.

Under ``torch.compile`` the hook runs inside the graph: it reads only shapes there (no
``.item()``), so step inference falls back to (1) and (2), which run outside.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from ..layout import TokenLayout

__all__ = ["RunState", "RunStats", "GEOMETRY_HOOK", "attach_run_state", "detach_run_state", "has_geometry_hook",
           "layout_for"]

logger = logging.getLogger("gen.attention")

GEOMETRY_HOOK = "gen_sparse_geometry"
_MISSING = object()


@dataclass
class RunStats:
    """What ran: attention calls per layer, dense (schedule) or sparse, and the layouts seen."""

    dense_calls: Counter = field(default_factory=Counter)
    sparse_calls: Counter = field(default_factory=Counter)
    layouts: set = field(default_factory=set)

    def record(self, layer_index: int, dense: bool, layout: TokenLayout | None) -> None:
        (self.dense_calls if dense else self.sparse_calls)[layer_index] += 1
        if layout is not None:
            self.layouts.add(layout)

    def clear(self) -> None:
        self.dense_calls.clear()
        self.sparse_calls.clear()
        self.layouts.clear()


class RunState:
    """Where one transformer's run is: the current call's layout and step."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.layout: TokenLayout | None = None
        self.step_index: int | None = None
        self.num_steps: int | None = None
        self.branch: str | None = None
        self.stats = RunStats()
        self._counts: dict[str, int] = {}
        self._explicit_step = False
        self._in_context = False
        self._last_t: float | None = None
        self._flux_layouts: dict[int, tuple[int, int]] = {}

    def reset(self, stats: bool = True) -> None:
        """Forget the step (a new run starts at step 0) and, with ``stats``, the statistics."""
        self.layout = None
        self.step_index = self.num_steps = self.branch = None
        self._counts.clear()
        self._explicit_step = False
        self._in_context = False
        self._last_t = None
        if stats:
            self.stats.clear()

    # called by diffusers' cache_context, outside any compiled region
    def on_cache_context(self, context) -> None:
        if context is None:
            self._in_context = False
            return
        self._in_context = True
        self.branch = context.name
        if context.step_index is not None:
            self.step_index = int(context.step_index)
            self.num_steps = context.num_inference_steps
            self._explicit_step = True
        else:
            n = self._counts.get(context.name, 0) + 1
            self._counts[context.name] = n
            self.step_index = n - 1
            self._explicit_step = False

    # called by the pre-forward hook in eager mode
    def on_forward(self, timestep) -> None:
        if timestep is None:
            return
        t = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        last, self._last_t = self._last_t, t
        eps = 1e-6 * max(1.0, abs(t))
        if self._in_context:
            if not self._explicit_step and last is not None and t > last + eps:
                # the timestep went up: a new pipeline run; this call is its first
                self._counts = {self.branch: 1}
                self.step_index = 0
            return
        if last is None or t > last + eps:
            self.step_index = 0
        elif t < last - eps:
            self.step_index = (self.step_index or 0) + 1
        self.branch = None


class _ContextSink(StateManager):
    """Receives diffusers' ``cache_context`` (it calls ``set_context`` on every
    ``StateManager`` of a stateful hook) and forwards it to the run state."""

    def __init__(self, run: RunState) -> None:
        super().__init__(BaseState)
        self.run = run

    def set_context(self, context) -> None:
        super().set_context(context)
        self.run.on_cache_context(context)


def _arg(args, kwargs, name: str, index: int):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def layout_for(family: str, module: torch.nn.Module, args: tuple, kwargs: dict, run: RunState) -> TokenLayout:
    """The ``TokenLayout`` of a transformer call, from its inputs and config."""
    hidden = _arg(args, kwargs, "hidden_states", 0)
    cfg = module.config
    if family == "wan":
        _, _, f, h, w = hidden.shape
        pt, ph, pw = cfg.patch_size
        return TokenLayout(f // pt, h // ph, w // pw)
    if family == "hunyuan":
        _, _, f, h, w = hidden.shape
        p, pt = cfg.patch_size, cfg.patch_size_t
        text = _arg(args, kwargs, "encoder_hidden_states", 2)
        return TokenLayout(f // pt, h // p, w // p, text_len=text.shape[1], text_first=False)
    if family == "flux":
        seq = hidden.shape[1]
        text = _arg(args, kwargs, "encoder_hidden_states", 1)
        hw = run._flux_layouts.get(seq)
        if hw is None:
            img_ids = kwargs.get("img_ids")
            if img_ids is not None and not torch.compiler.is_compiling():
                ids = img_ids.reshape(-1, img_ids.shape[-1])
                hw = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
            elif math.isqrt(seq) ** 2 == seq:
                hw = (math.isqrt(seq), math.isqrt(seq))
            else:
                raise ValueError(
                    f"cannot infer the FLUX image grid of {seq} tokens under torch.compile; run one "
                    "step uncompiled first (it records the grid) or use a square image."
                )
            if hw[0] * hw[1] != seq:
                raise ValueError(f"FLUX img_ids describe a {hw[0]}x{hw[1]} grid but there are {seq} image tokens.")
            run._flux_layouts[seq] = hw
        return TokenLayout(1, hw[0], hw[1], text_len=text.shape[1], text_first=True)
    raise ValueError(f"unknown model family {family!r}")


class _GeometryHook(ModelHook):
    _is_stateful = True

    def __init__(self, run: RunState) -> None:
        super().__init__()
        self.run = run
        self.sink = _ContextSink(run)  # found by diffusers through vars(hook)

    def pre_forward(self, module, *args, **kwargs):
        run = self.run
        run.layout = layout_for(run.family, module, args, kwargs, run)
        if not torch.compiler.is_compiling():
            run.on_forward(_arg(args, kwargs, "timestep", 1))
        return args, kwargs

    def reset_state(self, module):
        # diffusers resets stateful hooks when a pipeline call ends: keep the statistics
        # of the run for the caller's summary
        self.run.reset(stats=False)
        return module


def attach_run_state(transformer: torch.nn.Module, family: str, run: RunState | None = None) -> RunState:
    """Register the geometry/step hook on ``transformer`` and return its run state
    (``run``, or a new one). All or nothing: on error the transformer is left as it was
    (no hook, and no hook registry if it had none)."""
    run = RunState(family) if run is None else run
    existing = transformer.__dict__.get("_diffusers_hook")
    if existing is not None and existing.get_hook(GEOMETRY_HOOK) is not None:
        raise ValueError("this transformer already has gen's geometry hook; call gen.restore(...) first.")
    saved_forward = transformer.__dict__.get("forward", _MISSING)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    try:
        registry.register_hook(_GeometryHook(run), GEOMETRY_HOOK)
    except BaseException:
        if GEOMETRY_HOOK in registry.hooks:
            registry.remove_hook(GEOMETRY_HOOK, recurse=False)
        if saved_forward is _MISSING:
            transformer.__dict__.pop("forward", None)
        else:
            transformer.__dict__["forward"] = saved_forward
        if existing is None and not registry.hooks and transformer.__dict__.get("_diffusers_hook") is registry:
            del transformer.__dict__["_diffusers_hook"]
        raise
    return run


def detach_run_state(transformer: torch.nn.Module) -> None:
    """Remove the hook; leaves ``transformer.forward`` as the class's own method again."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(GEOMETRY_HOOK) is not None:
        registry.remove_hook(GEOMETRY_HOOK, recurse=False)
    fwd = transformer.__dict__.get("forward")
    if fwd is not None and getattr(fwd, "__func__", None) is type(transformer).forward:
        del transformer.__dict__["forward"]


def has_geometry_hook(transformer: torch.nn.Module) -> bool:
    """Whether gen's geometry/step hook is registered on ``transformer``."""
    registry = transformer.__dict__.get("_diffusers_hook")
    return registry is not None and registry.get_hook(GEOMETRY_HOOK) is not None
