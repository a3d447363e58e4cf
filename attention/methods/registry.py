"""Method registry: names → method classes, with presets and typed overrides.

``get_method("dense")``, ``get_method("mask", pattern=fn)``, or a config object
(``get_method(DenseConfig(dense_steps=2))``). Unknown names and fields raise
``ValueError`` listing what exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing

from .base import MethodConfig, SparseMethod
from .presets import preset_for

__all__ = ["register_method", "list_methods", "method_class", "get_method", "parse_overrides"]

_METHODS: dict[str, type[SparseMethod]] = {}


def register_method(cls: type[SparseMethod]) -> type[SparseMethod]:
    """Class decorator / function: make ``cls`` available under ``cls.name``."""
    _METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    """Register every method class defined in this package's modules: a new method is
    one new file (``attention/methods/<name>.py``) and nothing else to edit."""
    import importlib
    import inspect
    import pkgutil

    package = __name__.rsplit(".", 1)[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name in ("base", "registry", "presets") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, SparseMethod) and obj.__module__ == module.__name__ and obj.name != "base":
                register_method(obj)


_discover()


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[SparseMethod]:
    """The class registered as ``name``; ``ValueError`` naming the valid ones otherwise."""
    if name in _METHODS:
        return _METHODS[name]
    close = difflib.get_close_matches(name, _METHODS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown attention method {name!r}; available: {', '.join(list_methods())}.{hint}")


def _check_fields(cfg_cls: type[MethodConfig], overrides: dict) -> None:
    valid = cfg_cls.field_names()
    for key in overrides:
        if key not in valid:
            raise ValueError(f"{cfg_cls.__name__} has no field {key!r}; its fields are: {', '.join(valid)}.")


def get_method(method, *, model: str | None = None, family: str | None = None, **overrides) -> SparseMethod:
    """Build a method.

    Args:
        method: a registered name, a config object (``DenseConfig(...)``) or a method.
        model: registry model name, for its preset (e.g. ``"wan2.1-t2v-1.3b"``).
        family: model family (``"wan"``, ``"hunyuan"``, ``"flux"``): preset fallback and a
            support check.
        **overrides: config fields that replace the preset's.
    """
    if isinstance(method, SparseMethod):
        cls, config = type(method), method.config
        if overrides:
            _check_fields(cls.config_cls, overrides)
            config = dataclasses.replace(config, **overrides)
    elif isinstance(method, MethodConfig):
        matches = [c for c in _METHODS.values() if type(method) is c.config_cls]
        if not matches:
            raise ValueError(f"no registered method takes a {type(method).__name__}.")
        cls = matches[0]
        _check_fields(cls.config_cls, overrides)
        config = dataclasses.replace(method, **overrides) if overrides else method
    elif isinstance(method, str):
        cls = method_class(method)
        values = preset_for(method, model=model, family=family)
        _check_fields(cls.config_cls, overrides)
        values.update(overrides)
        config = cls.config_cls(**values)
    else:
        raise ValueError(f"method must be a name, a config or a method, got {type(method).__name__}.")
    if family is not None and family not in cls.families:
        raise ValueError(
            f"method {cls.name!r} does not support {family} models; it supports: {', '.join(cls.families)}."
        )
    return cls(config, model=model)


def _convert(text: str, annotation, key: str):
    """Convert a ``--set key=value`` string to the field's type."""
    ann = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
    if text.lower() == "none" and type(None) in ann:
        return None
    errors = []
    for a in ann:
        if a is type(None):
            continue
        try:
            if a is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            if a is int:
                return int(text)
            if a is float:
                return float(text)
            if a is str:
                return text
            if typing.get_origin(a) is tuple:
                return tuple(int(x) for x in text.strip("()[] ").split(",") if x.strip())
        except ValueError as err:
            errors.append(str(err))
    raise ValueError(f"cannot read {key}={text!r} as {annotation}")


def parse_overrides(method: str, items: list[str]) -> dict:
    """``["decay=0.2", "dense_steps=12"]`` → typed overrides for ``method``'s config."""
    cls = method_class(method).config_cls
    hints = typing.get_type_hints(cls)
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}.")
        key, text = item.split("=", 1)
        key = key.strip()
        _check_fields(cls, {key: None})
        out[key] = _convert(text.strip(), hints[key], key)
    return out
