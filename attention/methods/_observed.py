"""Densities a dynamic method observes call by call (its plan depends on q and k)."""

from __future__ import annotations

import torch

__all__ = ["ObservedDensities"]


class ObservedDensities:
    """Running sums of per-call fractions, keyed by layout. ``add`` keeps 0-d tensors on
    the device (no host sync inside a run); ``mean`` reads one back (one sync)."""

    def __init__(self) -> None:
        self._seen: dict[object, list] = {}

    def add(self, layout, *fractions: torch.Tensor) -> None:
        """Count one call at ``layout`` with these fractions (e.g. attended, tiles)."""
        seen = self._seen.get(layout)
        if seen is None:
            self._seen[layout] = [list(fractions), 1]
        else:
            seen[0] = [a + b for a, b in zip(seen[0], fractions)]
            seen[1] += 1

    def mean(self, layout, index: int = 0) -> float | None:
        """Mean of fraction ``index`` over the calls at ``layout`` (None before any)."""
        seen = self._seen.get(layout)
        return None if seen is None else float(seen[0][index]) / seen[1]

    def clear(self) -> None:
        self._seen.clear()
