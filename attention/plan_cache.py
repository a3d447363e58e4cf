"""A cache of static block plans that also works inside ``torch.compile``.

Static methods build a plan once per layout and reuse it. When the first call happens
inside a compiled region (``torch.compile(transformer, fullgraph=True)``), building the
plan there would trace data-dependent code (``counts.max()``) into the graph, and
storing it would change what the graph guards on (a recompile next call). Instead,
inside a graph the plan comes out of a custom op, ``gen::cached_plan``: at trace time
its fake implementation builds the plan eagerly (outside the fake mode) to learn the
shapes, and at run time it returns the cached tensors. The graph neither breaks nor
depends on the cache's contents.

Keys are tuples of Python scalars and strings.
"""

from __future__ import annotations

import ast
import itertools
import weakref
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .plan import BlockPlan

__all__ = ["PlanCache"]

_CACHES: weakref.WeakValueDictionary[int, PlanCache] = weakref.WeakValueDictionary()
_ids = itertools.count()


def _lookup(cache_id: int, key: str) -> BlockPlan:
    cache = _CACHES.get(cache_id)
    if cache is None:
        raise RuntimeError("a compiled graph refers to a plan cache that no longer exists; recompile.")
    return cache._get_eager(ast.literal_eval(key))


@torch.compiler.assume_constant_result
def _plan_meta(cache_id: int, key: str) -> tuple:
    plan = _lookup(cache_id, key)
    return (plan.block_m, plan.block_n, plan.q_len, plan.kv_len, tuple(sorted(plan.visit_data)),
            plan.is_full, plan.cached_density())


@torch.library.custom_op("gen::cached_plan", mutates_args=())
def _cached_plan(cache_id: int, key: str) -> list[torch.Tensor]:
    plan = _lookup(cache_id, key)
    # fresh outputs: a custom op may not hand out storage it keeps
    return [plan.kv_indices.clone(), plan.kv_counts.clone()] + [plan.visit_data[k].clone() for k in sorted(plan.visit_data)]


@_cached_plan.register_fake
def _cached_plan_fake(cache_id: int, key: str) -> list[torch.Tensor]:
    with unset_fake_temporarily():
        plan = _lookup(cache_id, key)
        tensors = [plan.kv_indices, plan.kv_counts] + [plan.visit_data[k] for k in sorted(plan.visit_data)]
        specs = [(tuple(t.shape), t.dtype, t.device) for t in tensors]
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in specs]


class PlanCache:
    """Plans keyed by a tuple, built by ``build(key)`` on first use.

    Args:
        build: ``key -> BlockPlan``; always called eagerly, never traced.
    """

    def __init__(self, build: Callable[[tuple], BlockPlan]) -> None:
        self._build = build
        self._plans: dict[tuple, BlockPlan] = {}
        self._id = next(_ids)
        _CACHES[self._id] = self

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()

    def _get_eager(self, key: tuple) -> BlockPlan:
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._build(key)
        return plan

    def get(self, key: tuple) -> BlockPlan:
        """The plan for ``key`` (built on first use)."""
        if not torch.compiler.is_compiling():
            return self._get_eager(key)
        skey = repr(key)
        block_m, block_n, q_len, kv_len, names, full, density = _plan_meta(self._id, skey)
        tensors = _cached_plan(self._id, skey)
        visit = dict(zip(names, tensors[2:]))
        plan = BlockPlan(block_m, block_n, q_len, kv_len, tensors[0], tensors[1], visit, check_values=False)
        # what backend choice needs, recorded eagerly (a graph must not sync to learn it)
        object.__setattr__(plan, "_full", full)
        object.__setattr__(plan, "_density", density)
        return plan
