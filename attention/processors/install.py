"""Installing and removing the sparse processors on a diffusers transformer.

``install(transformer, method)`` swaps in gen's processor on every self/joint attention
module the method applies to, attaches the geometry/step hook, and returns a
:class:`TransformerPatch` whose ``remove()`` puts the exact original processor objects
back and detaches the hook. Cross-attention, the HunyuanVideo token refiner, VAEs and
text encoders are never touched.
"""

from __future__ import annotations

import logging

import torch

from ..methods.base import SparseMethod
from .flux import FluxSparseAttnProcessor
from .hunyuan import HunyuanVideoSparseAttnProcessor
from .runtime import RunState, attach_run_state, detach_run_state, has_geometry_hook
from .wan import WanSparseAttnProcessor

__all__ = ["SUPPORTED_TRANSFORMERS", "TransformerPatch", "family_of", "attention_modules", "install"]

logger = logging.getLogger("gen.attention")

SUPPORTED_TRANSFORMERS = {
    "WanTransformer3DModel": "wan",
    "HunyuanVideoTransformer3DModel": "hunyuan",
    "FluxTransformer2DModel": "flux",
}
_PROCESSORS = {"wan": WanSparseAttnProcessor, "hunyuan": HunyuanVideoSparseAttnProcessor, "flux": FluxSparseAttnProcessor}
_PATCH_ATTR = "_gen_sparse_patch"
_MISSING = object()


def note_undo_failure(exc: BaseException, undo_exc: BaseException) -> None:
    """Record that undoing a failed install failed too, without hiding the install error."""
    logger.error("gen: undoing a failed install also failed: %r", undo_exc)
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(f"gen: undoing the failed install also failed: {undo_exc!r}")


def family_of(transformer: torch.nn.Module) -> str:
    """``"wan"``, ``"hunyuan"`` or ``"flux"`` for a supported transformer class."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in SUPPORTED_TRANSFORMERS:
            return SUPPORTED_TRANSFORMERS[cls.__name__]
    raise ValueError(
        f"{type(transformer).__name__} is not supported; gen sparsifies {', '.join(SUPPORTED_TRANSFORMERS)}."
    )


def attention_modules(transformer: torch.nn.Module, family: str | None = None) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the attention modules gen replaces, in forward order (the
    list index is the layer index of ``dense_layers``)."""
    family = family or family_of(transformer)
    if family == "wan":
        return [(f"blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.blocks)]
    mods = [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(transformer.transformer_blocks)]
    mods += [(f"single_transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(transformer.single_transformer_blocks)]
    return mods


class TransformerPatch:
    """gen's processors on one transformer; ``remove()`` undoes the install exactly."""

    def __init__(self, transformer, family: str, method: SparseMethod, run: RunState, originals, had_registry: bool):
        self.transformer = transformer
        self.family = family
        self.method = method
        self.run = run
        self._originals = originals
        self._had_registry = had_registry
        self._hooked = True
        self._forward = transformer.__dict__.get("forward", _MISSING)
        self._removed = False

    @property
    def num_layers(self) -> int:
        return len(self._originals)

    def remove(self) -> None:
        """Put the original processor objects back, detach the hook, drop what the install
        added. Every step is attempted even if one fails (the first error is raised after);
        a second call does nothing."""
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

        for module, proc in reversed(self._originals):
            attempt(setattr, module, "processor", proc)  # the exact original object
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


def install(transformer: torch.nn.Module, method: SparseMethod) -> TransformerPatch:
    """Install ``method`` on ``transformer``'s self/joint attention; returns the patch.

    All or nothing: if anything fails, what was done is undone (original processors,
    no hook, no hook registry or attribute that was not there) and the error is raised.
    """
    family = family_of(transformer)
    if method.families and family not in method.families:
        raise ValueError(f"method {method.name!r} does not support {family} models; it supports: "
                         f"{', '.join(method.families)}.")
    if getattr(transformer, _PATCH_ATTR, None) is not None:
        raise ValueError("this transformer is already sparsified; call gen.restore(...) before sparsifying again.")
    if has_geometry_hook(transformer):
        raise ValueError("this transformer already has gen's geometry hook; call gen.restore(...) first.")
    # build everything first: nothing on the model changes until all of it exists
    run = RunState(family)
    proc_cls = _PROCESSORS[family]
    swaps = []
    for index, (_, module) in enumerate(attention_modules(transformer, family)):
        new = proc_cls(method, run, index)
        # carry over diffusers' backend choice for the scheduled dense calls
        new._attention_backend = getattr(module.processor, "_attention_backend", None)
        new._parallel_config = getattr(module.processor, "_parallel_config", None)
        swaps.append((module, new))
    patch = TransformerPatch(transformer, family, method, run, [],
                             had_registry="_diffusers_hook" in transformer.__dict__)
    patch._hooked = False
    try:
        attach_run_state(transformer, family, run)
        patch._hooked = True
        for module, new in swaps:
            patch._originals.append((module, module.processor))
            module.processor = new
        setattr(transformer, _PATCH_ATTR, patch)
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
