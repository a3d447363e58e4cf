"""What the benchmarks share: the run's metadata, the method list and table formatting.

``bench_meta`` is the header of every result file (device, versions, commit, command,
date), ``resolve_methods`` turns ``--attention dense,radial,…`` into buildable
methods (or a documented skip), and ``BenchResult`` is the ``{"meta", "rows"}`` JSON
shape with a markdown rendering.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .kernels import _commit, _device_name, _triton_version

__all__ = ["STOCK", "MethodChoice", "BenchResult", "bench_meta", "resolve_methods", "fmt"]

#: pseudo-method of ``gen bench e2e``: the model's own attention (diffusers' dispatcher,
#: bit-identical to the unmodified pipeline), routed through gen's processors only so its
#: attention calls can be timed like every other method's.
STOCK = "stock"
# dense_layers=N keeps the first N layers on the stock dispatcher: a count no model reaches
_ALL_LAYERS = 1 << 30


def bench_meta(device: torch.device, command: str | None, **extra) -> dict:
    """Header of a result file: where, with what, and how to rerun it."""
    return {
        "device": _device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": sys.version.split()[0],
        "commit": _commit(),
        "command": command or "python API",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        **extra,
    }


@dataclass(frozen=True)
class MethodChoice:
    """One entry of ``--attention``.

    Attributes:
        label: the name as given (``"radial"``, ``"stock"``, …).
        name: registered method name to build (``None`` when skipped).
        overrides: config fields on top of the model's preset (``{}`` = the preset).
        skip: why it is not run (empty when it runs).
    """

    label: str
    name: str | None
    overrides: dict = field(default_factory=dict)
    skip: str = ""

    def build(self, spec):
        """The method instance for ``spec`` (a ``ModelSpec``), preset applied."""
        from gen.attention.methods import get_method

        return get_method(self.name, model=spec.name, family=spec.family, **self.overrides)


#: methods that run only from a calibrated plan file (``--plan``)
CALIBRATED = ("sparse-vdit", "paro")


def resolve_methods(text: str, spec, *, plan: str | Path | None = None, allow_stock: bool = True) -> list[MethodChoice]:
    """Parse ``"dense,radial,gna"`` for ``spec`` (a ``ModelSpec``). ``name@backend``
    (``"gna@gather"``, ``"dense@torch"``) runs a method on a named attention backend
    (``gen.attention.BACKENDS``) instead of the automatic choice, for side-by-side rows.

    ``mask`` is always skipped (it needs a pattern function: use ``gen.sparsify(pipe,
    "mask", pattern=fn)`` from Python), ``sparse-vdit`` and ``paro`` are skipped unless
    ``plan`` (a ``gen calibrate sparse-vdit`` / ``gen calibrate paro`` plan file) is given, and a method that does not support
    the model's family is skipped; each skip carries its reason.

    Raises:
        ValueError: an unknown name, or none given.
    """
    from gen.attention.methods import list_methods, method_class

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--attention needs at least one method, e.g. --attention dense,radial.")
    out = []
    for label in dict.fromkeys(names):
        label, _, backend = label.partition("@")  # "gna@gather": a method on a named backend
        if backend:
            from gen.attention import BACKENDS

            if backend not in BACKENDS:
                raise ValueError(f"unknown backend {backend!r} in {label}@{backend}; backends: {', '.join(BACKENDS)}.")
            if label == STOCK:
                raise ValueError(f"'{STOCK}' is the model's own attention; it takes no @backend.")
            choice = resolve_methods(label, spec, plan=plan, allow_stock=allow_stock)[0]
            out.append(MethodChoice(f"{label}@{backend}", choice.name,
                                    {**choice.overrides, "backend": backend} if choice.name else {}, choice.skip))
            continue
        if label == STOCK:
            if not allow_stock:
                raise ValueError(f"'{STOCK}' is only for `gen bench e2e`; methods here: {', '.join(list_methods())}.")
            out.append(MethodChoice(label, "dense", {"dense_layers": _ALL_LAYERS}))
            continue
        cls = method_class(label)  # ValueError with the valid names
        if spec.family not in cls.families:
            out.append(MethodChoice(label, None, skip=f"{label} does not support {spec.family} models"))
        elif label == "mask":
            out.append(MethodChoice(label, None, skip="mask needs a pattern function (Python: gen.sparsify(pipe, 'mask', pattern=fn))"))
        elif label in CALIBRATED and plan is None:
            out.append(MethodChoice(label, None, skip=f"{label} needs a calibrated plan: pass --plan (from `gen calibrate {label}`)"))
        elif label in CALIBRATED:
            out.append(MethodChoice(label, label, {"plan": str(plan)}))
        else:
            out.append(MethodChoice(label, label))
    return out


def fmt(x, spec: str, none: str = "–") -> str:
    """``format(x, spec)``, with ``none`` for None and the symbol for infinities."""
    if x is None:
        return none
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return format(x, spec)


@dataclass
class BenchResult:
    """``meta`` (see :func:`bench_meta`) and one dict-able dataclass per row."""

    meta: dict
    rows: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": [asdict(r) for r in self.rows]}

    def to_json(self) -> str:
        # allow_nan=False: a NaN or infinity would make the file invalid JSON; rows store
        # None for "not measured" and "infinite" instead
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def header(self) -> str:
        m = self.meta
        return (f"`{m['command']}` — {m['device']}, torch {m['torch']}, triton {m['triton']}, "
                f"commit {m['commit']}, {m['date']}")


def print_and_save(result, json_out: str | None) -> int:
    """What a ``python -m gen.bench.X`` entry point ends with: the markdown table on
    stdout, the JSON (atomically) where asked; returns the exit status 0."""
    print(result.to_markdown())
    if json_out:
        from gen._io import atomic_write_text

        atomic_write_text(json_out, result.to_json() + "\n")
        print(f"wrote {json_out}")
    return 0
