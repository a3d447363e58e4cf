"""PARO's calibration statistics and rules, on tensors (no pipeline): block statistics of
the video→video attention map in each of the six token orders, the order metrics, the
order choice, and the masks per timestep bin. ``gen.calibrate_paro`` runs them over a
pipeline; tests run them on synthetic maps.

Statistics never hold the ``Sv x Sv`` map: the probabilities are computed for a chunk of
query rows at a time (at most ``budget`` elements), reduced to 64 x 64 (``block_size``)
blocks in every order, and accumulated. Per order ``o`` and block ``(i, j)``:

* ``mass``: the sum of the probabilities (the mask's ranking),
* ``peak``: the largest probability (``max|x|``, probabilities are >= 0),
* ``small``: how many probabilities are below ``eps`` (1e-3, the paper's),
* and ``area``: how many entries the block has (ragged last blocks are smaller).

The probabilities are those of the call's real softmax: with text keys (HunyuanVideo,
FLUX) the row is normalised over all valid keys and only the video columns are kept, so
a head that looks mostly at the text has little video→video mass (``vv_mass``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .paro import AXES, force_last_block, order_permutation

__all__ = ["BlockStats", "block_statistics", "build_masks", "order_metrics", "select_orders"]


@dataclass
class BlockStats:
    """Block statistics of one call's video→video probabilities, summed over the batch.

    Attributes:
        mass: float64 ``(O, H, nb, nb)`` probability sums per block, per order.
        peak: float32 ``(O, H, nb, nb)`` largest probability per block.
        small: float64 ``(O, H, nb, nb)`` entries below ``eps`` per block.
        area: float64 ``(nb, nb)`` entries per block and sample (``B`` samples summed:
            ``area * batch`` entries were seen).
        batch: samples summed.
        vv_mass: float64 ``(H,)``: mean over the video queries (and batch) of the
            probability on video keys (1 without text keys).
        orders: the order ids of the first axis.
    """

    mass: torch.Tensor
    peak: torch.Tensor
    small: torch.Tensor
    area: torch.Tensor
    batch: int
    vv_mass: torch.Tensor
    orders: tuple[int, ...]


def _lengths(n: int, b: int) -> torch.Tensor:
    nb = -(-n // b)
    lens = torch.full((nb,), float(b), dtype=torch.float64)
    lens[-1] = n - b * (nb - 1)
    return lens


def _reduce_keys(p: torch.Tensor, b: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``p (B, H, c, n)`` (columns in an order) → per key block ``(H, c, nb)`` sum, max and
    count below ``eps``, summed (max: maxed) over the batch."""
    n = p.shape[-1]
    full = (n // b) * b
    parts = []
    if full:
        parts.append(p[..., :full].unflatten(-1, (n // b, b)))
    sums, peaks, smalls = [], [], []
    for part in parts:
        sums.append(part.sum(-1))
        peaks.append(part.amax(-1))
        smalls.append((part < eps).sum(-1, dtype=torch.float32))
    if full < n:
        tail = p[..., full:]
        sums.append(tail.sum(-1, keepdim=True))
        peaks.append(tail.amax(-1, keepdim=True))
        smalls.append((tail < eps).sum(-1, keepdim=True, dtype=torch.float32))
    s, m, c = (torch.cat(x, dim=-1) for x in (sums, peaks, smalls))
    return s.sum(0), m.amax(0), c.sum(0)


@torch.no_grad()
def block_statistics(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int], *, block_size: int = 64,
                     orders: tuple[int, ...] = tuple(range(len(AXES))), eps: float = 1e-3,
                     k_text: torch.Tensor | None = None, text_valid: torch.Tensor | None = None,
                     scale: float | None = None, budget: int = 1 << 24) -> BlockStats:
    """Block statistics of ``softmax(q k^T * scale)`` restricted to the video keys, in each
    order of ``orders``.

    Args:
        q, k: ``(B, H, Sv, D)`` video queries and keys, frame-major over ``grid``.
        grid: ``(F, H, W)`` video token grid (``F*H*W = Sv``).
        block_size: block edge in tokens.
        orders: order ids (0-5) to measure.
        eps: an entry below it counts as small.
        k_text: optional ``(B, H, St, D)`` text keys of the same call: the softmax then
            runs over video and text keys (text columns dropped after normalising).
        text_valid: optional int ``(B,)`` valid text keys per sample (padding last).
        scale: softmax scale, default ``D ** -0.5``.
        budget: most probability elements held at once (``B*H*rows*Sv`` per chunk).

    Returns:
        :class:`BlockStats` (on the CPU).
    """
    bsz, heads, n, d = q.shape
    if math.prod(grid) != n:
        raise ValueError(f"grid {tuple(grid)} has {math.prod(grid)} tokens but q has {n}.")
    scale = d**-0.5 if scale is None else scale
    b = block_size
    nb = -(-n // b)
    dev = q.device
    perms = [order_permutation(tuple(grid), o) for o in orders]
    cols = [p.index.to(dev) for p in perms]
    qblock = [(p.inverse.to(dev) // b) for p in perms]  # query token -> its block in the order
    mass = torch.zeros(len(orders), heads, nb, nb, dtype=torch.float64, device=dev)
    peak = torch.zeros(len(orders), heads, nb, nb, dtype=torch.float32, device=dev)
    small = torch.zeros(len(orders), heads, nb, nb, dtype=torch.float64, device=dev)
    vv = torch.zeros(heads, dtype=torch.float64, device=dev)
    kt = k.float().transpose(-1, -2)
    ktt = None if k_text is None else k_text.float().transpose(-1, -2)
    chunk = max(1, budget // max(1, bsz * heads * n))
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        qc = q[:, :, rows].float()
        s = (qc @ kt) * scale  # (B, H, c, Sv)
        lse = torch.logsumexp(s, dim=-1)
        if ktt is not None:
            st = (qc @ ktt) * scale
            if text_valid is not None:
                pos = torch.arange(st.shape[-1], device=dev)
                st = st.masked_fill(pos >= text_valid.to(dev).view(-1, 1, 1, 1), float("-inf"))
            lse = torch.logaddexp(lse, torch.logsumexp(st, dim=-1))
        p = torch.exp(s - lse.unsqueeze(-1))
        vv += p.sum(dim=(0, 2, 3), dtype=torch.float64)
        for i in range(len(orders)):
            bs, bm, bc = _reduce_keys(p.index_select(-1, cols[i]), b, eps)  # (H, c, nb)
            qb = qblock[i][rows]
            mass[i].index_add_(1, qb, bs.double())
            small[i].index_add_(1, qb, bc.double())
            peak[i].scatter_reduce_(1, qb.view(1, -1, 1).expand_as(bm), bm, "amax")
    lens = _lengths(n, b)
    return BlockStats(mass.cpu(), peak.cpu(), small.cpu(), torch.outer(lens, lens), bsz,
                      (vv / (bsz * n)).cpu(), tuple(orders))


def order_metrics(stats: BlockStats, *, sigma: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's two order metrics per head and order, float64 ``(H, O)`` each:

    * ``M_sparse``: the share of blocks in which at least ``sigma`` of the entries are
      small (higher = sparser);
    * ``M_quant``: the mean over blocks of ``Ψ = max|x| / mean|x|`` (lower = easier to
      quantize; a block of zeros counts 1).
    """
    area = stats.area * stats.batch
    sparse = (stats.small / area >= sigma).double().mean(dim=(-1, -2))  # (O, H)
    mean = stats.mass / area
    psi = torch.where(mean > 0, stats.peak.double() / mean.clamp(min=1e-300), torch.ones_like(mean))
    return sparse.T.contiguous(), psi.mean(dim=(-1, -2)).T.contiguous()


def select_orders(m_sparse: torch.Tensor, m_quant: torch.Tensor, alpha: float) -> torch.Tensor:
    """The order choice, vectorised: int8 ``[...]`` from ``m_sparse``, ``m_quant``
    ``[..., 6]`` (the paper's metrics, :func:`order_metrics`).

    Per entry the order minimising ``alpha * S_o / sum_o S_o + (1 - alpha) * Q_o / sum_o Q_o``
    with ``S_o = 1 - M_sparse`` (lower is better; the paper's sign looks inverted) and
    ``Q_o = M_quant``; a term whose sum is 0 counts 0; NaN metrics (not measured) give the
    identity order 0; ties go to the lower id."""
    s = 1.0 - m_sparse.double()
    qm = m_quant.double()

    def norm(x):
        tot = x.sum(-1, keepdim=True)
        return torch.where(tot > 0, x / tot.clamp(min=1e-300), torch.zeros_like(x))

    score = alpha * norm(s) + (1.0 - alpha) * norm(qm)
    unmeasured = torch.isnan(score).any(-1)
    best = torch.argmin(torch.nan_to_num(score, nan=math.inf), dim=-1)
    return torch.where(unmeasured, torch.zeros_like(best), best).to(torch.int8)


def build_masks(mass: torch.Tensor, density: float, n: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Static masks from block mass: bool ``[..., nb, nb]`` and the kept share of mass
    float32 ``[...]``.

    Per entry: the last block row and column are on; then the other blocks, all full
    ``b x b`` ones, in decreasing mass (ties: lower row-major index first) until the kept
    token pairs reach ``density * n²`` (rounded to whole blocks; the forced blocks count,
    so a density below theirs keeps only them).

    Args:
        mass: ``[..., nb, nb]`` block mass (any non-negative weight) in the head's order.
        density: target fraction of the ``n x n`` video token pairs, in (0, 1].
        n: video tokens.
        block_size: block edge in tokens.
    """
    nb = mass.shape[-1]
    lead = mass.shape[:-2]
    lens = _lengths(n, block_size)
    forced = force_last_block(torch.zeros(nb, nb, dtype=torch.bool))
    forced_pairs = float((torch.outer(lens, lens) * forced).sum())
    extra = max(0, min(int(round((density * n * n - forced_pairs) / block_size**2)), int((~forced).sum())))
    flat = mass.reshape(-1, nb * nb).double()
    free = ~forced.flatten()
    keyed = torch.where(free, flat, torch.full_like(flat, -math.inf))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices[:, :extra]
    keep = forced.flatten().expand_as(flat).clone()
    keep.scatter_(1, order, True)
    total = flat.sum(-1)
    kept = torch.where(total > 0, (flat * keep).sum(-1) / total.clamp(min=1e-300), torch.ones_like(total))
    return keep.view(*lead, nb, nb), kept.float().view(lead)
