"""Sparse-vDiT's attention modes as data: their parameters for a geometry, their sparsity,
and the search's choice between them.

Everything here is arithmetic on block indices and error tables, with no plan file and no
kernel call: ``sparse_vdit.py`` runs the chosen modes and ``gen.calibrate`` measures the
errors.

Modes (ids as stored in plans, over the video tokens of a call, ``b``-token blocks):

===  =========  ==============================================================================
id   name       query block ``i`` visits key block ``j`` when ...
===  =========  ==============================================================================
0    full       always (dense attention)
1    skip       never: the head's output on the video queries is exactly zero
2    window     ``|i - j| <= window`` in frame-major order (``t*H*W + h*W + w``): a band around
               the diagonal, i.e. the query's own neighbourhood inside its frame
3    diagonal   ``|i - j| <= diagonal`` in the time-major order ``"hwt"``
               (``(h*W + w)*T + t``): the same spatial position in every frame, which in
               frame-major order is a set of diagonals ``frame_len`` apart
4    stripe     ``j`` is one of the head's ``stripes`` calibrated key blocks (the same
               columns for every query: vertical stripes)
===  =========  ==============================================================================

Where the paper is silent, gen decides (numbers measured on the tiny offline models,
``gen.pipelines`` names ``tiny-wan``/``tiny-hunyuan``, and from the geometry of the
real ones):

* **Block size** ``b``: 64 tokens (kernel block 64 x 64). The kernel takes any power of
  two in [16, 256]; 64 is the CPU reference's fastest tile (see ``dense.py``) and keeps
  the band and stripe masks fine-grained (Wan 2.1 480p: 512 blocks of 64). Full heads
  run with 128 x 64 tiles on CUDA, as ``dense`` does.
* **Window**: half-width ``window`` blocks, default ``frame_len // (2 b)``: the band is one
  frame wide, which is the intra-frame locality of the paper's "diagonal" heads
  (Wan 480p: 12 blocks, density 25/512 = 4.8 %; HunyuanVideo 720p: 28 blocks, 3.0 %;
  tiny models at b = 64: 0, the query's own frame, density 0.20).
* **Multi-diagonal**: half-width ``diagonal`` blocks of the ``"hwt"`` order, default
  ``ceil((T - 1) / b)`` (1 for up to 65 latent frames): the smallest band that always
  holds every frame of the query's own spatial position, plus ``~b/T`` neighbouring
  positions along the row (Wan 480p: density 3/512 = 0.6 %; tiny at b = 64: 0.52).
* **Vertical stripes**: ``stripes`` key blocks per head, default ``ceil(n_blocks / 16)``
  (6.25 % of the keys, about the window's cost on Wan 480p, so the search picks between
  the two by error, not by cost). The columns are calibrated, not fixed: per (step,
  layer, head) the key blocks that receive the most attention probability under full
  attention (summed over queries, averaged over prompts), stored in the plan.

The search (``gen.calibrate``) and its loss are documented there; ``select_modes``
here is the rule it applies: per head, ``L_i = err_i + lam * (1 - S_i)`` over the four
sparse modes, ``full`` when every ``L_i > eps``, else ``argmin_i L_i`` (ties to the lower
id), with ``err_i = ||O_i - O_0||^2 / mean_h ||O_0,h||^2`` over the video queries of the
call (the MSE in units of the layer's mean head energy, so skipping an average head
costs exactly 1 = the default ``eps``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..plan import BlockPlan, block_lengths
from ..token_order import TokenPermutation, axis_order
from .base import check_block_size, is_int

__all__ = [
    "CANDIDATES",
    "DEFAULT_BLOCK",
    "DIAGONAL",
    "FULL",
    "MODE_NAMES",
    "ModeParams",
    "SKIP",
    "STRIPE",
    "WINDOW",
    "band_mask",
    "hwt_order",
    "key_block_mass",
    "mode_sparsity",
    "resolve_params",
    "select_modes",
    "top_stripes",
]

FULL, SKIP, WINDOW, DIAGONAL, STRIPE = range(5)
MODE_NAMES = ("full", "skip", "window", "diagonal", "stripe")
#: the modes the search compares (``full`` is the fallback, not a candidate)
CANDIDATES = (SKIP, WINDOW, DIAGONAL, STRIPE)
DEFAULT_BLOCK = 64


# -- mode parameters --------------------------------------------------------------------
@dataclass(frozen=True)
class ModeParams:
    """Resolved mode parameters of one geometry (see the module docstring).

    Args:
        block_size: block edge in tokens (query and key blocks alike).
        window: band half-width in blocks, frame-major order.
        diagonal: band half-width in blocks, ``"hwt"`` order.
        stripes: key blocks per stripe head.
    """

    block_size: int
    window: int
    diagonal: int
    stripes: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_params(layout: TokenLayout, block_size: int | None = None, window: int | None = None,
                   diagonal: int | None = None, stripes: int | None = None) -> ModeParams:
    """Fill the ``None`` parameters with the geometry defaults of the module docstring.

    Raises:
        ValueError: a value out of range for this geometry (e.g. more stripes than blocks).
    """
    b = DEFAULT_BLOCK if block_size is None else block_size
    check_block_size(b)
    nb = -(-layout.video_len // b)
    w = layout.frame_len // (2 * b) if window is None else window
    d = max(1, -(-(layout.frames - 1) // b)) if diagonal is None else diagonal
    n = max(1, -(-nb // 16)) if stripes is None else stripes
    if not is_int(w) or not is_int(d):
        raise ValueError(f"window and diagonal must be ints >= 0 (blocks), got {w!r} and {d!r}.")
    if not is_int(n, 1) or n > nb:
        raise ValueError(
            f"stripes must be an int in [1, {nb}]: this geometry ({layout}) has {nb} key blocks of "
            f"{b} tokens; got {n!r}."
        )
    return ModeParams(b, w, d, n)


def band_mask(nb: int, half: int) -> torch.Tensor:
    idx = torch.arange(nb)
    return (idx[:, None] - idx[None, :]).abs() <= half


def hwt_order(layout: TokenLayout) -> TokenPermutation:
    """The multi-diagonal heads' token order: time fastest (``(h*W + w)*T + t``)."""
    return axis_order(layout.grid, "hwt")


def mode_sparsity(params: ModeParams, layout: TokenLayout, stripes: torch.Tensor) -> torch.Tensor:
    """``S_i``: fraction of the video x video token pairs a mode skips, float32
    ``[..., 5]`` for stripe sets ``stripes`` int ``[..., n]`` (ragged last blocks count
    with their true size). Full 0, skip 1."""
    n, b = layout.video_len, params.block_size
    lens = block_lengths(n, b)
    nb = lens.numel()
    w_density = BlockPlan.from_block_mask(band_mask(nb, params.window), b, b, n, n).density()
    d_density = BlockPlan.from_block_mask(band_mask(nb, params.diagonal), b, b, n, n).density()
    stripe_density = lens[stripes.long()].sum(-1) / n
    out = torch.empty(*stripes.shape[:-1], 5, dtype=torch.float64)
    out[..., FULL] = 0.0
    out[..., SKIP] = 1.0
    out[..., WINDOW] = 1.0 - w_density
    out[..., DIAGONAL] = 1.0 - d_density
    out[..., STRIPE] = 1.0 - stripe_density
    return out.float()


def select_modes(errors: torch.Tensor, sparsity: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """Algorithm 1's choice, vectorised: int8 modes ``[...]`` from ``errors`` and
    ``sparsity`` ``[..., 5]``. Per entry ``L_i = errors_i + lam * (1 - sparsity_i)`` over
    the sparse modes; ``full`` when every ``L_i > eps`` (or none was measured: NaN),
    else the argmin (ties to the lower mode id)."""
    cand = torch.tensor(CANDIDATES)
    err = errors.float()[..., cand]
    loss = err + lam * (1.0 - sparsity.float()[..., cand])
    loss = torch.where(torch.isnan(loss), torch.full_like(loss, math.inf), loss)
    best, arg = loss.min(dim=-1)
    return torch.where(best <= eps, cand[arg], torch.full_like(arg, FULL)).to(torch.int8)


def top_stripes(mass: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` key blocks with the most attention mass, ascending: int32 ``[..., n]``
    from ``mass [..., n_blocks]`` (ties to the lower block index)."""
    order = torch.sort(mass, dim=-1, descending=True, stable=True).indices[..., :n]
    return order.sort(dim=-1).values.to(torch.int32)


def key_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, *, budget: int = 1 << 24) -> torch.Tensor:
    """Attention probability each key block receives under full attention, averaged over
    queries (and batch): float32 ``(H, n_blocks)``, each row sums to 1.

    Args:
        q, k: ``(B, H, S, D)`` video queries and keys (softmax over these keys only).
        block_size: key block size in tokens.
        budget: most score elements held at once (query chunks; never ``S x S`` per head
            unless it fits).
    """
    bsz, heads, s, d = q.shape
    scale = d**-0.5
    mass = torch.zeros(heads, s, dtype=torch.float32, device=q.device)
    chunk = max(1, budget // max(1, bsz * heads * s))
    kt = k.float().transpose(-1, -2)
    for start in range(0, s, chunk):
        scores = (q[:, :, start : start + chunk].float() @ kt) * scale
        mass += torch.softmax(scores, dim=-1).sum(dim=(0, 2))
    mass /= bsz * s
    nb = -(-s // block_size)
    mass = torch.nn.functional.pad(mass, (0, nb * block_size - s))
    return mass.reshape(heads, nb, block_size).sum(-1).cpu()
