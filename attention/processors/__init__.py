"""diffusers attention processors that run gen's methods, one adapter per model family.

Usually installed by ``gen.sparsify``; ``install(transformer, method)`` does the same
for one transformer. Each family has an adapter (``<family>.py``, a ``FamilyAdapter``:
what it patches, how a call's layout is read, its processor, what context parallelism
needs) and its processors (``<family>_processor.py``). The processor classes are public
for per-module use: each needs the transformer's run state (``attach_run_state``) to know
the layout and step.

Names are resolved on first use: the adapters import no diffusers, so asking one for a
layout (``gen.pipelines.ModelSpec.layout``) does not load diffusers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

#: public name -> submodule that defines it
_WHERE = {
    "FamilyAdapter": "adapter",
    "FamilyProcessors": "adapter",
    "CallGeometry": "adapter",
    "adapter_of": "adapter",
    "all_adapters": "adapter",
    "get_adapter": "adapter",
    "register_adapter": "adapter",
    "FluxImageTokens": "flux",
    "read_flux_img_ids": "flux",
    "SparseAttnProcessorBase": "base",
    "FluxSparseAttnProcessor": "flux_processor",
    "FluxSparseIPAdapterAttnProcessor": "flux_processor",
    "HunyuanVideoSparseAttnProcessor": "hunyuan_processor",
    "WanSparseAttnProcessor": "wan_processor",
    "SUPPORTED_TRANSFORMERS": "install",
    "TransformerPatch": "install",
    "attention_modules": "install",
    "family_of": "install",
    "install": "install",
    "RunState": "runtime",
    "RunStats": "runtime",
    "attach_run_state": "runtime",
    "detach_run_state": "runtime",
    "layout_for": "runtime",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import (  # noqa: F401
        CallGeometry,
        FamilyAdapter,
        FamilyProcessors,
        adapter_of,
        all_adapters,
        get_adapter,
        register_adapter,
    )
    from .base import SparseAttnProcessorBase  # noqa: F401
    from .flux import FluxImageTokens, read_flux_img_ids  # noqa: F401
    from .flux_processor import FluxSparseAttnProcessor, FluxSparseIPAdapterAttnProcessor  # noqa: F401
    from .hunyuan_processor import HunyuanVideoSparseAttnProcessor  # noqa: F401
    from .install import (  # noqa: F401
        SUPPORTED_TRANSFORMERS,
        TransformerPatch,
        attention_modules,
        family_of,
        install,
    )
    from .runtime import RunState, RunStats, attach_run_state, detach_run_state, layout_for  # noqa: F401
    from .wan_processor import WanSparseAttnProcessor  # noqa: F401


class _Package(types.ModuleType):
    """This package, keeping the function ``install`` under its name: the import system
    sets each loaded submodule as an attribute of its package, which would put the
    ``install`` submodule where the function of the same name is expected."""

    def __setattr__(self, name: str, value) -> None:
        if name == "install" and isinstance(value, types.ModuleType):
            value = value.install
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
