"""Run state shared by the sparse processors of one transformer, and the hook that fills it.

Nothing is passed by hand: a pre-forward hook on the transformer derives the
``TokenLayout`` of the call from the latent shape and patch size (plus text length and
order per model; FLUX from its ``img_ids``, see below), and the step index comes from,
in this order:

1. the ``step_index`` a pipeline gives ``transformer.cache_context(...)`` (Wan T2V);
2. otherwise the count of ``cache_context`` calls per name ("cond"/"uncond"), so CFG
   as two calls per step and batched CFG (one call) both count one per step; a
   timestep that goes up again starts a new run;
3. with no ``cache_context`` at all (a transformer called by hand): the timestep:
   equal → same step (CFG), lower → next step, higher → a new run from step 0.

FLUX image tokens (:func:`read_flux_img_ids`): the image grid comes from ``img_ids``
(rows ``ids[:, 1]``, columns ``ids[:, 2]``), one image per distinct first-axis value
``ids[:, 0]``. The image of the first image token (FLUX Kontext: the target being
denoised) is the method's grid; every other image (Kontext's reference, first-axis 1)
runs as extra dense tokens: the processor moves them next to the text and the layout
counts them as text, so they attend and are attended densely, whatever their size.
Ids that are not a grid (random floats, duplicate positions, a grid with holes) make
that call run stock dense attention, with one warning per run. The ids are read on the
host once per new ``img_ids`` tensor (cached by tensor identity and version: a
pipeline's ids cost one read per pipeline call, none per step or layer).

Under diffusers' context parallelism (Ulysses) the layout is the whole call's, never a
rank's shard: the hook runs before diffusers' split hook on the transformer (and refuses
to run after it), and the processors run the method on the whole sequence of their
heads (``parallel.py``).

Under ``torch.compile`` the hook runs inside the graph: it reads only shapes there (no
``.item()``, no host copy of the ids), so step inference falls back to (1) and (2),
which run outside, and a FLUX call uses what an eager call with ids of the same shape
found (else a square grid when the image tokens are a square number, else dense).
Compile the blocks (``compile_repeated_blocks``) or run one step eagerly first.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from ..layout import TokenLayout

__all__ = ["RunState", "RunStats", "FluxImageTokens", "GEOMETRY_HOOK", "attach_run_state", "detach_run_state",
           "has_geometry_hook", "layout_for", "read_flux_img_ids"]

logger = logging.getLogger("gen.attention")

GEOMETRY_HOOK = "gen_sparse_geometry"
_MISSING = object()
_IDS_CACHE_SIZE = 8


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


# -- FLUX img_ids ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FluxImageTokens:
    """What a FLUX call's ``img_ids`` say about its image tokens.

    Args:
        n_image: image tokens of the call (rows of ``img_ids``).
        grid: ``(height, width)`` of the method's image (the one of the first image
            token), or None when the ids cannot be read as a grid (the call runs dense).
        n_extra: image tokens of the other images (references), run as dense tokens.
        order: long ``(n_image,)`` on the CPU: the image tokens in the order the method
            sees them, extra tokens first (in sequence order), then the grid row-major;
            None when that is the sequence order already (plain FLUX).
        reason: why the ids were not read as a grid (None when they were).
    """

    n_image: int
    grid: tuple[int, int] | None
    n_extra: int = 0
    order: torch.Tensor | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_orders", {})

    def layout(self, text_len: int) -> TokenLayout | None:
        """The method's layout for a call with ``text_len`` text tokens: the grid, text
        first, the extra tokens counted as text. None when the call runs dense."""
        if self.grid is None:
            return None
        return TokenLayout(1, self.grid[0], self.grid[1], text_len=text_len + self.n_extra, text_first=True)

    def sequence_order(self, text_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(forward, inverse)``, long ``(text_len + n_image,)`` on ``device``: the joint
        sequence ``[text, image]`` reordered to ``[text, extra, grid]`` (``x[:, forward]``)
        and back (``y[:, inverse]``); None when no reordering is needed. Built once per
        ``(text_len, device)``."""
        if self.order is None:
            return None
        key = (text_len, str(device))
        found = self._orders.get(key)
        if found is None:
            # normal tensors even when first built under torch.inference_mode(), so that a
            # later call with autograd can save them for backward
            with torch.inference_mode(False):
                fwd = torch.cat([torch.arange(text_len), self.order + text_len])
                inv = torch.empty_like(fwd)
                inv[fwd] = torch.arange(fwd.numel())
                found = (fwd.to(device), inv.to(device))
            if not torch.compiler.is_compiling():
                self._orders[key] = found
        return found


def _unreadable(n: int, reason: str) -> FluxImageTokens:
    return FluxImageTokens(n, None, reason=reason)


def read_flux_img_ids(img_ids: torch.Tensor) -> FluxImageTokens:
    """Read FLUX ``img_ids`` (``(N, 3)``, or the deprecated ``(B, N, 3)``: sample 0) as
    image grids: one image per distinct ``ids[:, 0]``, rows ``ids[:, 1]``, columns
    ``ids[:, 2]`` (any offset, any token order inside an image). The image of the first
    token must be a full grid (each ``(row, col)`` of a ``height x width`` rectangle
    exactly once, integer positions); the other images' tokens become extra dense
    tokens. Otherwise the result has ``grid=None`` and says why. Copies the ids to the
    host (one device sync); call it once per ids tensor."""
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    n = int(ids.shape[0]) if ids.dim() >= 1 else 0
    if ids.dim() != 2 or ids.shape[1] < 3 or n == 0:
        return _unreadable(n, f"img_ids of shape {tuple(img_ids.shape)} are not (N, 3) positions")
    ids = ids.detach().to("cpu", torch.float64)[:, :3]
    if not bool(torch.isfinite(ids).all()):
        return _unreadable(n, "img_ids hold non-finite values")
    rounded = ids.round()
    if bool(((ids - rounded).abs() > 1e-3).any()):
        return _unreadable(n, "img_ids are not integer grid positions")
    pos = rounded.long()
    group = pos[:, 0]
    main = group == group[0]
    where = main.nonzero().squeeze(1)
    rows, cols = pos[where, 1], pos[where, 2]
    r0, c0 = int(rows.min()), int(cols.min())
    h, w = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    lin = (rows - r0) * w + (cols - c0)
    if h * w != where.numel() or torch.unique(lin).numel() != where.numel():
        return _unreadable(
            n, f"the image with img_ids[:, 0] == {int(group[0])} is not a full grid ({where.numel()} tokens "
               f"spread over {h}x{w} positions)")
    grid_tokens = where[torch.argsort(lin)]
    extra = (~main).nonzero().squeeze(1)
    order = torch.cat([extra, grid_tokens])
    identity = extra.numel() == 0 and torch.equal(order, torch.arange(n))
    return FluxImageTokens(n, (h, w), int(extra.numel()), None if identity else order)


# -- run state --------------------------------------------------------------------------------


class RunState:
    """Where one transformer's run is: the current call's layout and step.

    Per call (set by the pre-forward hook): ``layout`` (the method's ``TokenLayout``),
    ``order`` (``(forward, inverse)`` index tensors when the method sees the tokens in
    another order than the sequence's, FLUX references; else None) and ``fallback``
    (why this call runs stock dense attention; None when it does not).
    """

    def __init__(self, family: str) -> None:
        self.family = family
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
        # FLUX: ids read per tensor (id -> (weakref, version, result)) and per shape (for
        # calls under torch.compile, which cannot read values)
        self._flux_ids: dict[int, tuple] = {}
        self._flux_by_shape: dict[tuple, FluxImageTokens] = {}
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

    def flux_image_tokens(self, img_ids: torch.Tensor | None, n_image: int) -> FluxImageTokens:
        """:func:`read_flux_img_ids` of this call's ids, cached by tensor identity and
        version (eager) or by shape (inside ``torch.compile``, from an eager call)."""
        shape_key = (n_image, None if img_ids is None else tuple(img_ids.shape))
        if torch.compiler.is_compiling():
            found = self._flux_by_shape.get(shape_key)
            if found is not None:
                return found
            side = math.isqrt(n_image)
            if side * side == n_image:
                return FluxImageTokens(n_image, (side, side))
            return _unreadable(n_image, f"the FLUX image grid of {n_image} tokens cannot be read under "
                                        "torch.compile; run one step uncompiled first")
        if img_ids is None:
            side = math.isqrt(n_image)
            found = (FluxImageTokens(n_image, (side, side)) if side * side == n_image
                     else _unreadable(n_image, f"no img_ids and {n_image} image tokens are not a square grid"))
        else:
            entry = self._flux_ids.get(id(img_ids))
            version = _version(img_ids)
            if entry is not None and entry[0]() is img_ids and entry[1] == version:
                found = entry[2]
            else:
                found = read_flux_img_ids(img_ids)
                if found.n_image != n_image and found.grid is not None:
                    found = _unreadable(n_image, f"img_ids have {found.n_image} rows but the call has {n_image} "
                                                 "image tokens")
                if len(self._flux_ids) >= _IDS_CACHE_SIZE:
                    self._flux_ids = {k: e for k, e in self._flux_ids.items() if e[0]() is not None}
                    while len(self._flux_ids) >= _IDS_CACHE_SIZE:
                        self._flux_ids.pop(next(iter(self._flux_ids)))
                self._flux_ids[id(img_ids)] = (weakref.ref(img_ids), version, found)
        self._flux_by_shape[shape_key] = found
        return found


class _ContextSink(StateManager):
    """Receives diffusers' ``cache_context`` (it calls ``set_context`` on every
    ``StateManager`` of a stateful hook) and forwards it to the run state."""

    def __init__(self, run: RunState) -> None:
        super().__init__(BaseState)
        self.run = run

    def set_context(self, context) -> None:
        super().set_context(context)
        self.run.on_cache_context(context)


def _version(t: torch.Tensor) -> int:
    """In-place modification counter of ``t`` (-1 for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


# positional index of ``timestep`` and ``encoder_hidden_states`` in each family's ``forward``
_TIMESTEP_ARG = {"wan": 1, "hunyuan": 1, "flux": 3}
_TEXT_ARG = {"wan": 2, "hunyuan": 2, "flux": 1}
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


def _arg(args, kwargs, name: str, index: int):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _geometry(family: str, module: torch.nn.Module, args: tuple, kwargs: dict, run: RunState):
    """``(layout, order, fallback)`` of a transformer call (see :class:`RunState`)."""
    hidden = _arg(args, kwargs, "hidden_states", 0)
    cfg = module.config
    if family == "wan":
        _, _, f, h, w = hidden.shape
        pt, ph, pw = cfg.patch_size
        return TokenLayout(f // pt, h // ph, w // pw), None, None
    if family == "hunyuan":
        _, _, f, h, w = hidden.shape
        p, pt = cfg.patch_size, cfg.patch_size_t
        text = _arg(args, kwargs, "encoder_hidden_states", 2)
        return TokenLayout(f // pt, h // p, w // p, text_len=text.shape[1], text_first=False), None, None
    if family == "flux":
        text_len = _arg(args, kwargs, "encoder_hidden_states", 1).shape[1]
        tokens = run.flux_image_tokens(_arg(args, kwargs, "img_ids", 4), hidden.shape[1])
        if tokens.grid is None:
            return None, None, tokens.reason
        return tokens.layout(text_len), tokens.sequence_order(text_len, hidden.device), None
    raise ValueError(f"unknown model family {family!r}")


def layout_for(family: str, module: torch.nn.Module, args: tuple, kwargs: dict, run: RunState) -> TokenLayout | None:
    """The ``TokenLayout`` of a transformer call, from its inputs and config; None for a
    FLUX call whose ``img_ids`` cannot be read as a grid (it runs dense)."""
    return _geometry(family, module, args, kwargs, run)[0]


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
        run.layout, run.order, run.fallback = _geometry(run.family, module, args, kwargs, run)
        text = None if run.family == "wan" else _arg(args, kwargs, "encoder_hidden_states", _TEXT_ARG[run.family])
        run.text_len = 0 if text is None else int(text.shape[1])
        if not torch.compiler.is_compiling():
            if run.fallback is not None:
                run.warn_once(f"{run.fallback}; these calls run the stock dense attention.")
            if run.sync is not None:
                run.sync()
            run.on_forward(_arg(args, kwargs, "timestep", _TIMESTEP_ARG[run.family]))
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
