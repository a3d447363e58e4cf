"""Attention-method parameters as form fields, read from the method registry.

Nothing here names a method's fields: every registered method (``list_methods()``) gets
one field per config dataclass field, typed from its annotation and described from the
config's docstring, so a method registered later appears in the demo as it is.

An empty field means "the model's preset" (``preset_for``, else the config default):
the page fills the fields with those values when it loads and when the model changes,
and an API caller who leaves a parameter out gets the preset of the model it asked for.

How an annotation becomes a field:

==========================================  ==========================================
``bool``                                     radio: on / off
``int`` / ``float`` (or ``int | float``)     number
``Literal[...]``                             dropdown of the literals
a callable (``mask``'s ``pattern``)           dropdown of the named patterns in ``patterns.py``
``backend``                                  dropdown: auto (``None``), torch, triton
anything else, and any field that may be     text, read like ``gen render --set key=value``
``None`` (``int | tuple[int, ...]``)         (``none`` for ``None``)
==========================================  =========================================="""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from gen.attention.methods import MethodConfig, method_class, parse_overrides, preset_for

from .patterns import DEFAULT_PATTERN, PATTERNS, pattern_name

__all__ = ["ParamField", "field_key", "method_fields", "form_values", "overrides_from", "from_widget", "to_widget"]

AUTO = "auto"  # dropdown entry for backend=None (Triton on CUDA, PyTorch on the CPU)
ON, OFF = "on", "off"


@dataclass(frozen=True)
class ParamField:
    """One config field of one method, as the demo shows it.

    Attributes:
        method: registered method name, e.g. ``"mask"``.
        name: config field name, e.g. ``"dense_steps"``.
        key: the keyword the event handlers (and ``gradio_client``) use for it:
            ``<method>__<name>`` with non-identifier characters as ``_``.
        kind: ``"bool"``, ``"int"``, ``"float"``, ``"choice"``, ``"pattern"`` or ``"text"``.
        choices: dropdown entries for ``choice``/``pattern`` kinds.
        default: the config's default (``None`` when it has none).
        doc: the field's description from the config docstring ("" when none).
    """

    method: str
    name: str
    key: str
    kind: str
    choices: tuple = ()
    default: Any = None
    doc: str = ""


def field_key(method: str, name: str) -> str:
    """``"sparse-vdit", "dense_steps"`` -> ``"sparse_vdit__dense_steps"``."""
    return re.sub(r"\W", "_", method) + "__" + name


def _field_docs(cls: type) -> dict[str, str]:
    """``name: text`` entries of the ``Args:`` sections of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = klass.__dict__.get("__doc__") or ""
        match = re.search(r"^\s*Args:\s*$(.*)", text, re.M | re.S)
        if not match:
            continue
        current, indent = None, 0
        for line in match.group(1).splitlines():
            entry = re.match(r"^(\s{4,})(\w+):\s*(.*)$", line)
            depth = len(line) - len(line.lstrip())
            if entry and (current is None or depth <= indent):
                current, indent = entry.group(2), depth
                docs[current] = entry.group(3).strip()
            elif current and line.strip() and depth > indent:  # continuation, indented deeper
                docs[current] += " " + line.strip()
            else:  # a blank line or another kind of entry ("a, b: see ...") ends it
                current = None
    return docs


def _kind(name: str, annotation) -> tuple[str, tuple]:
    """``(kind, choices)`` for a config field annotation."""
    if name == "backend":
        return "choice", (AUTO, "torch", "triton")
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    optional = type(None) in args
    args = tuple(a for a in args if a is not type(None))
    if any(a is collections.abc.Callable or typing.get_origin(a) is collections.abc.Callable for a in args):
        return "pattern", tuple(PATTERNS)
    if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
        return "choice", tuple(typing.get_args(args[0]))
    if optional:  # an empty field means "preset", so None must be typed: text ("none")
        return "text", ()
    if set(args) == {bool}:
        return "bool", (ON, OFF)
    if set(args) == {int}:
        return "int", ()
    if args and set(args) <= {int, float}:
        return "float", ()
    return "text", ()


def method_fields(method: str) -> list[ParamField]:
    """The fields of ``method``'s config: its own first, then the shared schedule fields
    (``dense_steps``, ``dense_layers``, ``backend``), each group in declaration order."""
    cls = method_class(method).config_cls
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: fall back to the raw ones
        hints = {}
    docs = _field_docs(cls)
    shared = set(MethodConfig.field_names())
    ordered = sorted(dataclasses.fields(cls), key=lambda f: f.name in shared)  # stable sort
    out = []
    for f in ordered:
        kind, choices = _kind(f.name, hints.get(f.name, f.type))
        default = f.default
        if default is dataclasses.MISSING:
            default = None if f.default_factory is dataclasses.MISSING else f.default_factory()
        out.append(ParamField(method, f.name, field_key(method, f.name), kind, choices, default,
                              docs.get(f.name, "")))
    return out


def to_widget(field: ParamField, value) -> Any:
    """A config value as the field's widget shows it."""
    if field.kind == "pattern":
        return pattern_name(value) or DEFAULT_PATTERN
    if field.name == "backend":
        return AUTO if value is None else value
    if field.kind == "bool":
        return ON if value else OFF
    if field.kind == "text":
        if value is None:
            return "none"
        if isinstance(value, tuple | list):
            return ",".join(str(v) for v in value)
        return str(value)
    return value


_EMPTY = object()


def from_widget(field: ParamField, value) -> Any:
    """A widget value as the config takes it; ``_EMPTY`` for an empty field (the preset).

    Raises:
        ValueError: a value the field cannot take, saying what to enter.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return _EMPTY
    label = f"{field.method} parameter {field.name}"
    if field.kind == "pattern":
        if value not in PATTERNS:
            raise ValueError(f"{label}: pick one of the named patterns: {', '.join(PATTERNS)}.")
        return PATTERNS[value]
    if field.name == "backend":
        return None if value == AUTO else value
    if field.kind in ("choice", "bool"):
        if value not in field.choices:
            raise ValueError(f"{label} must be one of {', '.join(map(str, field.choices))}, got {value!r}.")
        return value == ON if field.kind == "bool" else value
    if field.kind in ("int", "float"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{label} needs a number, got {value!r}.") from None
        if field.kind == "int":
            if number != int(number):
                raise ValueError(f"{label} must be a whole number, got {value}.")
            return int(number)
        return number
    return parse_overrides(field.method, [f"{field.name}={str(value).strip()}"])[field.name]


def form_values(method: str, model: str, family: str) -> dict[str, Any]:
    """Widget values (by field key) for ``method`` on ``model``: the preset over the defaults."""
    preset = preset_for(method, model=model, family=family)
    return {f.key: to_widget(f, preset.get(f.name, f.default)) for f in method_fields(method)}


def overrides_from(method: str, values: dict[str, Any], *, model: str, family: str) -> dict[str, Any]:
    """Config overrides for ``method`` from widget values keyed by field key.

    Filled fields override the preset; empty or absent ones keep it. A pattern field
    with no preset pattern takes the first named pattern, so ``mask`` always runs.
    """
    preset = preset_for(method, model=model, family=family)
    out = {}
    for f in method_fields(method):
        value = from_widget(f, values.get(f.key))
        if value is not _EMPTY:
            out[f.name] = value
        elif f.kind == "pattern" and f.name not in preset:
            out[f.name] = PATTERNS[DEFAULT_PATTERN]
    return out
