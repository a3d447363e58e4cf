"""``paro``: PAROAttention, per-head token reordering and static block masks per timestep
bin, calibrated offline; optionally INT8 attention.

PAROAttention (Zhao et al., 2025) observes that each head of a video DiT attends along
one axis of the (frames, height, width) grid more than the others, so the attention map
becomes block-concentrated once the video tokens are laid out with that axis fastest.
Offline, per (layer, head), it picks one of the six axis orders and marks heads whose
video→video attention is negligible; per (timestep bin, layer, head) it keeps the 64 x 64
blocks of the reordered map that hold the most attention mass. At inference each head's
tokens are permuted, the static block plan runs, and the output is permuted back.

Orders (ids as stored in plans; slowest axis first, ``F`` frames, ``H`` rows, ``W``
columns; frame-major ``FHW`` is the model's own order):

===  =====  ================================================================
id   order  a 64-token block holds ...
===  =====  ================================================================
0    FHW    consecutive rows of one frame (the identity)
1    FWH    consecutive columns of one frame
2    HWF    the frames of consecutive positions along a row
3    HFW    one row across consecutive frames
4    WHF    the frames of consecutive positions along a column
5    WFH    one column across consecutive frames
===  =====  ================================================================

Runtime (this file):

* Heads of a call are grouped by order; each group's video tokens are permuted once
  (``gen.attention.token_order.axis_order``) and run in one kernel call with a per-head
  plan ``[1, H_group, nb, nb]`` of the (bin, layer), built once per key by the
  compile-safe :class:`~gen.attention.plan_cache.PlanCache`, then permuted back. Text
  tokens are never permuted and follow the joint text rule of every gen method (video
  queries attend their plan's video keys plus all valid text keys, merged by
  log-sum-exp; text queries attend all valid keys).
* Timestep bins: ``bin = (step * bins) // steps``, the bin that is current *during* step
  ``step``. The authors' ``TimestepCallback`` sets ``int((i + 1) / steps * bins)`` at the
  *end* of step ``i``, for the next step, so with 50 steps and 4 bins steps 0-12, 13-24,
  25-37 and 38-49 use bins 0-3 (step 0 uses the initial bin 0). :func:`time_bin`.
* The last block row and column of every mask are on (the authors' Wan example forces
  them): every query block sees the ragged last key block, and the last query block sees
  everything.
* **Empty heads** (``empty[L, H]``, marked by calibration when a head's video→video
  attention mass is negligible): their video→video part is not computed. ``empty_head``:

  - ``"zero"``: the part is zero (log-sum-exp ``-inf``): with text, video queries attend
    only the text keys; without text (Wan self-attention) their output is exactly zero.
  - ``"uniform"``: every video key gets the same weight, the query's mean video logit:
    output ``mean_j v_j``, log-sum-exp ``scale * q · mean_j k_j + ln(Sv)`` (so the part
    keeps a mass comparable to the true one when merged with text). O(S·D) work.

  ``token_mask`` is exact for ``"zero"`` (video→video all False); for ``"uniform"`` it
  shows every video key as read (the weights, not the set of keys, differ from softmax).
* ``quant="none"`` runs the normal block-sparse dispatch (any backend);
  ``"int8"`` (INT8 Q·K, per-block scales) and ``"int8-pv"`` (INT8 P·V as well) run
  ``gen.attention.quant.quantized_block_sparse_attention`` on the permuted tokens.
* Context parallelism (Ulysses): a call holding heads ``[head_offset, head_offset + H)``
  of the model's ``num_heads`` (``AttentionContext``) uses those heads' orders and masks.

Without a plan (``plan=None``) the method runs an all-on plan in the identity order:
exactly dense attention through gen's kernels (for tests and for the ``quant`` path
alone). A run logs that once.

Where the paper is silent gen decides; the choices are documented on
:class:`ParoConfig` (``alpha``, ``density``) and in ``gen.calibrate_paro`` (empty heads,
mask threshold).

Plan file (``ParoPlan.save``/``load``, format ``gen.paro`` of
``gen.attention.plan_file``; safetensors, checksummed, tied to model, geometry and step
count):

* ``orders`` int8 ``[layers, heads]`` (ids above), ``empty`` bool ``[layers, heads]``;
* ``masks`` uint8 ``[bins, layers, heads, nb, ceil(nb / 8)]``: the bool block masks
  ``[..., nb, nb]`` (query block x key block, in the head's order) bit-packed along the key
  axis, most significant bit first (``numpy.packbits``): 8x smaller than bool (Wan 1.3B
  480p, 4 bins: 47 MB);
* ``m_sparse``, ``m_quant`` float32 ``[layers, heads, 6]``: the calibration's order
  metrics (NaN in hand-made plans), ``kept_mass`` float32 ``[bins, layers, heads]``: the
  fraction of calibrated video→video attention mass each mask keeps, ``vv_mass`` float32
  ``[layers, heads]``: the video queries' mean attention mass on video keys (1 without
  text);
* meta :class:`ParoPlanMeta` (model, geometry, steps, layers, heads, block size, bins,
  density, alpha, ...).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..context import AttentionContext
from ..dispatch import block_sparse_attention
from ..layout import TokenLayout
from ..plan import BlockPlan, block_lengths
from ..plan_cache import PlanCache
from ..plan_file import (
    CalibratedMeta,
    PlanFormat,
    call_family,
    check_call,
    check_run,
    load_plan_file,
    meta_from_json,
    save_plan_file,
)
from ..token_order import TokenPermutation, axis_order
from .base import MethodConfig, SparseMethod, check_block_size, is_int

__all__ = [
    "AXES",
    "DEFAULT_ALPHA",
    "DEFAULT_BINS",
    "DEFAULT_BLOCK",
    "DEFAULT_DENSITY",
    "ORDER_NAMES",
    "ParoAttention",
    "ParoConfig",
    "ParoPlan",
    "ParoPlanMeta",
    "force_last_block",
    "load_paro_plan",
    "order_permutation",
    "pack_masks",
    "time_bin",
    "unpack_masks",
]

logger = logging.getLogger("gen.attention")

#: order ids → names (slowest axis first) and the ``axis_order`` spelling (``t`` = frames)
ORDER_NAMES = ("FHW", "FWH", "HWF", "HFW", "WHF", "WFH")
AXES = ("thw", "twh", "hwt", "htw", "wht", "wth")
DEFAULT_BLOCK = 64
DEFAULT_BINS = 4
DEFAULT_DENSITY = 0.5
DEFAULT_ALPHA = 0.5
EMPTY_HEAD = ("zero", "uniform")
QUANT = ("none", "int8", "int8-pv")

FORMAT_VERSION = 1
PLAN_FORMAT = PlanFormat("paro", "PARO plan", FORMAT_VERSION,
                         ("orders", "empty", "masks", "m_sparse", "m_quant", "kept_mass", "vv_mass"),
                         per_step="the masks are chosen per timestep bin of this trajectory")
_HINT = PLAN_FORMAT.hint


def time_bin(step: int, steps: int, bins: int) -> int:
    """The timestep bin of denoising step ``step`` (0-based) of a ``steps``-step run:
    ``(step * bins) // steps`` (see the module docstring), clipped to ``bins - 1``."""
    return min((step * bins) // steps, bins - 1)


def order_permutation(grid: tuple[int, int, int], order: int) -> TokenPermutation:
    """The video-token permutation of order id ``order`` (0-5) on a ``(F, H, W)`` grid:
    slot ``i`` holds frame-major token ``index[i]``."""
    if not is_int(order) or order >= len(AXES):
        raise ValueError(f"order ids are 0-5 ({', '.join(ORDER_NAMES)}), got {order!r}.")
    return axis_order(tuple(grid), AXES[order])


def force_last_block(masks: torch.Tensor) -> torch.Tensor:
    """``masks [..., nb, nb]`` with the last block row and column on (a copy)."""
    masks = masks.clone()
    masks[..., -1, :] = True
    masks[..., :, -1] = True
    return masks


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., nb, nb]`` → uint8 ``[..., nb, ceil(nb / 8)]`` (bits along the key axis,
    most significant first)."""
    return torch.from_numpy(np.packbits(masks.cpu().numpy().astype(bool), axis=-1))


def unpack_masks(packed: torch.Tensor, nb: int) -> torch.Tensor:
    """Inverse of :func:`pack_masks`: bool ``[..., nb, nb]``."""
    return torch.from_numpy(np.unpackbits(packed.cpu().numpy(), axis=-1, count=nb).astype(bool))


# -- plans ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ParoPlanMeta(CalibratedMeta):
    """What a PARO plan was made for and with (the header of a plan file): the fields of
    :class:`~gen.attention.plan_file.CalibratedMeta` (model, family, token grid, steps,
    layers, heads, geometry, calibration runs), plus:

    Args:
        block_size: block edge in tokens (query and key blocks).
        bins: timestep bins.
        density: the target video→video block density of the masks (calibration).
        alpha: the order-selection weight used (None: hand-made).
        eps, sigma: the sparse-block test of the order metric (an entry is small below
            ``eps``; a block is sparse when at least ``sigma`` of its entries are).
        empty_mass: heads with a video→video mass below it were marked empty.
    """

    block_size: int = DEFAULT_BLOCK
    bins: int = DEFAULT_BINS
    density: float = 1.0
    alpha: float | None = None
    eps: float = 1e-3
    sigma: float = 0.9
    empty_mass: float = 0.0
    format_version: int = FORMAT_VERSION

    @property
    def n_blocks(self) -> int:
        """Blocks per side of a mask (video tokens, ragged last block)."""
        return -(-self.layout.video_len // self.block_size)

    @classmethod
    def from_json(cls, text: str) -> ParoPlanMeta:
        return meta_from_json(cls, text)


@dataclass(frozen=True, eq=False)
class ParoPlan:
    """A PARO plan: per (layer, head) an order and an empty flag, per (bin, layer, head) a
    block mask, and what it was made for (see the module docstring for the tensors).

    Build one with ``gen.calibrate_paro.calibrate_paro``, :meth:`load`, or
    :meth:`from_masks` (by hand, e.g. in tests). Equality is identity.
    """

    orders: torch.Tensor
    empty: torch.Tensor
    masks: torch.Tensor
    m_sparse: torch.Tensor
    m_quant: torch.Tensor
    kept_mass: torch.Tensor
    vv_mass: torch.Tensor
    meta: ParoPlanMeta
    source: str = field(default="<in-memory plan>")

    def __post_init__(self) -> None:
        self._validate()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_masks(cls, orders, masks: torch.Tensor, layout: TokenLayout, *, empty=None, model: str = "custom",
                   family: str | None = None, head_dim: int | None = None, block_size: int = DEFAULT_BLOCK,
                   steps: int | None = None, **meta) -> ParoPlan:
        """A plan from order ids ``[layers, heads]`` and bool block masks
        ``[bins, layers, heads, nb, nb]`` (each in its head's order) for calls of
        ``layout``. The last block row and column are switched on. ``empty`` bool
        ``[layers, heads]`` (default none); ``steps`` defaults to ``bins``; the density
        recorded is the masks' mean; extra keywords go to :class:`ParoPlanMeta`."""
        o = torch.as_tensor(orders).to(torch.int8)
        m = torch.as_tensor(masks).bool()
        if o.dim() != 2:
            raise ValueError(f"orders must be [layers, heads], got shape {tuple(o.shape)}.")
        if m.dim() != 5 or tuple(m.shape[1:3]) != tuple(o.shape):
            raise ValueError(f"masks must be [bins, layers, heads, nb, nb] with layers, heads = {tuple(o.shape)}, "
                             f"got shape {tuple(m.shape)}.")
        m = force_last_block(m)
        bins, layers, heads = m.shape[:3]
        e = torch.zeros(layers, heads, dtype=torch.bool) if empty is None else torch.as_tensor(empty).bool()
        family = family or call_family(layout)
        nan = float("nan")
        lens = block_lengths(layout.video_len, block_size)
        dens = float(torch.einsum("blhqk,q,k->", m.double(), lens, lens) / (m[..., 0, 0].numel() * layout.video_len**2))
        meta.setdefault("density", dens)
        info = ParoPlanMeta(model=model, family=family, grid=layout.grid, text_len=layout.text_len,
                            text_first=layout.text_first, steps=bins if steps is None else steps, layers=layers,
                            heads=heads, head_dim=head_dim, block_size=block_size, bins=bins, **meta)
        return cls(o.contiguous(), e.contiguous(), pack_masks(m), torch.full((layers, heads, 6), nan),
                   torch.full((layers, heads, 6), nan), torch.full((bins, layers, heads), nan),
                   torch.ones(layers, heads), info)

    def _validate(self) -> None:
        meta, where = self.meta, self.source
        if not isinstance(meta, ParoPlanMeta):
            raise ValueError(f"{where}: meta must be a ParoPlanMeta.")
        check_block_size(meta.block_size)
        if not is_int(meta.bins, 1) or not is_int(meta.steps, 1) or meta.bins > meta.steps:
            raise ValueError(f"{where}: bins must be an int in [1, steps={meta.steps}], got {meta.bins!r}.")
        if meta.family not in ("wan", "hunyuan", "flux"):
            raise ValueError(f"{where}: family must be 'wan', 'hunyuan' or 'flux', got {meta.family!r}.")
        lh = (meta.layers, meta.heads)
        nb = meta.n_blocks
        want = {
            "orders": (torch.int8, lh), "empty": (torch.bool, lh),
            "masks": (torch.uint8, (meta.bins, *lh, nb, -(-nb // 8))),
            "m_sparse": (torch.float32, (*lh, 6)), "m_quant": (torch.float32, (*lh, 6)),
            "kept_mass": (torch.float32, (meta.bins, *lh)), "vv_mass": (torch.float32, lh),
        }
        for name, (dtype, shape) in want.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{where}: {name} must be {str(dtype).removeprefix('torch.')} {list(shape)}, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}.")
        if self.orders.numel() and (int(self.orders.min()) < 0 or int(self.orders.max()) >= len(AXES)):
            raise ValueError(f"{where}: order ids must lie in [0, 5].")

    # -- files ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in PLAN_FORMAT.tensors}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan (format ``gen.paro``; see the module docstring). Not atomic by
        itself: calibration writes through ``gen._io.atomic_path``."""
        return save_plan_file(path, PLAN_FORMAT, self.tensors(), self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ParoPlan:
        """Read a plan file; ``ValueError`` saying what to do when it is missing, truncated,
        corrupt, tampered with, not a PARO plan, or of a newer format."""
        tensors, meta = load_plan_file(path, PLAN_FORMAT, ParoPlanMeta.from_json)
        try:
            return cls(**tensors, meta=meta, source=str(path))
        except ValueError as err:
            raise ValueError(f"{err} Make it again with `{_HINT}`.") from None

    def with_source(self, source: str) -> ParoPlan:
        return dataclasses.replace(self, source=source)

    # -- checks ---------------------------------------------------------------------------
    def check(self, *, model: str | None = None, height: int | None = None, width: int | None = None,
              frames: int | None = None, steps: int | None = None) -> ParoPlan:
        """Refuse (``ValueError``) another model, geometry or step count (None: not
        checked); returns the plan."""
        check_run(self.meta, PLAN_FORMAT, self.source, model=model, height=height, width=width, frames=frames,
                  steps=steps)
        return self

    def check_call(self, layout: TokenLayout, num_heads: int, head_dim: int | None,
                   ctx: AttentionContext) -> tuple[int, int]:
        """Check a call (``num_heads``: the model's); returns ``(bin, layer)``."""
        step, layer = check_call(self.meta, PLAN_FORMAT, self.source, layout, num_heads, head_dim, ctx)
        return time_bin(step, self.meta.steps, self.meta.bins), layer

    # -- views ----------------------------------------------------------------------------
    def mask(self, bin_: int, layer: int) -> torch.Tensor:
        """Bool ``[heads, nb, nb]`` block masks of one (bin, layer), each in its head's order."""
        return unpack_masks(self.masks[bin_, layer], self.meta.n_blocks)

    def all_masks(self) -> torch.Tensor:
        """Bool ``[bins, layers, heads, nb, nb]`` (O(bins·layers·heads·nb²) bytes)."""
        return unpack_masks(self.masks, self.meta.n_blocks)

    def video_density(self) -> torch.Tensor:
        """float64 ``[bins, layers, heads]``: video→video token-pair density of each mask
        (ragged blocks at their true size); empty heads 0 (their part is not computed)."""
        n, b = self.meta.layout.video_len, self.meta.block_size
        lens = block_lengths(n, b)
        dens = torch.einsum("blhqk,q,k->blh", self.all_masks().double(), lens, lens) / n**2
        return torch.where(self.empty.unsqueeze(0), torch.zeros_like(dens), dens)

    def call_density(self) -> torch.Tensor:
        """float64 ``[bins, layers, heads]``: fraction of a call's query-key pairs computed,
        text included (text rows attend everything, video rows all text keys)."""
        lay = self.meta.layout
        sv, st, s = lay.video_len, lay.text_len, lay.seq_len
        return (self.video_density() * sv * sv + sv * st + st * s) / (s * s)

    def order_shares(self) -> dict[str, float]:
        """Fraction of (layer, head) entries per order (empty heads included)."""
        total = max(1, self.orders.numel())
        return {name: float((self.orders == i).sum()) / total for i, name in enumerate(ORDER_NAMES)}

    def __repr__(self) -> str:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in self.order_shares().items() if v)
        return (f"ParoPlan({self.meta.model}, {self.meta.geometry()}, steps={self.meta.steps}, "
                f"bins={self.meta.bins}, layers={self.meta.layers}, heads={self.meta.heads}, "
                f"block={self.meta.block_size}: orders {shares}; empty {int(self.empty.sum())}; "
                f"video density {float(self.video_density().mean()):.3f})")


def load_paro_plan(path: str | os.PathLike, *, model: str | None = None, height: int | None = None,
                   width: int | None = None, frames: int | None = None, steps: int | None = None) -> ParoPlan:
    """:meth:`ParoPlan.load` then :meth:`ParoPlan.check` against the given run."""
    return ParoPlan.load(path).check(model=model, height=height, width=width, frames=frames, steps=steps)


# -- config and method ------------------------------------------------------------------
@dataclass(frozen=True)
class ParoConfig(MethodConfig):
    """Config of ``paro``.

    Args:
        plan: a calibrated plan: a path to a plan file (``--set plan=PATH``) or a
            :class:`ParoPlan` (Python). ``None``: an all-on plan in the identity order,
            i.e. dense attention (tests, or ``quant`` alone).
        bins: timestep bins. ``None``: the plan's when running, 4 (the authors' Wan) when
            calibrating.
        density: the target video→video density of the masks, a fraction in (0, 1]; the
            calibration keeps, per (bin, layer, head), the blocks with the most attention
            mass until this share of the token pairs (the forced last row and column
            included) is reached. ``None``: the plan's when running, 0.5 when calibrating
            (the paper's main setting: CogVideoX PSNR 29.14 at 0.5, 22.89 at 0.3). A run
            cannot re-threshold a plan (it stores masks, not block sums).
        alpha: the order-selection weight of the calibration, in [0, 1]: per (layer, head)
            the order minimising ``alpha * S_o / sum(S) + (1 - alpha) * Q_o / sum(Q)``, with
            ``S_o = 1 - M_sparse`` (the share of blocks that are *not* sparse: the paper's
            sign looks inverted, lower must be better) and ``Q_o = M_quant`` (mean block
            ``max|x| / mean|x|``). The paper does not report it; ``None``: the plan's when
            running, 0.5 when calibrating (both terms count equally; each is normalised over
            the six orders). 1 optimises sparsity alone (best for ``quant="none"``), 0
            quantization alone.
        block_size: block edge in tokens, a power of two in [16, 256]. ``None``: the plan's,
            or 64 (the paper's, a kernel tile) when calibrating.
        empty_head: what an empty head's video→video part gives: ``"zero"`` (the authors'
            default) or ``"uniform"`` (see the module docstring).
        quant: ``"none"`` (the block-sparse kernels at the input precision), ``"int8"``
            (INT8 Q·K with per-block scales, V and P·V in 16/32-bit) or ``"int8-pv"`` (INT8
            P·V too), through ``gen.attention.quant``.

    ``bins``, ``density``, ``alpha`` and ``block_size`` describe how a plan is made: a run
    takes them from its plan, and one set here that differs from the plan's is refused.
    ``dense_steps``/``dense_layers`` run the model's stock attention on top of the plan.
    """

    plan: str | ParoPlan | None = None
    bins: int | None = None
    density: float | None = None
    alpha: float | None = None
    block_size: int | None = None
    empty_head: str = "zero"
    quant: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        plan = self.plan
        if isinstance(plan, os.PathLike):
            object.__setattr__(self, "plan", os.fspath(plan))
        elif plan is not None and not isinstance(plan, (str, ParoPlan)):
            raise ValueError(f"plan must be a path to a plan file or a ParoPlan, got {type(plan).__name__}.")
        if self.bins is not None and not is_int(self.bins, 1):
            raise ValueError(f"bins must be an int >= 1 (timestep bins) or None, got {self.bins!r}.")
        d = self.density
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1):
            raise ValueError(f"density must be a fraction in (0, 1] or None, got {d!r}.")
        a = self.alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1):
            raise ValueError(f"alpha must be a number in [0, 1] or None, got {a!r}.")
        if self.block_size is not None:
            check_block_size(self.block_size)
        if self.empty_head not in EMPTY_HEAD:
            raise ValueError(f"empty_head must be one of {', '.join(EMPTY_HEAD)}, got {self.empty_head!r}.")
        if self.quant not in QUANT:
            raise ValueError(f"quant must be one of {', '.join(QUANT)}, got {self.quant!r}.")


def _quantized():
    """``gen.attention.quant.quantized_block_sparse_attention``, imported on first use."""
    try:
        from ..quant import quantized_block_sparse_attention
    except ImportError as err:
        raise ValueError(
            f"quant='int8'/'int8-pv' needs gen.attention.quant, which this gen cannot import ({err}); "
            "run with quant='none'."
        ) from None
    return quantized_block_sparse_attention


class ParoAttention(SparseMethod):
    """Runs a PARO plan: per call, the (bin, layer)'s heads grouped by token order, one
    kernel call per group, empty heads zero or uniform. See the module docstring."""

    name = "paro"
    config_cls = ParoConfig
    families = ("wan", "hunyuan", "flux")
    summary = "PAROAttention: per-head axis reordering, static block masks per timestep bin, optional INT8"

    def __init__(self, config: ParoConfig | None = None, *, model: str | None = None) -> None:
        super().__init__(config, model=model)
        self.paro_plan: ParoPlan | None = self._load_plan()
        if self.paro_plan is not None and model is not None:
            self.paro_plan.check(model=model)  # a plan for another model with the same shapes
        if self.paro_plan is not None:
            self._head_orders: list[list[int]] = self.paro_plan.orders.tolist()
            self._head_empty: list[list[bool]] = self.paro_plan.empty.tolist()
        self._group_plans = PlanCache(self._build_group_plan)
        self._all_on = PlanCache(self._build_all_on)
        self._perms: dict[tuple, TokenPermutation] = {}
        self._head_index: dict[tuple, torch.Tensor] = {}
        self._warned = False

    @property
    def calibrated_steps(self) -> int | None:
        return None if self.paro_plan is None else self.paro_plan.meta.steps

    def _load_plan(self) -> ParoPlan | None:
        cfg = self.config
        if cfg.plan is None:
            if cfg.density is not None and cfg.density < 1:
                raise ValueError(
                    f"density={cfg.density} needs a calibrated plan: paro's masks come from an offline "
                    f"calibration (`{_HINT} --density {cfg.density}`), then `--set plan=PLAN`."
                )
            return None
        plan = cfg.plan if isinstance(cfg.plan, ParoPlan) else ParoPlan.load(cfg.plan)
        for name in ("bins", "density", "alpha", "block_size"):
            mine, theirs = getattr(cfg, name), getattr(plan.meta, name)
            same = mine == theirs or (theirs is not None and math.isclose(mine, theirs)) if mine is not None else True
            if not same:
                raise ValueError(
                    f"{name}={mine} differs from the plan's {name}={theirs}: a run uses the masks its plan "
                    f"was calibrated with. Drop {name}, or calibrate with it (`{_HINT} --{name.replace('_', '-')} "
                    f"{mine}`)."
                )
        return plan

    def __repr__(self) -> str:
        plan = self.paro_plan
        extra = f", empty_head={self.config.empty_head!r}, quant={self.config.quant!r}"
        return f"ParoAttention({plan!r}{extra})" if plan is not None else super().__repr__()

    @property
    def needs_step(self) -> bool:
        return self.paro_plan is not None or self.config.dense_steps > 0

    # -- per-call data ----------------------------------------------------------------------
    def locate(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext,
               head_dim: int | None = None) -> tuple[int, int, list[int], list[bool]]:
        """``(bin, layer, orders, empty)`` of a call holding ``num_heads`` heads (from
        ``ctx.head_offset`` among ``ctx.num_heads`` under context parallelism), after
        checking the call against the plan."""
        offset, total = ctx.heads_of(num_heads)
        bin_, layer = self.paro_plan.check_call(layout, total, head_dim, ctx)
        orders = self._head_orders[layer][offset:offset + num_heads]
        empty = self._head_empty[layer][offset:offset + num_heads]
        return bin_, layer, orders, empty

    def _index(self, heads, device: torch.device) -> torch.Tensor:
        key = (tuple(heads), str(device))
        if key not in self._head_index:
            self._head_index[key] = torch.tensor(heads, dtype=torch.long, device=device)
        return self._head_index[key]

    def permutation(self, layout: TokenLayout, order: int) -> TokenPermutation | None:
        """The video-token permutation of ``order`` at ``layout`` (None for the identity)."""
        if order == 0:
            return None
        key = (layout.grid, order)
        if key not in self._perms:
            self._perms[key] = order_permutation(layout.grid, order)
        return self._perms[key]

    def _build_all_on(self, key: tuple) -> BlockPlan:
        n, device = key
        # as `dense`: 128x64 tiles suit the GPU kernel, 64x64 the CPU ones
        bm, bn = (128, 64) if torch.device(device).type == "cuda" else (DEFAULT_BLOCK, DEFAULT_BLOCK)
        return BlockPlan.dense(n, n, bm, bn, device=device)

    def _build_group_plan(self, key: tuple) -> BlockPlan:
        bin_, layer, heads, n, device = key
        b = self.paro_plan.meta.block_size
        mask = self.paro_plan.mask(bin_, layer)[list(heads)]
        return BlockPlan.from_block_mask(mask.unsqueeze(0), b, b, n, n).to(device)

    def group_plan(self, bin_: int, layer: int, heads, n: int, device) -> BlockPlan:
        """Plan ``[1, len(heads), nb, nb]`` of model heads ``heads`` at (bin, layer), in
        their (common) order; cached, compile-safe."""
        return self._group_plans.get((bin_, layer, tuple(heads), n, str(torch.device(device))))

    # -- attention ---------------------------------------------------------------------------
    def _kernel(self, q, k, v, plan: BlockPlan, perm: TokenPermutation | None, need_lse: bool):
        """One block-sparse call on ``(B, H, Sv, D)`` in frame-major order with ``plan``
        over ``perm``'s slots; ``(out, lse | None)`` in frame-major order."""
        backend = self.config.backend
        if self.config.quant == "none":
            if need_lse:
                return block_sparse_attention(q, k, v, plan, return_lse=True, backend=backend, token_order=perm)
            return block_sparse_attention(q, k, v, plan, backend=backend, token_order=perm), None
        run = _quantized()
        if perm is not None:
            q, k, v = (perm.apply(x, dim=2) for x in (q, k, v))
        res = run(q, k, v, plan, quant=self.config.quant, return_lse=need_lse, backend=backend)
        out, lse = res if need_lse else (res, None)
        if perm is not None:
            out = perm.invert(out, dim=2)
            lse = None if lse is None else perm.invert(lse.unsqueeze(-1), dim=2).squeeze(-1)
        return out, lse

    def _empty_part(self, q, k, v, need_lse: bool):
        """The video→video part of empty heads: ``(out, lse)`` per ``empty_head``."""
        if self.config.empty_head == "zero":
            out = torch.zeros_like(q)
            lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device) if need_lse else None
            return out, lse
        n = k.shape[2]
        out = v.float().mean(dim=2, keepdim=True).expand(-1, -1, q.shape[2], -1).to(v.dtype)
        lse = None
        if need_lse:
            k_mean = k.float().mean(dim=2)  # (B, H, D)
            lse = torch.einsum("bhsd,bhd->bhs", q.float(), k_mean) * q.shape[-1] ** -0.5 + math.log(n)
        return out, lse

    def video_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                        ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Video queries against video keys, ``(B, H, Sv, D)`` in frame-major order: one
        kernel call per order present among the non-empty heads."""
        n, need_lse = layout.video_len, ctx.need_lse
        if self.paro_plan is None:
            if not self._warned and not torch.compiler.is_compiling():
                self._warned = True
                logger.info("paro without plan= runs an all-on plan (dense attention); calibrate one with `%s`.",
                            _HINT)
            return self._kernel(q, k, v, self._all_on.get((n, str(q.device))), None, need_lse)
        heads = q.shape[1]
        bin_, layer, orders, empty = self.locate(layout, heads, ctx, q.shape[-1])
        offset = ctx.head_offset
        groups: dict[int, list[int]] = {}
        for h in range(heads):
            groups.setdefault(-1 if empty[h] else int(orders[h]), []).append(h)
        out = lse = None
        for key in sorted(groups):
            members = groups[key]
            whole = len(members) == heads
            if whole:
                qg, kg, vg = q, k, v
            else:
                idx = self._index(members, q.device)
                qg, kg, vg = (x.index_select(1, idx) for x in (q, k, v))
            if key < 0:
                o, lg = self._empty_part(qg, kg, vg, need_lse)
            else:
                plan = self.group_plan(bin_, layer, [offset + h for h in members], n, q.device)
                o, lg = self._kernel(qg, kg, vg, plan, self.permutation(layout, key), need_lse)
            if whole:
                return o, lg
            if out is None:
                out = torch.empty_like(q)
                lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if need_lse else None
            out.index_copy_(1, idx, o.to(out.dtype))
            if need_lse:
                lse.index_copy_(1, idx, lg.float())
        return out, lse

    # -- for tests, pictures and summaries ------------------------------------------------------
    def _ctx(self, ctx: AttentionContext | None) -> AttentionContext:
        if self.paro_plan is not None and (ctx is None or ctx.step_index is None or ctx.layer_index is None):
            raise ValueError("paro's masks depend on the step and layer: pass "
                             "ctx=AttentionContext(step_index=..., layer_index=...).")
        return ctx or AttentionContext()

    def plan(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None, *,
             q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> BlockPlan:
        """Per-head plan ``[1, H, nb, nb]`` of the call's (bin, layer), each head in its own
        order (what the kernel walks: empty heads visit nothing). Without a plan: the
        all-on plan ``[1, 1, nb, nb]``. For pictures and tests."""
        device = q.device if q is not None else torch.device("cpu")
        n = layout.video_len
        if self.paro_plan is None:
            b = DEFAULT_BLOCK if self.config.block_size is None else self.config.block_size
            return BlockPlan.dense(n, n, b, b, device=device)
        ctx = self._ctx(ctx)
        bin_, layer, _, empty = self.locate(layout, num_heads, ctx)
        b = self.paro_plan.meta.block_size
        off = ctx.head_offset
        mask = self.paro_plan.mask(bin_, layer)[off:off + num_heads].clone()
        mask[torch.tensor(empty, dtype=torch.bool)] = False
        return BlockPlan.from_block_mask(mask.unsqueeze(0), b, b, n, n).to(device)

    def video_token_mask(self, layout: TokenLayout, num_heads: int,
                         ctx: AttentionContext | None = None) -> torch.Tensor:
        """Bool ``(H, Sv, Sv)`` (``(1, Sv, Sv)`` without a plan) in frame-major order:
        each head's mask mapped back from its order; empty heads: none (``"zero"``) or
        every video key (``"uniform"``)."""
        plan = self.plan(layout, num_heads, ctx)
        mask = plan.to_token_mask()[0]
        if self.paro_plan is None:
            return mask
        _, _, orders, empty = self.locate(layout, num_heads, ctx)
        for h, order in enumerate(orders):
            if empty[h]:
                mask[h] = self.config.empty_head == "uniform"
                continue
            perm = self.permutation(layout, order)
            if perm is not None:
                inv = perm.inverse
                mask[h] = mask[h][inv][:, inv]
        return mask

    def density(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None) -> float:
        """Fraction of the call's query-key pairs computed (text included) at the (step,
        layer) of ``ctx``; without one, the mean over the run (steps weighted by their bin,
        the scheduled dense steps and layers counted as 1). Empty heads compute no
        video→video pairs."""
        plan = self.paro_plan
        if plan is None:
            return 1.0
        dens = plan.call_density()  # [bins, layers, heads]
        if ctx is not None and ctx.step_index is not None and ctx.layer_index is not None:
            if self.is_dense(ctx):
                return 1.0
            bin_, layer, _, _ = self.locate(layout, num_heads, ctx)
            off = ctx.head_offset
            return float(dens[bin_, layer, off:off + num_heads].mean())
        steps = plan.meta.steps
        per_step = torch.stack([dens[time_bin(s, steps, plan.meta.bins)].mean(-1) for s in range(steps)])
        dense = torch.zeros(steps, plan.meta.layers, dtype=torch.bool)
        dense |= (torch.arange(steps) < self.config.dense_steps).unsqueeze(1)
        for layer in range(plan.meta.layers):
            dense[:, layer] |= self.is_dense_layer(layer)
        return float(torch.where(dense, torch.ones_like(per_step), per_step).mean())

    def head_orders(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None) -> list[dict]:
        """Per head of the call: ``{"head", "order", "order_id", "empty", "density"}``
        (density: the head's video→video block density in its order; empty heads 0), for
        pictures (``gen masks``) and the demo."""
        plan = self.plan(layout, num_heads, ctx)
        dens = plan.density_per_head()[0].tolist()
        if self.paro_plan is None:
            return [dict(head=h, order="FHW", order_id=0, empty=False, density=dens[0]) for h in range(num_heads)]
        ctx = self._ctx(ctx)
        _, _, orders, empty = self.locate(layout, num_heads, ctx)
        return [dict(head=ctx.head_offset + h, order=ORDER_NAMES[o], order_id=int(o), empty=bool(e), density=d)
                for h, (o, e, d) in enumerate(zip(orders, empty, dens))]

    def save_plan_picture(self, path: str | os.PathLike, layout: TokenLayout, num_heads: int,
                          ctx: AttentionContext | None = None, *, title: str | None = None) -> Path:
        """A PNG of every head's block mask of the call, each in its own token order, titled
        with the head's order (and ``empty``) and density: what ``gen masks`` can show
        for paro beside the one-head picture."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from gen._io import atomic_path

        masks = self.plan(layout, num_heads, ctx).to_block_mask()[0].float().numpy()
        info = self.head_orders(layout, num_heads, ctx)
        cols = min(len(info), 4)
        rows = -(-len(info) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows + 0.4), dpi=110, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, head in enumerate(info):
            ax = axes.flat[i]
            ax.imshow(masks[min(i, masks.shape[0] - 1)], cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            label = "empty" if head["empty"] else f"{head['density']:.2f}"
            ax.set_title(f"head {head['head']}: {head['order']} ({label})", fontsize=8)
        fig.suptitle(title or f"paro: {layout}", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return path
