"""Run state shared by the sparse processors of one transformer, and the hook that fills it.

Nothing is passed by hand: a pre-forward hook on the transformer derives the
``TokenLayout`` of the call from the latent shape and patch size (plus text length and
order per model; FLUX from its ``img_ids``), and the step index comes from,
in this order:

1. the ``step_index`` a pipeline gives ``transformer.cache_context(...)`` (Wan T2V);
2. otherwise the count of ``cache_context`` calls per name ("cond"/"uncond"), so CFG
   as two calls per step and batched CFG (one call) both count one per step; a
   timestep that goes up again starts a new run;
3. with no ``cache_context`` at all (a transformer called by hand): the timestep:
   equal → same step (CFG), lower → next step, higher → a new run from step 0.

How a call is read is the family adapter's (``FamilyAdapter.read_call``, one per
family in ``<family>.py``); the run state keeps what the reading needs between calls
(``call_state``: FLUX's ids cache, see ``flux.py``). Calls whose geometry cannot be read
(FLUX ids that are not a grid) run stock dense attention, with one warning per run.

Under diffusers' context parallelism (Ulysses) the layout is the whole call's, never a
rank's shard: the hook runs before diffusers' split hook on the transformer (and refuses
to run after it), and the processors run the method on the whole sequence of their
heads (``parallel.py``).

Under ``torch.compile`` the hook runs inside the graph: it reads only shapes there (no
``.item()``, no host copy of the ids), so step inference falls back to (1) and (2),
which run outside, and a FLUX call uses what an eager call with ids of the same shape
found.
Compile the blocks (``compile_repeated_blocks``) or run one step eagerly first.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from ..layout import TokenLayout
from .adapter import FamilyAdapter, get_adapter

__all__ = ["RunState", "RunStats", "GEOMETRY_HOOK", "attach_run_state", "detach_run_state", "has_geometry_hook",
           "layout_for"]

logger = logging.getLogger("gen.attention")

GEOMETRY_HOOK = "gen_sparse_geometry"
_MISSING = object()


@dataclass
class RunStats:
    """What ran: attention calls per layer, dense (schedule), sparse, or dense because the
    call's geometry could not be read (``fallback_calls``, reasons in ``fallback_reasons``),
    and the layouts seen."""

    dense_calls: Counter = field(default_factory=Counter)
    sparse_calls: Counter = field(default_factory=Counter)
    fallback_calls: Counter = field(default_factory=Counter)
    fallback_reasons: set = field(default_factory=set)
    layouts: set = field(default_factory=set)

    def record(self, layer_index: int, dense: bool, layout: TokenLayout | None, fallback: str | None = None) -> None:
        if fallback is not None:
            self.fallback_calls[layer_index] += 1
            self.fallback_reasons.add(fallback)
        else:
            (self.dense_calls if dense else self.sparse_calls)[layer_index] += 1
        if layout is not None:
            self.layouts.add(layout)

    def clear(self) -> None:
        self.dense_calls.clear()
        self.sparse_calls.clear()
        self.fallback_calls.clear()
        self.fallback_reasons.clear()
        self.layouts.clear()


# -- run state --------------------------------------------------------------------------------


class RunState:
    """Where one transformer's run is: the current call's layout and step.

    Per call (set by the pre-forward hook): ``layout`` (the method's ``TokenLayout``),
    ``order`` (``(forward, inverse)`` index tensors when the method sees the tokens in
    another order than the sequence's, FLUX references; else None) and ``fallback``
    (why this call runs stock dense attention; None when it does not).
    """

    def __init__(self, family: str | FamilyAdapter) -> None:
        #: the model family's adapter (how calls are read) and its name
        self.adapter = get_adapter(family)
        self.family = self.adapter.name
        self.layout: TokenLayout | None = None
        self.order: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fallback: str | None = None
        #: text tokens of the call's joint sequence as the model holds them (FLUX: without
        #: reference-image tokens), whole-sequence count; context parallelism maps the
        #: gathered order back with it
        self.text_len = 0
        self.step_index: int | None = None
        self.num_steps: int | None = None
        self.branch: str | None = None
        self.stats = RunStats()
        #: called by the hook before each eager forward (the patch re-checks its processors)
        self.sync = None
        self._counts: dict[str, int] = {}
        self._explicit_step = False
        self._in_context = False
        self._last_t: float | None = None
        #: what the adapter's call reading keeps between calls of the run (FLUX: ids read)
        self.call_state = None if self.adapter.new_call_state is None else self.adapter.new_call_state()
        self._warned: set[str] = set()

    def reset(self, stats: bool = True) -> None:
        """Forget the step (a new run starts at step 0) and, with ``stats``, the statistics."""
        self.layout = None
        self.order = None
        self.fallback = None
        self.text_len = 0
        self.step_index = self.num_steps = self.branch = None
        self._counts.clear()
        self._explicit_step = False
        self._in_context = False
        self._last_t = None
        if stats:
            self.stats.clear()

    def warn_once(self, message: str) -> None:
        """Log ``message`` at WARNING on ``gen.attention``, once per run state."""
        if message not in self._warned and not torch.compiler.is_compiling():
            self._warned.add(message)
            logger.warning("gen: %s", message)

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


_CP_SPLIT_PREFIX = "cp_input---"  # diffusers' context-parallel input hooks (hooks/context_parallel.py)


def _check_outside_context_parallel_split(module: torch.nn.Module) -> None:
    """Under context parallelism the layout must be read from the whole inputs: gen's hook
    has to run before diffusers' split hook on the transformer itself (FLUX's plan splits
    there). ``gen.sparsify`` after ``enable_parallelism`` registers it outside; gen's
    ``enable_parallelism`` on a sparsified transformer moves it outside."""
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None or getattr(module, "_parallel_config", None) is None:
        return
    order = registry._hook_order
    if GEOMETRY_HOOK in order and any(name.startswith(_CP_SPLIT_PREFIX) and i > order.index(GEOMETRY_HOOK)
                                      for i, name in enumerate(order)):
        raise ValueError(
            "gen's geometry hook runs after diffusers' context-parallel split, so it would read one rank's shard "
            "of the inputs. Enable context parallelism with gen.parallel.enable_ulysses(transformer, N), or call "
            "transformer.enable_parallelism(...) on the sparsified transformer (gen reorders its hook), or "
            "gen.sparsify after enable_parallelism."
        )


def layout_for(family: str | FamilyAdapter, module: torch.nn.Module, args: tuple, kwargs: dict,
               run: RunState) -> TokenLayout | None:
    """The ``TokenLayout`` of a transformer call, from its inputs and config; None for a
    call whose geometry cannot be read (a FLUX call whose ``img_ids`` are not a grid: it
    runs dense)."""
    return get_adapter(family).read_call(module, args, kwargs, run.call_state).layout


class _GeometryHook(ModelHook):
    _is_stateful = True

    def __init__(self, run: RunState) -> None:
        super().__init__()
        self.run = run
        self.sink = _ContextSink(run)  # found by diffusers through vars(hook)

    def pre_forward(self, module, *args, **kwargs):
        run = self.run
        if not torch.compiler.is_compiling():
            _check_outside_context_parallel_split(module)
        geometry = run.adapter.read_call(module, args, kwargs, run.call_state)
        run.layout, run.order, run.fallback = geometry.layout, geometry.order, geometry.fallback
        run.text_len = geometry.text_len
        if not torch.compiler.is_compiling():
            if run.fallback is not None:
                run.warn_once(f"{run.fallback}; these calls run the stock dense attention.")
            if run.sync is not None:
                run.sync()
            run.on_forward(run.adapter.timestep(args, kwargs))
        return args, kwargs

    def reset_state(self, module):
        # diffusers resets stateful hooks when a pipeline call ends: keep the statistics
        # of the run for the caller's summary
        self.run.reset(stats=False)
        return module


def attach_run_state(transformer: torch.nn.Module, family: str | FamilyAdapter, run: RunState | None = None) -> RunState:
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
