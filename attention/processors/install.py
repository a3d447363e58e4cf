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
from .runtime import RunState, attach_run_state, detach_run_state
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

    @property
    def num_layers(self) -> int:
        return len(self._originals)

    def remove(self) -> None:
        t = self.transformer
        for module, proc in self._originals:
            module.processor = proc  # the exact original object, no re-instantiation
        detach_run_state(t)
        registry = t.__dict__.get("_diffusers_hook")
        if registry is not None and not self._had_registry and not registry.hooks:
            del t._diffusers_hook
        if t.__dict__.get(_PATCH_ATTR) is self:
            del t.__dict__[_PATCH_ATTR]


def install(transformer: torch.nn.Module, method: SparseMethod) -> TransformerPatch:
    """Install ``method`` on ``transformer``'s self/joint attention; returns the patch."""
    family = family_of(transformer)
    if method.families and family not in method.families:
        raise ValueError(f"method {method.name!r} does not support {family} models; it supports: "
                         f"{', '.join(method.families)}.")
    if getattr(transformer, _PATCH_ATTR, None) is not None:
        raise ValueError("this transformer is already sparsified; call gen.restore(...) before sparsifying again.")
    had_registry = "_diffusers_hook" in transformer.__dict__
    run = attach_run_state(transformer, family)
    proc_cls = _PROCESSORS[family]
    originals = []
    mods = attention_modules(transformer, family)
    for index, (_, module) in enumerate(mods):
        originals.append((module, module.processor))
        new = proc_cls(method, run, index)
        # carry over diffusers' backend choice for the scheduled dense calls
        new._attention_backend = getattr(module.processor, "_attention_backend", None)
        new._parallel_config = getattr(module.processor, "_parallel_config", None)
        module.processor = new
    patch = TransformerPatch(transformer, family, method, run, originals, had_registry)
    setattr(transformer, _PATCH_ATTR, patch)
    logger.info("gen: %s attention on %d %s layers (%s)", method.name, len(mods), family, method.config)
    return patch
