"""Installing and removing the sparse processors on a diffusers transformer.

``install(transformer, method)`` swaps in gen's processor on every self/joint attention
module the family adapter names (``FamilyAdapter.attention_modules``), attaches the
geometry/step hook, and returns a :class:`TransformerPatch` whose ``remove()`` puts the
exact original processor objects back and detaches the hook. Cross-attention, the
HunyuanVideo token refiner, VAEs and text encoders are never touched.

While installed, a module's processor may be replaced from outside, e.g. by diffusers'
IP-Adapter loader (``_load_ip_adapter_weights`` sets ``FluxIPAdapterAttnProcessor`` on
the dual blocks and ``type(processor)()`` on the others) or ``unload_ip_adapter``. Before
each eager forward the geometry hook calls :meth:`TransformerPatch.sync`, which adopts
what it knows: an unbound gen processor is bound to the module's layer, a stock
processor of the model (the family adapter's ``FamilyProcessors.stock``, e.g.
``FluxAttnProcessor``, ``FluxIPAdapterAttnProcessor``) becomes the module's original and
gets gen's processor on top. Any other processor is left in place (warned once) and
runs as it is. ``remove()`` restores a module only while it holds gen's processor, so an
adapter loaded after ``sparsify`` survives ``restore``.

Context parallelism (:mod:`.parallel`): gen's processors take the model's parallel
config when it has one (``enable_parallelism`` before ``install``), and a sparsified
transformer's ``enable_parallelism`` is gen's wrapper (ring refused, HunyuanVideo's
plan supplied, the geometry hook kept outside the split hooks). ``remove()`` gives the
original processors the config diffusers would have set on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..methods.base import SparseMethod
from .adapter import FamilyAdapter, adapter_of, all_adapters, get_adapter
from .base import SparseAttnProcessorBase
from .parallel import (
    check_parallel_config,
    context_parallel_config,
    unwrap_enable_parallelism,
    wrap_enable_parallelism,
)
from .runtime import RunState, attach_run_state, detach_run_state, has_geometry_hook

__all__ = ["SUPPORTED_TRANSFORMERS", "TransformerPatch", "family_of", "attention_modules", "install"]

logger = logging.getLogger("gen.attention")

#: diffusers transformer class name -> family name, from the adapters
SUPPORTED_TRANSFORMERS = {cls: a.name for a in all_adapters() for cls in a.transformer_classes}
_PATCH_ATTR = "_gen_sparse_patch"
_MISSING = object()


def note_undo_failure(exc: BaseException, undo_exc: BaseException) -> None:
    """Record that undoing a failed install failed too, without hiding the install error."""
    logger.error("gen: undoing a failed install also failed: %r", undo_exc)
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(f"gen: undoing the failed install also failed: {undo_exc!r}")


def family_of(transformer: torch.nn.Module) -> str:
    """The family name (``"wan"``, ``"hunyuan"``, ``"flux"``) of a supported transformer
    (``ValueError`` naming the supported classes otherwise)."""
    return adapter_of(transformer).name


def attention_modules(transformer: torch.nn.Module,
                      family: str | FamilyAdapter | None = None) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the attention modules gen replaces, in forward order (the
    list index is the layer index of ``dense_layers``)."""
    adapter = adapter_of(transformer) if family is None else get_adapter(family)
    return adapter.attention_modules(transformer)


def _context_parallel(transformer: torch.nn.Module):
    """The transformer's ``ParallelConfig`` when it has context parallelism, else None."""
    config = getattr(transformer, "_parallel_config", None)
    return config if context_parallel_config(config) is not None else None


def _new_processor(adapter: FamilyAdapter, current, method: SparseMethod, run: RunState, index: int,
                   parallel_config=None) -> SparseAttnProcessorBase:
    """gen's processor for a module that holds ``current`` (a stock processor with weights
    of its own, FLUX's IP-Adapter, gets one that shares them); diffusers' backend choice
    carries over, and so does the model's context parallelism (``parallel_config``, else
    the current processor's)."""
    new = adapter.loaded().new(current, method, run, index)
    # carry over diffusers' backend choice for the scheduled dense calls
    new._attention_backend = getattr(current, "_attention_backend", None)
    new._parallel_config = parallel_config or getattr(current, "_parallel_config", None)
    return new


def _set_processor(module, processor) -> None:
    """``module.processor = processor``, also from an ``nn.Module`` processor (an
    IP-Adapter's) to a plain one, which ``nn.Module.__setattr__`` refuses."""
    if isinstance(module, torch.nn.Module) and "processor" in module._modules and \
            not isinstance(processor, torch.nn.Module):
        del module._modules["processor"]
    module.processor = processor


@dataclass
class _Slot:
    """One attention module gen manages: what it held before and what gen put there."""

    module: torch.nn.Module
    original: object
    installed: SparseAttnProcessorBase
    layer_index: int


class TransformerPatch:
    """gen's processors on one transformer; ``remove()`` undoes the install exactly."""

    def __init__(self, transformer, family: str | FamilyAdapter, method: SparseMethod, run: RunState,
                 slots: list[_Slot], had_registry: bool):
        self.transformer = transformer
        #: the model family's adapter and its name
        self.adapter = get_adapter(family)
        self.family = self.adapter.name
        self.method = method
        self.run = run
        self._slots = slots
        self._had_registry = had_registry
        self._hooked = True
        self._forward = transformer.__dict__.get("forward", _MISSING)
        self._removed = False
        self._warned: set[tuple[int, type]] = set()

    @property
    def num_layers(self) -> int:
        return len(self._slots)

    def _owns(self, processor) -> bool:
        """gen's processor of this install (or an unbound one, which only gen binds)."""
        return isinstance(processor, SparseAttnProcessorBase) and processor.run in (None, self.run)

    def sync(self) -> None:
        """Adopt processors set on the managed modules since the install (see the module
        docstring). Called by the geometry hook before each eager forward; cheap when
        nothing changed (one identity check per module)."""
        if self._removed:
            return
        for i, slot in enumerate(self._slots):
            current = getattr(slot.module, "processor", None)
            if current is slot.installed:
                continue
            if self._owns(current):
                if not current.bound:
                    current.bind(self.method, self.run, slot.layer_index)
                    current._attention_backend = slot.installed._attention_backend
                    current._parallel_config = slot.installed._parallel_config
                slot.installed = current
            elif type(current) in self.adapter.loaded().stock:
                new = _new_processor(self.adapter, current, self.method, self.run, slot.layer_index,
                                     _context_parallel(self.transformer))
                _set_processor(slot.module, new)
                slot.original, slot.installed = current, new
                logger.info("gen: %s now runs %s over the new %s", _name(self.transformer, slot.module),
                            self.method.name, type(current).__name__)
            elif (i, type(current)) not in self._warned:
                self._warned.add((i, type(current)))
                logger.warning("gen: attention layer %d got a %s while sparsified; gen leaves it in place, so that "
                               "layer runs it instead of %s until gen.restore().", slot.layer_index,
                               type(current).__name__, self.method.name)

    def remove(self) -> None:
        """Put the original processor objects back (on modules that still hold gen's
        processor), detach the hook, drop what the install added. Every step is
        attempted even if one fails (the first error is raised after); a second call
        does nothing."""
        if self._removed:
            return
        self._removed = True
        t = self.transformer
        errors: list[BaseException] = []

        def attempt(fn, *args) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - keep undoing, raise the first below
                errors.append(exc)

        if self.run.sync == self.sync:
            self.run.sync = None
        attempt(unwrap_enable_parallelism, t)
        parallel = _context_parallel(t)
        for slot in reversed(self._slots):
            current = getattr(slot.module, "processor", None)
            if current is slot.installed or self._owns(current):
                attempt(_set_processor, slot.module, slot.original)  # the exact original object
                if parallel is not None and hasattr(slot.original, "_parallel_config"):
                    # parallelism enabled while sparsified: what diffusers would have set on it
                    slot.original._parallel_config = parallel
        if self._hooked:
            attempt(detach_run_state, t)
            if self._forward is not _MISSING and "forward" not in t.__dict__:
                t.__dict__["forward"] = self._forward
        registry = t.__dict__.get("_diffusers_hook")
        if registry is not None and not self._had_registry and not registry.hooks:
            del t.__dict__["_diffusers_hook"]
        if t.__dict__.get(_PATCH_ATTR) is self:
            del t.__dict__[_PATCH_ATTR]
        if errors:
            raise errors[0]


def _name(transformer: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in transformer.named_modules():
        if m is module:
            return name
    return type(module).__name__


def install(transformer: torch.nn.Module, method: SparseMethod) -> TransformerPatch:
    """Install ``method`` on ``transformer``'s self/joint attention; returns the patch.

    All or nothing: if anything fails, what was done is undone (original processors,
    no hook, no hook registry or attribute that was not there) and the error is raised.
    A FLUX module holding an IP-Adapter processor gets
    :class:`~gen.attention.processors.flux_processor.FluxSparseIPAdapterAttnProcessor`
    (the adapter's ``FamilyProcessors.wrappers``).
    """
    adapter = adapter_of(transformer)
    family = adapter.name
    if method.families and family not in method.families:
        raise ValueError(f"method {method.name!r} does not support {family} models; it supports: "
                         f"{', '.join(method.families)}.")
    if getattr(transformer, _PATCH_ATTR, None) is not None:
        raise ValueError("this transformer is already sparsified; call gen.restore(...) before sparsifying again.")
    if has_geometry_hook(transformer):
        raise ValueError("this transformer already has gen's geometry hook; call gen.restore(...) first.")
    parallel = _context_parallel(transformer)
    check_parallel_config(parallel)  # ring attention: refused, before anything changes
    # build everything first: nothing on the model changes until all of it exists
    run = RunState(adapter)
    swaps = []
    for index, (_, module) in enumerate(attention_modules(transformer, adapter)):
        swaps.append((module, _new_processor(adapter, module.processor, method, run, index, parallel), index))
    patch = TransformerPatch(transformer, adapter, method, run, [],
                             had_registry="_diffusers_hook" in transformer.__dict__)
    patch._hooked = False
    try:
        attach_run_state(transformer, adapter, run)
        patch._hooked = True
        for module, new, index in swaps:
            patch._slots.append(_Slot(module, module.processor, new, index))
            _set_processor(module, new)
        setattr(transformer, _PATCH_ATTR, patch)
        wrap_enable_parallelism(transformer)
        run.sync = patch.sync
    except BaseException as exc:
        # there was no geometry hook before (checked above): one there now is this install's
        patch._hooked = patch._hooked or has_geometry_hook(transformer)
        try:
            patch.remove()
        except Exception as undo_exc:  # noqa: BLE001 - the install error is the one to raise
            note_undo_failure(exc, undo_exc)
        raise
    logger.info("gen: %s attention on %d %s layers (%s)", method.name, len(swaps), family, method.config)
    return patch
