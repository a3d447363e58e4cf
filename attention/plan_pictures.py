"""Pictures of block plans for humans: an ASCII grid and a PNG (matplotlib).

Both show one (batch, head) slice: rows are query blocks, columns key blocks.
Large grids are pooled to cells whose shade is the fraction of visited blocks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

_SHADES = " ░▒▓█"


def _slice(plan, batch: int, head: int) -> torch.Tensor:
    mask = plan.to_block_mask()
    b = 0 if mask.shape[0] == 1 else batch
    h = 0 if mask.shape[1] == 1 else head
    if not (0 <= b < mask.shape[0] and 0 <= h < mask.shape[1]):
        raise ValueError(
            f"(batch={batch}, head={head}) is outside the plan's {mask.shape[0]} x {mask.shape[1]} entries."
        )
    return mask[b, h].to("cpu", torch.float32)


def _pool(grid: torch.Tensor, max_cells: int) -> torch.Tensor:
    nq, nk = grid.shape
    f = max(1, math.ceil(max(nq, nk) / max_cells))
    if f == 1:
        return grid
    pad = torch.zeros(math.ceil(nq / f) * f, math.ceil(nk / f) * f)
    weight = torch.zeros_like(pad)
    pad[:nq, :nk], weight[:nq, :nk] = grid, 1.0
    pooled = pad.reshape(pad.shape[0] // f, f, pad.shape[1] // f, f).sum((1, 3))
    cells = weight.reshape(pad.shape[0] // f, f, pad.shape[1] // f, f).sum((1, 3))
    return pooled / cells


def plan_to_string(plan, batch: int = 0, head: int = 0, max_cells: int = 64) -> str:
    """ASCII picture of ``plan`` for (batch, head); see ``BlockPlan.to_string``."""
    grid = _slice(plan, batch, head)
    pooled = _pool(grid, max_cells)
    exact = pooled.shape == grid.shape
    lines = [
        f"{plan.n_q_blocks} query blocks x {plan.n_kv_blocks} key blocks "
        f"({plan.block_m}x{plan.block_n} tokens), density {_density_of(plan, batch, head):.3f}"
        + ("" if exact else f", shown pooled to {pooled.shape[0]}x{pooled.shape[1]}")
    ]
    for row in pooled:
        if exact:
            lines.append("".join("█" if x > 0 else "░" for x in row.tolist()))
        else:
            lines.append("".join(_SHADES[min(4, math.ceil(x * 4))] for x in row.tolist()))
    return "\n".join(lines)


def _density_of(plan, batch: int, head: int) -> float:
    d = plan.density_per_head()
    return float(d[0 if d.shape[0] == 1 else batch, 0 if d.shape[1] == 1 else head])


def save_plan_png(plan, path, batch: int = 0, head: int = 0, title: str | None = None) -> Path:
    """Save a PNG of ``plan`` for (batch, head) to ``path`` and return the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = _slice(plan, batch, head)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    aspect = grid.shape[0] / max(grid.shape[1], 1)
    fig, ax = plt.subplots(figsize=(6, max(2.0, min(12.0, 6 * aspect))), dpi=120)
    ax.imshow(grid.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_xlabel(f"key block ({plan.block_n} tokens)")
    ax.set_ylabel(f"query block ({plan.block_m} tokens)")
    import textwrap

    title = title or f"batch {batch}, head {head}: density {_density_of(plan, batch, head):.3f}"
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
