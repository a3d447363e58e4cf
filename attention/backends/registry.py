"""One backend registry per operation, and the one place that chooses.

An operation (``"block_sparse"``, ``"cache"``; later pooling/estimation, quantized and
pyramid variants) has backends registered in order of preference. Each backend says
whether it can run a call, and if not why, through ``can_run(call) -> str | None``
(None: it can). :func:`choose` takes the first that can run, or the one asked for by
name, and logs the choice and why the ones before it were skipped (DEBUG on the
``gen.attention`` logger, once per distinct decision). ``gen info`` and the tests read the
same decisions through :func:`explain`.

A call is described by a small frozen record (:class:`Call`) of what choosers may look
at: device, dtype, lengths, head dim, whether the plan visits every block, whether the
LSE is needed, whether autograd or a compiled graph is active. It
holds no tensors, so choosing costs nothing and is the same inside ``torch.compile``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Backend", "Call", "Choice", "backends", "choose", "explain", "register"]

logger = logging.getLogger("gen.attention")


@dataclass(frozen=True)
class Call:
    """What a backend chooser may know about one call (no tensors).

    ``full``: the plan visits every key block of every row (None: unknown, e.g. inside a
    compiled graph for a plan whose fullness was not recorded). ``density``: visited
    fraction of blocks when known.
    """

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    full: bool | None = None
    density: float | None = None
    return_lse: bool = False
    compiling: bool = False
    grad: bool = False
    block_m: int = 128
    mask_batch: int = 1
    mask_heads: int = 1

    @property
    def work(self) -> float:
        """Score elements computed, ``B*H*Sq*Skv*density`` (density 1 when unknown)."""
        d = 1.0 if self.density is None else self.density
        return self.batch * self.heads * self.q_len * self.kv_len * d


@dataclass(frozen=True)
class Backend:
    """One implementation of an operation: ``run`` takes the operation's arguments.

    ``can_run(call)``: None, or why it cannot run the call at all. ``worth_it(call)``:
    None, or why the automatic choice passes it over although it could run (too small a
    call to pay for a compiled kernel, say); a backend asked for by name ignores it.
    """

    name: str
    op: str
    run: Callable
    can_run: Callable[[Call], str | None]
    summary: str = ""
    worth_it: Callable[[Call], str | None] | None = None
    #: optional ``run_in_order(q, k, v, plan, token_order, **kw)``: inputs in the original
    #: token order and a plan over the order's slots (the operation permutes for backends
    #: without one)
    run_in_order: Callable | None = None

    def skip_reason(self, call: Call) -> str | None:
        """Why the automatic choice does not take this backend for ``call`` (None: it does)."""
        why = self.can_run(call)
        if why is None and self.worth_it is not None:
            why = self.worth_it(call)
        return why


@dataclass(frozen=True)
class Choice:
    """The backend chosen for a call, and why each one before it was not."""

    backend: Backend
    reason: str
    skipped: tuple[tuple[str, str], ...] = field(default=())

    @property
    def name(self) -> str:
        return self.backend.name


_REGISTRY: dict[str, list[Backend]] = {}
_logged: set[tuple] = set()
# automatic choices per (op, call): a Call is a small frozen record and the checks depend on
# nothing else, so a decision is made once (asking every backend cost ~25 us a call)
_choices: dict[tuple, Choice] = {}


def register(backend: Backend, *, before: str | None = None) -> Backend:
    """Add ``backend`` to its operation, last (or before the backend named ``before``)."""
    entries = _REGISTRY.setdefault(backend.op, [])
    _choices.clear()
    if any(b.name == backend.name for b in entries):
        raise ValueError(f"a {backend.op!r} backend named {backend.name!r} is already registered.")
    at = len(entries) if before is None else [b.name for b in entries].index(before)
    entries.insert(at, backend)
    return backend


def backends(op: str) -> list[Backend]:
    """The backends of ``op`` in order of preference."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown operation {op!r}; known: {', '.join(sorted(_REGISTRY))}.")
    return list(_REGISTRY[op])


def explain(op: str, call: Call) -> list[tuple[str, str | None]]:
    """``(name, why not)`` for every backend of ``op`` in order; None where the automatic
    choice would take it."""
    return [(b.name, b.skip_reason(call)) for b in backends(op)]


def choose(op: str, call: Call, requested: str | None = None) -> Choice:
    """The backend to run ``call`` with: ``requested`` by name (raises ``ValueError`` if
    it cannot run, saying why), else the first that can. Logs the decision once."""
    entries = backends(op)
    if requested is not None:
        named = {b.name: b for b in entries}
        if requested not in named:
            raise ValueError(f"unknown backend {requested!r} for {op}; choose one of "
                             f"{', '.join(named)} or None (automatic).")
        why = named[requested].can_run(call)
        if why is not None:
            raise ValueError(f"{why} (backend={requested!r} cannot run this call)")
        return Choice(named[requested], "asked for")
    known = _choices.get((op, call))
    if known is not None:
        return known
    skipped = []
    for b in entries:
        why = b.skip_reason(call)
        if why is None:
            choice = Choice(b, b.summary or "first that can run", tuple(skipped))
            _log(op, call, choice)
            if not call.compiling and len(_choices) < 4096:
                _choices[(op, call)] = choice
            return choice
        skipped.append((b.name, why))
    raise ValueError(f"no {op} backend can run this call: " + "; ".join(f"{n}: {w}" for n, w in skipped))


def _log(op: str, call: Call, choice: Choice) -> None:
    if call.compiling:
        return
    key = (op, call.device.type, choice.name, choice.skipped)
    if key in _logged:
        return
    _logged.add(key)
    skipped = "; ".join(f"{n}: {w}" for n, w in choice.skipped) or "none"
    logger.debug("%s attention on %s: %s (%s); skipped: %s", op, call.device.type, choice.name,
                 choice.reason, skipped)
