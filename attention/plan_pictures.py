"""Pictures of block plans for humans: an ASCII grid and a PNG (matplotlib).

Both show one (batch, head) slice: rows are query blocks, columns key blocks.
Large grids are pooled to cells whose shade is the fraction of visited blocks.
A plan with per-visit pooling levels (``visit_data["level"]``, PSA) is drawn as a level
map: the shade steps down one quarter per level (level 1 black, 2, 4, 8 lighter, skipped
white), the ASCII picture shows the level digit (``·`` skipped), and densities count
``1/L``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

_SHADES = " ░▒▓█"


def _has_levels(plan) -> bool:
    return "level" in getattr(plan, "visit_data", {})


def _level_shade(lv: torch.Tensor) -> torch.Tensor:
    """Shade of a level map (float, 0 = skipped): 1 at level 1, a quarter less per level
    (0.25 at level 8, 0.1 beyond), 0 skipped."""
    shade = (1.0 - torch.log2(lv.clamp(min=1)) / 4).clamp(min=0.1)
    return torch.where(lv > 0, shade, torch.zeros(()))


def _slice(plan, batch: int, head: int, levels: bool = False) -> torch.Tensor:
    """One (batch, head) of the block mask as float; with ``levels`` (a plan with per-visit
    levels) the level of each cell instead, 0 where skipped."""
    if _has_levels(plan):
        from .pyramid import level_map

        mask = level_map(plan).to(torch.float32)
        if not levels:
            mask = _level_shade(mask)
    else:
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
    levels = _has_levels(plan)
    grid = _slice(plan, batch, head)
    pooled = _pool(grid, max_cells)
    exact = pooled.shape == grid.shape
    if exact and levels:
        pooled = _slice(plan, batch, head, levels=True)
    lines = [
        f"{plan.n_q_blocks} query blocks x {plan.n_kv_blocks} key blocks "
        f"({plan.block_m}x{plan.block_n} tokens), density {_density_of(plan, batch, head):.3f}"
        + ((", levels (digit = pooling level, · = skipped" if exact else ", levels (darker = finer level")
           + "; density counts 1/level)" if levels else "")
        + ("" if exact else f", shown pooled to {pooled.shape[0]}x{pooled.shape[1]}")
    ]
    for row in pooled:
        if exact and levels:
            lines.append("".join(str(int(x)) if x > 0 else "·" for x in row.tolist()))
        elif exact:
            lines.append("".join("█" if x > 0 else "░" for x in row.tolist()))
        else:
            lines.append("".join(_SHADES[min(4, math.ceil(x * 4))] for x in row.tolist()))
    return "\n".join(lines)


def _density_of(plan, batch: int, head: int) -> float:
    if _has_levels(plan):
        from .pyramid import level_density_per_head

        d = level_density_per_head(plan)
    else:
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
    image = ax.imshow(grid.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    if _has_levels(plan):  # a level map: the shade is 1/level
        bar = fig.colorbar(image, ax=ax, ticks=[0, 0.25, 0.5, 0.75, 1])
        bar.ax.set_yticklabels(["skip", "L=8", "L=4", "L=2", "L=1"])
    ax.set_xlabel(f"key block ({plan.block_n} tokens)")
    ax.set_ylabel(f"query block ({plan.block_m} tokens)")
    import textwrap

    title = title or f"batch {batch}, head {head}: density {_density_of(plan, batch, head):.3f}"
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
