"""One adapter per model family: everything gen knows about a family's transformer.

A :class:`FamilyAdapter` (one instance per family, ``ADAPTER`` in
``attention/processors/<family>.py``) states

- which diffusers transformer classes it patches (``transformer_classes``) and which
  attention modules, in forward order (``attention_modules``; the others stay stock:
  ``stays_stock`` says which);
- how a call's token layout is read (``read_call``: latent shape and patch size, FLUX
  from ``img_ids``; where the joint text sits, ``text``), where the timestep argument is,
  and the per-run state the reading keeps (``new_call_state``: FLUX's ids cache);
- the processor (``processors()``: gen's class, the stock classes it replaces, wrappers
  for stock classes that carry weights of their own such as FLUX's IP-Adapter);
- what context parallelism needs: gen's ``_cp_plan`` where diffusers has none
  (``cp_plan``) and the joint order after the Ulysses all-to-all (``text``: text and
  video are split per stream, so each rank's ``[text, video]`` or ``[video, text]``
  shard follows the previous one);
- how a pipeline calls the transformer, for runs without a pipeline (``example_inputs``,
  ``timestep_divisor``: random-weight benchmarks).

The adapter files import no diffusers (the processors live in ``<family>_processor.py``
and load on the first install), so model specs ask an adapter for layouts (``ModelSpec.layout``)
without loading diffusers: ``gen masks`` and ``gen methods`` stay light.

Adding a family: see "Adding a model family" in ``attention/README.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..layout import TokenLayout

__all__ = [
    "FAMILY_MODULES",
    "CallGeometry",
    "FamilyAdapter",
    "FamilyProcessors",
    "adapter_for_layout",
    "adapter_of",
    "all_adapters",
    "call_arg",
    "dual_and_single_blocks",
    "get_adapter",
    "register_adapter",
]

#: family name -> module of ``gen.attention.processors`` that defines its ``ADAPTER``
FAMILY_MODULES: dict[str, str] = {"wan": "wan", "hunyuan": "hunyuan", "flux": "flux"}

TextPlacement = Literal["none", "first", "last"]


def call_arg(args: tuple, kwargs: dict, name: str, index: int | None):
    """Argument ``name`` of a ``forward`` call, by keyword or at positional ``index``
    (None: keyword only); None when absent."""
    if name in kwargs:
        return kwargs[name]
    if index is None:
        return None
    return args[index] if len(args) > index else None


def dual_and_single_blocks(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, attn)`` of the dual-stream blocks, then the single-stream blocks
    (HunyuanVideo, FLUX), in forward order."""
    mods = [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(transformer.transformer_blocks)]
    mods += [(f"single_transformer_blocks.{i}.attn", b.attn)
             for i, b in enumerate(transformer.single_transformer_blocks)]
    return mods


@dataclass(frozen=True)
class CallGeometry:
    """What the geometry hook reads from one transformer call.

    Args:
        layout: the method's ``TokenLayout`` (whole call, also under context
            parallelism); None when the call runs stock dense attention (``fallback``).
        order: ``(forward, inverse)`` long index tensors when the method sees the joint
            sequence in another order than the model's (FLUX reference images); else None.
        fallback: why this call runs the stock dense attention (None when it does not).
        text_len: text tokens of the joint sequence as the model holds them (whole
            sequence; 0 without joint text); context parallelism maps the gathered order
            back with it.
    """

    layout: TokenLayout | None
    order: tuple[torch.Tensor, torch.Tensor] | None = None
    fallback: str | None = None
    text_len: int = 0


@dataclass(frozen=True)
class FamilyProcessors:
    """The diffusers-facing part of an adapter, imported on first use.

    Args:
        sparse: gen's processor class, built as ``sparse(method, run, layer_index)``.
        stock: the model's stock processor classes gen replaces (also when they appear
            on a module later, e.g. set by an IP-Adapter loader).
        wrappers: ``(stock class, build)`` pairs for stock processors whose weights gen's
            processor must share: ``build(current, method, run, layer_index)``.
    """

    sparse: type
    stock: tuple[type, ...]
    wrappers: tuple[tuple[type, Callable[..., Any]], ...] = ()

    def new(self, current, method, run, layer_index: int):
        """gen's processor for a module that holds ``current``."""
        for cls, build in self.wrappers:
            if isinstance(current, cls):
                return build(current, method, run, layer_index)
        return self.sparse(method, run, layer_index)


@dataclass(frozen=True)
class FamilyAdapter:
    """One model family (see the module docstring).

    Args:
        name: family name as specs and method presets use it (``"wan"``).
        label: human name in messages (``"Wan"``).
        transformer_classes: diffusers class names it patches (matched along the MRO, so
            subclasses count).
        text: where the joint text sits in the patched attention: ``"none"`` (Wan
            self-attention), ``"first"`` (FLUX), ``"last"`` (HunyuanVideo).
        attention_modules: ``transformer -> [(name, module)]``, the modules gen patches in
            forward order (list index = layer index of ``dense_layers``).
        stays_stock: one line on the attention modules that keep their stock processor.
        read_call: ``(transformer, args, kwargs, call_state) -> CallGeometry`` of a
            ``forward`` call; reads shapes only inside ``torch.compile``.
        timestep_arg: positional index of ``timestep`` in the transformer's ``forward``.
        processors: zero-argument loader of the :class:`FamilyProcessors` (imports diffusers).
        new_call_state: per-run state of ``read_call`` (None: it keeps none).
        cp_plan: ``transformer -> _cp_plan`` that gen supplies where diffusers' model has
            none (HunyuanVideo in diffusers 0.42.1); None: the model's own.
        example_inputs: ``(config, latent_grid, token_grid, text_len, guidance, draw,
            device, dtype) -> (latent argument name, latents, other kwargs)``: one call's
            inputs shaped as the pipeline makes them (``latent_grid`` ``(frames, rows,
            cols)`` after the VAE, ``token_grid`` after patchify; ``draw(*shape)`` random
            values on ``device`` in ``dtype``, drawn in a fixed order).
        timestep_divisor: the pipeline divides its scheduler timestep (1000 → 0) by this
            before the transformer sees it (FLUX: 1000).
    """

    name: str
    label: str
    transformer_classes: tuple[str, ...]
    text: TextPlacement
    attention_modules: Callable[[torch.nn.Module], list[tuple[str, torch.nn.Module]]]
    stays_stock: str
    read_call: Callable[[torch.nn.Module, tuple, dict, Any], CallGeometry]
    timestep_arg: int
    processors: Callable[[], FamilyProcessors]
    new_call_state: Callable[[], Any] | None = None
    cp_plan: Callable[[torch.nn.Module], dict] | None = None
    example_inputs: Callable[..., tuple[str, torch.Tensor, dict]] | None = None
    timestep_divisor: float = 1.0
    # the loaded processors (mutable on a frozen adapter: filled once, on first install)
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __repr__(self) -> str:
        return f"FamilyAdapter({self.name!r}: {', '.join(self.transformer_classes)}, text {self.text})"

    def __post_init__(self) -> None:
        if self.text not in ("none", "first", "last"):
            raise ValueError(f"text must be 'none', 'first' or 'last', got {self.text!r}.")

    @property
    def joint_text(self) -> bool:
        """Whether the patched attention runs over video and text tokens together."""
        return self.text != "none"

    def layout(self, grid: tuple[int, int, int], text_len: int = 0) -> TokenLayout:
        """The ``TokenLayout`` of a call over ``grid`` ``(frames, rows, cols)`` tokens after
        patchify and ``text_len`` text tokens (ignored without joint text)."""
        if not self.joint_text:
            return TokenLayout(*grid)
        return TokenLayout(*grid, text_len=text_len, text_first=self.text == "first")

    def loaded(self) -> FamilyProcessors:
        """:attr:`processors`, loaded once."""
        found = self._cache.get("processors")
        if found is None:
            found = self._cache["processors"] = self.processors()
        return found

    def timestep(self, args: tuple, kwargs: dict):
        """The ``timestep`` argument of a ``forward`` call (None when absent)."""
        return call_arg(args, kwargs, "timestep", self.timestep_arg)

    def matches(self, transformer: torch.nn.Module) -> bool:
        """Whether ``transformer`` is (a subclass of) one of :attr:`transformer_classes`."""
        return any(c.__name__ in self.transformer_classes for c in type(transformer).__mro__)


_ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make ``adapter`` known by its name (a family defined outside gen); returns it."""
    _ADAPTERS[adapter.name] = adapter
    return adapter


def get_adapter(family: str | FamilyAdapter) -> FamilyAdapter:
    """The adapter of ``family`` (a name of :data:`FAMILY_MODULES` or a registered
    one; an adapter passes through). Raises ``ValueError`` for an unknown name."""
    if isinstance(family, FamilyAdapter):
        return family
    found = _ADAPTERS.get(family)
    if found is None:
        module = FAMILY_MODULES.get(family)
        if module is None:
            raise ValueError(f"unknown model family {family!r}; gen knows {', '.join(_names())}.")
        found = register_adapter(importlib.import_module(f"{__package__}.{module}").ADAPTER)
    return found


def _names() -> list[str]:
    return list(dict.fromkeys([*FAMILY_MODULES, *_ADAPTERS]))


def all_adapters() -> tuple[FamilyAdapter, ...]:
    """Every known adapter: gen's families, then registered ones."""
    return tuple(get_adapter(name) for name in _names())


def adapter_of(transformer: torch.nn.Module) -> FamilyAdapter:
    """The adapter of ``transformer``: the first class along its MRO that an adapter
    names (a registered adapter for a subclass wins over its base class's).

    Raises:
        ValueError: no adapter patches its class; the message lists the supported ones.
    """
    adapters = all_adapters()
    for cls in type(transformer).__mro__:  # the most specific class first
        for adapter in adapters:
            if cls.__name__ in adapter.transformer_classes:
                return adapter
    supported = ", ".join(c for a in all_adapters() for c in a.transformer_classes)
    raise ValueError(f"{type(transformer).__name__} is not supported; gen sparsifies {supported}.")


def adapter_for_layout(layout: TokenLayout) -> FamilyAdapter:
    """The one family whose adapter places text as ``layout`` does (no text: Wan; last:
    HunyuanVideo; first: FLUX), for code that holds a call's layout but not its model.
    Prefer the model's own family (``get_spec(model).family``) when the model is known.

    Raises:
        ValueError: no family, or more than one, places text that way.
    """
    text = "none" if layout.text_len == 0 else ("first" if layout.text_first else "last")
    found = [a for a in all_adapters() if a.text == text]
    if len(found) != 1:
        names = ", ".join(a.name for a in found) or "none"
        raise ValueError(f"the layout {layout} does not name one model family (text {text}: {names}); "
                         "pass the model's family.")
    return found[0]
