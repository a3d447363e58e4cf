"""``sparse-vdit``: Sparse-vDiT, one of five attention modes per (step, layer, head),
chosen offline by a search over a real denoising run.

Sparse-vDiT (Chen et al., 2025; no code released) observes that each head of a video
DiT keeps one of a few attention shapes along the trajectory, so it picks per head the
cheapest shape that approximates full attention well enough, once, offline, and runs
that choice at inference. The five modes (full, skip, window, multi-diagonal, vertical
stripes), their parameters and the search's rule are ``sparse_vdit_modes.py``; this
file holds the plan file and the method that runs a plan; the search itself runs a
pipeline and lives in ``gen.calibrate`` (``gen calibrate sparse-vdit``).

Heads of one layer that share a mode run in one kernel call (gathered heads, the
mode's plan broadcast over them, or per head ``[1, H_group, nq, n]`` for stripes);
multi-diagonal heads are permuted to ``"hwt"`` order and back around their call.

Where the paper is silent, gen decides:

* **Text (HunyuanVideo)**: the joint rule of every gen method: video queries attend
  their mode's video keys plus all valid text keys, text queries attend all valid keys,
  in every mode. Modes and their sparsity are about video x video blocks only.
* **Skip with text**: a skipped head gives zero on its video queries (no text keys
  either, as the paper's skipped head outputs zeros), while its text queries still
  attend all keys (text is never approximated; they are ``text_len / seq_len`` of the
  rows, 256 / 119 056 on HunyuanVideo 720p). Measured on tiny-hunyuan (2 prompts x 3
  steps): zero has mean normalised error 1.00 against full attention; the alternative,
  video queries attending only the text keys, 10.3 (a few valid text tokens dominate).
* **Families**: Wan and HunyuanVideo. FLUX has one frame, where the multi-diagonal
  mode is undefined and the paper's premise (frame structure) does not apply.

Plan file (``SparseVDiTPlan.save``/``load``), in the format every calibrated method
shares (``gen.attention.plan_file``): safetensors (no pickle; loads without running
code) with the tensors

* ``modes`` int8 ``[steps, layers, heads]`` (ids above),
* ``stripes`` int32 ``[steps, layers, heads, n_stripes]``, ascending key-block indices
  (the calibrated columns of every head, also of heads that chose another mode),
* ``errors`` float32 ``[steps, layers, heads, 5]``, the normalised error of each mode
  (NaN where the search did not run: scheduled dense steps/layers),

and the header metadata ``format`` (``"gen.sparse-vdit"``), ``meta`` (JSON of
:class:`PlanMeta`: model, family, pixels and frames, steps, token grid, text length,
layers, heads, head dim, block size, mode parameters, ``lam``/``eps``, prompts, seed,
format and gen versions) and ``sha256`` (of the tensor bytes, so any corruption is
caught, not only truncation). Loading refuses a file that is truncated, corrupt, not a
plan or of a newer format; a run refuses a plan made for another model, geometry or
number of steps, each with a message that says what to do.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..context import AttentionContext
from ..dispatch import block_sparse_attention
from ..layout import TokenLayout
from ..plan import BlockPlan
from ..plan_cache import PlanCache
from ..plan_file import (
    CalibratedMeta,
    PlanFormat,
    call_family,
    check_call,
    check_run,
    load_plan_file,
    meta_from_json,
    meta_to_json,
    save_plan_file,
    steps_message,
)
from ..token_order import TokenPermutation
from .base import MethodConfig, SparseMethod, check_block_size, is_int
from .sparse_vdit_modes import (
    DIAGONAL,
    FULL,
    MODE_NAMES,
    SKIP,
    STRIPE,
    WINDOW,
    ModeParams,
    band_mask,
    hwt_order,
    key_block_mass,
    mode_sparsity,
    resolve_params,
    select_modes,
    top_stripes,
)

__all__ = [
    "DIAGONAL",
    "FULL",
    "MODE_NAMES",
    "ModeParams",
    "PlanMeta",
    "SKIP",
    "STRIPE",
    "SparseVDiTAttention",
    "SparseVDiTConfig",
    "SparseVDiTPlan",
    "WINDOW",
    "key_block_mass",
    "load_plan",
    "resolve_params",
    "select_modes",
    "top_stripes",
]

FORMAT_VERSION = 1
#: the plan file (``gen.attention.plan_file``): tensors in checksum order
PLAN_FORMAT = PlanFormat("sparse-vdit", "Sparse-vDiT plan", FORMAT_VERSION, ("modes", "stripes", "errors"),
                         per_step="the modes are chosen per step")
FORMAT = PLAN_FORMAT.tag
_EXTRAS_KEY = "sparse_vdit_assignment"
_CALIBRATE_HINT = PLAN_FORMAT.hint


# -- plans ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PlanMeta(CalibratedMeta):
    """What a Sparse-vDiT plan was made for and with (the header of a plan file): the
    fields of :class:`~gen.attention.plan_file.CalibratedMeta` (model, family ``"wan"`` or
    ``"hunyuan"``, token grid, steps, layers, heads, geometry, calibration runs), plus:

    Args:
        block_size, window, diagonal, stripes: the mode parameters (:class:`ModeParams`).
        lam, eps: the search's cost weight and threshold.
    """

    block_size: int
    window: int
    diagonal: int
    stripes: int
    lam: float = 0.5
    eps: float = 1.0
    format_version: int = FORMAT_VERSION

    @property
    def params(self) -> ModeParams:
        return ModeParams(self.block_size, self.window, self.diagonal, self.stripes)

    def to_json(self) -> str:
        return meta_to_json(self)

    @classmethod
    def from_json(cls, text: str) -> PlanMeta:
        return meta_from_json(cls, text)


@dataclass(frozen=True, eq=False)
class SparseVDiTPlan:
    """A Sparse-vDiT plan: the mode of every (step, layer, head) and what it was made for.

    Args:
        modes: int8 ``[steps, layers, heads]``, mode ids (``FULL`` ... ``STRIPE``).
        stripes: int32 ``[steps, layers, heads, n_stripes]``, ascending key-block indices.
        errors: float32 ``[steps, layers, heads, 5]``, the search's normalised error per
            mode (NaN: not measured).
        meta: :class:`PlanMeta`.
        source: where it was loaded from (for messages; not saved).

    Build one with ``gen.calibrate`` (the search), :meth:`load`, or :meth:`from_modes`
    (by hand, e.g. in tests). Equality is identity.
    """

    modes: torch.Tensor
    stripes: torch.Tensor
    errors: torch.Tensor
    meta: PlanMeta
    source: str = field(default="<in-memory plan>")

    def __post_init__(self) -> None:
        self._validate()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_modes(cls, modes, layout: TokenLayout, *, stripes=None, model: str = "custom",
                   family: str | None = None, head_dim: int | None = None, block_size: int | None = None,
                   window: int | None = None, diagonal: int | None = None, n_stripes: int | None = None,
                   **meta) -> SparseVDiTPlan:
        """A plan from a mode array ``[steps, layers, heads]`` (ints or mode names are
        fine as nested lists) for calls of ``layout``.

        ``stripes`` int ``[steps, layers, heads, n]`` gives the stripe columns (default:
        the first ``n`` key blocks); the mode parameters default as in
        :func:`resolve_params`. Extra keywords go to :class:`PlanMeta`.
        """
        if isinstance(modes, torch.Tensor):
            m = modes.to(torch.int8)
        else:
            def ids(x):
                if isinstance(x, (list, tuple)):
                    return [ids(y) for y in x]
                return MODE_NAMES.index(x) if isinstance(x, str) else int(x)

            m = torch.tensor(ids(modes), dtype=torch.int8)
        if m.dim() != 3:
            raise ValueError(f"modes must be [steps, layers, heads], got shape {tuple(m.shape)}.")
        if stripes is not None:
            n_stripes = torch.as_tensor(stripes).shape[-1]
        p = resolve_params(layout, block_size, window, diagonal, n_stripes)
        if stripes is None:
            stripes = torch.arange(p.stripes, dtype=torch.int32).expand(*m.shape, p.stripes)
        stripes = torch.as_tensor(stripes).to(torch.int32).contiguous()
        family = family or call_family(layout)
        errors = torch.full((*m.shape, 5), float("nan"), dtype=torch.float32)
        meta_obj = PlanMeta(model=model, family=family, grid=layout.grid, text_len=layout.text_len,
                            text_first=layout.text_first, steps=m.shape[0], layers=m.shape[1],
                            heads=m.shape[2], head_dim=head_dim, **p.as_dict(), **meta)
        return cls(m.contiguous(), stripes, errors, meta_obj)

    def _validate(self) -> None:
        m, s, e, meta = self.modes, self.stripes, self.errors, self.meta
        where = self.source
        if not isinstance(meta, PlanMeta):
            raise ValueError(f"{where}: meta must be a PlanMeta.")
        shape = (meta.steps, meta.layers, meta.heads)
        if not isinstance(m, torch.Tensor) or m.dtype != torch.int8 or tuple(m.shape) != shape:
            raise ValueError(f"{where}: modes must be int8 {list(shape)}, got "
                             f"{getattr(m, 'dtype', type(m).__name__)} {list(getattr(m, 'shape', []))}.")
        if m.numel() and (int(m.min()) < 0 or int(m.max()) >= len(MODE_NAMES)):
            raise ValueError(f"{where}: mode ids must lie in [0, {len(MODE_NAMES) - 1}].")
        if not isinstance(s, torch.Tensor) or s.dtype != torch.int32 or tuple(s.shape) != (*shape, meta.stripes):
            raise ValueError(f"{where}: stripes must be int32 {[*shape, meta.stripes]}, got "
                             f"{getattr(s, 'dtype', None)} {list(getattr(s, 'shape', []))}.")
        nb = -(-meta.layout.video_len // meta.block_size)
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= nb or
                          (meta.stripes > 1 and bool((s[..., 1:] <= s[..., :-1]).any()))):
            raise ValueError(f"{where}: stripe columns must be ascending key-block indices in [0, {nb}).")
        if not isinstance(e, torch.Tensor) or e.dtype != torch.float32 or tuple(e.shape) != (*shape, 5):
            raise ValueError(f"{where}: errors must be float32 {[*shape, 5]}.")
        if meta.family not in ("wan", "hunyuan"):
            raise ValueError(f"{where}: family must be 'wan' or 'hunyuan', got {meta.family!r}.")
        resolve_params(meta.layout, meta.block_size, meta.window, meta.diagonal, meta.stripes)

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan to ``path`` (safetensors; the format in the module docstring and
        ``gen.attention.plan_file``). Not atomic by itself: ``gen calibrate`` writes through
        ``gen._io.atomic_path``."""
        tensors = {"modes": self.modes, "stripes": self.stripes, "errors": self.errors}
        return save_plan_file(path, PLAN_FORMAT, tensors, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseVDiTPlan:
        """Read a plan file; ``ValueError`` saying what to do when it is missing,
        truncated, corrupt, not a Sparse-vDiT plan, or of a newer format."""
        tensors, meta = load_plan_file(path, PLAN_FORMAT, PlanMeta.from_json)
        try:
            return cls(tensors["modes"], tensors["stripes"], tensors["errors"], meta, source=str(path))
        except ValueError as err:
            raise ValueError(f"{err} Make it again with `{_CALIBRATE_HINT}`.") from None

    # -- checks ---------------------------------------------------------------------------
    def check(self, *, model: str | None = None, height: int | None = None, width: int | None = None,
              frames: int | None = None, steps: int | None = None) -> SparseVDiTPlan:
        """Refuse (``ValueError``) a plan made for another model, geometry or step count
        than the given ones (``None`` = not checked); returns the plan."""
        check_run(self.meta, PLAN_FORMAT, self.source, model=model, height=height, width=width,
                  frames=frames, steps=steps)
        return self

    def _steps_message(self, what: str) -> str:
        return steps_message(self.meta, PLAN_FORMAT, self.source, what)

    def check_call(self, layout: TokenLayout, num_heads: int, head_dim: int | None,
                   ctx: AttentionContext) -> tuple[int, int]:
        """Check one attention call against the plan; returns ``(step, layer)``."""
        return check_call(self.meta, PLAN_FORMAT, self.source, layout, num_heads, head_dim, ctx)

    # -- views ----------------------------------------------------------------------------
    def sparsity(self) -> torch.Tensor:
        """float32 ``[steps, layers, heads, 5]``: each mode's ``S_i`` (stripe: per head)."""
        return mode_sparsity(self.meta.params, self.meta.layout, self.stripes)

    def video_density(self) -> torch.Tensor:
        """float32 ``[steps, layers, heads]``: video x video density of the chosen modes."""
        s = self.sparsity().gather(-1, self.modes.long().unsqueeze(-1)).squeeze(-1)
        return 1.0 - s

    def call_density(self) -> torch.Tensor:
        """float32 ``[steps, layers, heads]``: fraction of the call's query-key pairs
        computed (text included: text rows attend everything, video rows the text keys
        unless skipped)."""
        lay = self.meta.layout
        sv, st, s = lay.video_len, lay.text_len, lay.seq_len
        video = self.video_density().double() * sv * sv
        text_cols = torch.where(self.modes == SKIP, 0.0, float(sv * st)).double()
        return ((video + text_cols + st * s) / (s * s)).float()

    def shares(self) -> dict[str, float]:
        """Fraction of (step, layer, head) entries in each mode."""
        total = max(1, self.modes.numel())
        return {name: float((self.modes == i).sum()) / total for i, name in enumerate(MODE_NAMES)}

    def reselect(self, lam: float, eps: float) -> SparseVDiTPlan:
        """The plan the stored errors give with another ``lam``/``eps`` (no new search).
        Approximate: the errors were measured along the trajectory of this plan's
        choices, not of the new ones."""
        modes = select_modes(self.errors, self.sparsity(), lam, eps)
        meta = dataclasses.replace(self.meta, lam=float(lam), eps=float(eps))
        return SparseVDiTPlan(modes, self.stripes, self.errors, meta, source=self.source)

    def __repr__(self) -> str:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in self.shares().items())
        return (f"SparseVDiTPlan({self.meta.model}, {self.meta.geometry()}, steps={self.meta.steps}, "
                f"layers={self.meta.layers}, heads={self.meta.heads}: {shares}; "
                f"video density {float(self.video_density().mean()):.3f})")


def load_plan(path: str | os.PathLike, *, model: str | None = None, height: int | None = None,
              width: int | None = None, frames: int | None = None, steps: int | None = None) -> SparseVDiTPlan:
    """:meth:`SparseVDiTPlan.load` then :meth:`SparseVDiTPlan.check` against the given run."""
    return SparseVDiTPlan.load(path).check(model=model, height=height, width=width, frames=frames, steps=steps)


# -- config and method ------------------------------------------------------------------
@dataclass(frozen=True)
class SparseVDiTConfig(MethodConfig):
    """Config of ``sparse-vdit``.

    Args:
        plan: the plan to run: a path to a plan file (``--set plan=PATH``) or a
            :class:`SparseVDiTPlan` object (Python). Required to run; the search
            (``gen calibrate``) makes it.
        block_size: block edge in tokens, a power of two in [16, 256]. ``None``: the
            plan's when running, 64 when searching.
        window: window-mode band half-width in blocks (frame-major). ``None``: the plan's
            when running, ``frame_len // (2 * block_size)`` (one frame wide) when searching.
        diagonal: multi-diagonal band half-width in blocks of the ``"hwt"`` order.
            ``None``: the plan's, or ``ceil((latent frames - 1) / block_size)``.
        stripes: key blocks per vertical-stripe head. ``None``: the plan's, or
            ``ceil(n_blocks / 16)``.
        lam: the search's weight of cost, ``L_i = err_i + lam * (1 - S_i)`` (paper: 0.5).
        eps: the search's threshold: ``full`` when every ``L_i > eps`` (paper: 1; larger is
            sparser).

    A run takes the mode parameters from the plan: one set here that differs from the
    plan's is refused (the modes were chosen with the plan's). ``lam`` and ``eps`` only
    steer the search (the plan records the values it was made with); to re-threshold
    a plan without searching again use :meth:`SparseVDiTPlan.reselect`.
    ``dense_steps``/``dense_layers`` run the model's stock attention on top of the plan.
    """

    plan: str | SparseVDiTPlan | None = None
    block_size: int | None = None
    window: int | None = None
    diagonal: int | None = None
    stripes: int | None = None
    lam: float = 0.5
    eps: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        plan = self.plan
        if isinstance(plan, os.PathLike):
            object.__setattr__(self, "plan", os.fspath(plan))
        elif plan is not None and not isinstance(plan, (str, SparseVDiTPlan)):
            raise ValueError(f"plan must be a path to a plan file or a SparseVDiTPlan, got {type(plan).__name__}.")
        if self.block_size is not None:
            check_block_size(self.block_size)
        for name in ("window", "diagonal"):
            v = getattr(self, name)
            if v is not None and not is_int(v):
                raise ValueError(f"{name} must be an int >= 0 (blocks) or None, got {v!r}.")
        if self.stripes is not None and not is_int(self.stripes, 1):
            raise ValueError(f"stripes must be an int >= 1 (key blocks) or None, got {self.stripes!r}.")
        for name in ("lam", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}.")


class SparseVDiTAttention(SparseMethod):
    """Runs a Sparse-vDiT plan: per call, the (step, layer)'s modes, same-mode heads
    in one kernel call each. See the module docstring."""

    name = "sparse-vdit"
    config_cls = SparseVDiTConfig
    families = ("wan", "hunyuan")
    summary = "Sparse-vDiT: per-head full/skip/window/diagonal/stripe modes from an offline search"

    def __init__(self, config: SparseVDiTConfig | None = None, *, model: str | None = None) -> None:
        super().__init__(config, model=model)
        self._mode_plans = PlanCache(self._build_mode_plan)
        self._stripe_plans: OrderedDict[tuple, BlockPlan] = OrderedDict()
        self._hwt: dict[TokenLayout, TokenPermutation] = {}
        self._head_index: dict[tuple, torch.Tensor] = {}
        self.sv_plan: SparseVDiTPlan | None = self._load_plan()
        if self.sv_plan is not None and model is not None:
            self.sv_plan.check(model=model)  # a plan for another model with the same shapes
        if self.sv_plan is not None:
            self._modes = self.sv_plan.modes.tolist()
            self._stripes = [[[tuple(h) for h in layer] for layer in step] for step in self.sv_plan.stripes.tolist()]

    @property
    def calibrated_steps(self) -> int | None:
        return None if self.sv_plan is None else self.sv_plan.meta.steps

    def _load_plan(self) -> SparseVDiTPlan | None:
        cfg = self.config
        if cfg.plan is None:
            raise ValueError(
                "sparse-vdit needs plan=: a plan file from the offline search "
                f"(`{_CALIBRATE_HINT}`), e.g. `gen render PROMPT --attention sparse-vdit "
                "--set plan=PLAN`, or gen.sparsify(pipe, 'sparse-vdit', plan=PLAN)."
            )
        plan = cfg.plan if isinstance(cfg.plan, SparseVDiTPlan) else SparseVDiTPlan.load(cfg.plan)
        for name in ("block_size", "window", "diagonal", "stripes"):
            mine, theirs = getattr(cfg, name), getattr(plan.meta, name)
            if mine is not None and mine != theirs:
                raise ValueError(
                    f"{name}={mine} differs from the plan's {name}={theirs}: the plan's modes were "
                    f"chosen with its own parameters. Drop {name}, or calibrate with it."
                )
        return plan

    def __repr__(self) -> str:
        plan = self.sv_plan
        return f"SparseVDiTAttention({plan!r})" if plan is not None else super().__repr__()

    @property
    def needs_step(self) -> bool:
        return True  # modes are per step

    # -- what runs where ------------------------------------------------------------------
    def params(self, layout: TokenLayout) -> ModeParams:
        """The mode parameters for calls of ``layout`` (the plan's)."""
        return self.sv_plan.meta.params

    def assignment(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext,
                   head_dim: int | None = None) -> tuple[list[int], list[tuple[int, ...]]]:
        """Per head of the call: its mode and stripe columns. From ``ctx.extras`` when a
        caller set them there (the search does), else from the plan at ``ctx``'s (step,
        layer) after checking the call against the plan. A call that holds some of the
        model's heads (context parallelism: ``ctx.head_offset``, ``ctx.num_heads``) gets
        those heads' entries."""
        given = ctx.extras.get(_EXTRAS_KEY)
        if given is not None:
            return given
        offset, total = ctx.heads_of(num_heads)
        step, layer = self.sv_plan.check_call(layout, total, head_dim, ctx)
        modes, stripes = self._modes[step][layer], self._stripes[step][layer]
        if num_heads != total:
            modes, stripes = modes[offset:offset + num_heads], stripes[offset:offset + num_heads]
        return modes, stripes

    def _with_assignment(self, ctx: AttentionContext, modes, stripes) -> AttentionContext:
        return dataclasses.replace(ctx, extras={**ctx.extras, _EXTRAS_KEY: (list(modes), list(stripes))})

    def _index(self, heads: list[int], device: torch.device) -> torch.Tensor:
        key = (tuple(heads), str(device))
        if key not in self._head_index:
            self._head_index[key] = torch.tensor(heads, dtype=torch.long, device=device)
        return self._head_index[key]

    def _hwt_order(self, layout: TokenLayout) -> TokenPermutation:
        if layout not in self._hwt:
            self._hwt[layout] = hwt_order(layout)
        return self._hwt[layout]

    # -- plans per mode ---------------------------------------------------------------------
    def _build_mode_plan(self, key: tuple) -> BlockPlan:
        mode, n, b, half, device = key
        if mode == FULL:
            # 128x64 tiles suit the GPU kernel (as ``dense``); blocks do not matter for full
            bm, bn = (128, 64) if torch.device(device).type == "cuda" else (b, b)
            return BlockPlan.dense(n, n, bm, bn, device=device)
        nb = -(-n // b)
        return BlockPlan.from_block_mask(band_mask(nb, half), b, b, n, n).to(device)

    def mode_plan(self, mode: int, layout: TokenLayout, device, stripes=()) -> BlockPlan:
        """The plan of one mode over the video tokens, in that mode's token order: shared
        ``[1, 1, nq, nk]`` for full/window/diagonal, ``[1, len(stripes), nq, n]`` for
        stripe heads (one row of columns per head)."""
        p, n, device = self.params(layout), layout.video_len, str(torch.device(device))
        if mode == STRIPE:
            key = (n, p.block_size, tuple(stripes), device)
            plan = self._stripe_plans.get(key)
            if plan is None:
                nq = -(-n // p.block_size)
                cols = torch.tensor(stripes, dtype=torch.int32, device=device).view(1, len(stripes), 1, -1)
                # the same columns for every query block: a broadcast view, no nq copies
                idx = cols.expand(1, len(stripes), nq, cols.shape[-1])
                cnt = torch.full((1, 1, 1), cols.shape[-1], dtype=torch.int32, device=device).expand(1, len(stripes), nq)
                plan = BlockPlan(p.block_size, p.block_size, n, n, idx, cnt)
                self._stripe_plans[key] = plan
                if len(self._stripe_plans) > 16:  # one (step, layer) is reused by its CFG pair
                    self._stripe_plans.popitem(last=False)
            return plan
        half = {WINDOW: p.window, DIAGONAL: p.diagonal}.get(mode, 0)
        return self._mode_plans.get((mode, n, p.block_size, half, device))

    # -- attention ---------------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                  ctx: AttentionContext) -> torch.Tensor:
        if q.shape[2] != layout.seq_len:
            raise ValueError(f"q has {q.shape[2]} tokens but the layout {layout} has {layout.seq_len}.")
        modes, stripes = self.assignment(layout, q.shape[1], ctx, q.shape[-1])
        return self.run_modes(q, k, v, layout, ctx, modes, stripes)

    def run_modes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                  ctx: AttentionContext, modes: list[int], stripes: list[tuple[int, ...]]) -> torch.Tensor:
        """Attention of one call, ``(B, H, S, D)`` in the original order, with head ``h``
        in mode ``modes[h]`` (stripe columns ``stripes[h]``) and the joint text rule."""
        heads = q.shape[1]
        skip = [h for h in range(heads) if modes[h] == SKIP]
        if not skip:
            return SparseMethod.attention(self, q, k, v, layout, self._with_assignment(ctx, modes, stripes))
        keep = [h for h in range(heads) if modes[h] != SKIP]
        out = torch.zeros_like(q)
        if keep:
            idx = self._index(keep, q.device)
            sub_ctx = self._with_assignment(ctx, [modes[h] for h in keep], [stripes[h] for h in keep])
            sub = SparseMethod.attention(self, q.index_select(1, idx), k.index_select(1, idx),
                                         v.index_select(1, idx), layout, sub_ctx)
            out.index_copy_(1, idx, sub)
        if layout.text_len:
            # a skipped head's text queries still attend every valid key (text is never
            # approximated); its video queries stay zero
            idx, ts = self._index(skip, q.device), layout.text_slice
            text = block_sparse_attention(
                q.index_select(1, idx)[:, :, ts], k.index_select(1, idx), v.index_select(1, idx),
                self._dense_plan(layout.text_len, layout.seq_len, q.device), kv_valid=ctx.kv_valid,
                backend=self.config.backend,
            )
            out[:, idx, ts] = text
        return out

    def video_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                        ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Video queries against video keys, ``(B, H, Sv, D)``: one kernel call per mode
        present (gathered heads); skipped heads give zeros and ``lse = -inf``."""
        heads = q.shape[1]
        modes, stripes = self.assignment(layout, heads, ctx, q.shape[-1])
        groups: dict[int, list[int]] = {}
        for h, m in enumerate(modes):
            groups.setdefault(int(m), []).append(h)
        out = lse = None
        for mode in sorted(groups):
            members = groups[mode]
            if mode == SKIP:
                continue
            whole = len(members) == heads
            if whole:
                qg, kg, vg = q, k, v
            else:
                idx = self._index(members, q.device)
                qg, kg, vg = (x.index_select(1, idx) for x in (q, k, v))
            perm = self._hwt_order(layout) if mode == DIAGONAL else None
            if perm is not None:
                qg, kg, vg = (perm.apply(x, dim=2) for x in (qg, kg, vg))
            plan = self.mode_plan(mode, layout, q.device, [stripes[h] for h in members] if mode == STRIPE else ())
            o, lg = block_sparse_attention(qg, kg, vg, plan, return_lse=True, backend=self.config.backend)
            if perm is not None:
                o, lg = perm.invert(o, dim=2), perm.invert(lg.unsqueeze(-1), dim=2).squeeze(-1)
            if whole:
                return o, lg
            if out is None:
                out = torch.zeros_like(q)
                lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
            out.index_copy_(1, idx, o)
            lse.index_copy_(1, idx, lg)
        if out is None:  # every head skipped
            out = torch.zeros_like(q)
            lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        return out, lse

    # -- for tests, pictures and summaries -----------------------------------------------------
    def _ctx_assignment(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None):
        if ctx is None or ctx.step_index is None or ctx.layer_index is None:
            raise ValueError("sparse-vdit's pattern depends on the step and layer: pass "
                             "ctx=AttentionContext(step_index=..., layer_index=...).")
        return self.assignment(layout, num_heads, ctx)

    def plan(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None, *,
             q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> BlockPlan:
        """Per-head plan ``[1, H, nq, nk]`` of the (step, layer) in ``ctx``, each head in its
        own token order: frame-major, but ``"hwt"`` for multi-diagonal heads (what the
        kernel walks; densities per head are exact). For pictures and tests."""
        modes, stripes = self._ctx_assignment(layout, num_heads, ctx)
        p, n = self.params(layout), layout.video_len
        nb = -(-n // p.block_size)
        masks = []
        for m, cols in zip(modes, stripes):
            if m == STRIPE:
                mk = torch.zeros(nb, nb, dtype=torch.bool)
                mk[:, list(cols)] = True
            elif m == SKIP:
                mk = torch.zeros(nb, nb, dtype=torch.bool)
            else:
                half = {FULL: nb, WINDOW: p.window, DIAGONAL: p.diagonal}[m]
                mk = band_mask(nb, half)
            masks.append(mk)
        device = q.device if q is not None else "cpu"
        return BlockPlan.from_block_mask(torch.stack(masks), p.block_size, p.block_size, n, n).to(device)

    def video_token_mask(self, layout: TokenLayout, num_heads: int,
                         ctx: AttentionContext | None = None) -> torch.Tensor:
        """Bool ``(H, Sv, Sv)`` in frame-major order (multi-diagonal heads mapped back
        from ``"hwt"``)."""
        modes, _ = self._ctx_assignment(layout, num_heads, ctx)
        mask = self.plan(layout, num_heads, ctx).to_token_mask()[0]
        inv = self._hwt_order(layout).inverse
        for h, m in enumerate(modes):
            if m == DIAGONAL:
                mask[h] = mask[h][inv][:, inv]
        return mask

    def token_mask(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None) -> torch.Tensor:
        """Bool ``(H, S, S)``: the joint text rule, except that a skipped head's video
        queries see no key at all (their output is zero)."""
        mask = super().token_mask(layout, num_heads, ctx)
        modes, _ = self._ctx_assignment(layout, num_heads, ctx)
        for h, m in enumerate(modes):
            if m == SKIP:
                mask[h, layout.video_slice, :] = False
        return mask

    def density(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None) -> float:
        """Fraction of the call's query-key pairs computed (text included), for the (step,
        layer) of ``ctx``; without one, the mean over the plan's entries, with the
        scheduled dense steps and layers counted as 1."""
        plan = self.sv_plan
        dens = plan.call_density()
        if ctx is not None and ctx.step_index is not None and ctx.layer_index is not None:
            if self.is_dense(ctx):
                return 1.0
            step, layer = plan.check_call(layout, num_heads, None, ctx)
            return float(dens[step, layer].mean())
        steps = torch.arange(plan.meta.steps)
        dense = torch.zeros(plan.meta.steps, plan.meta.layers, dtype=torch.bool)
        dense |= (steps < self.config.dense_steps).unsqueeze(1)
        for layer in range(plan.meta.layers):
            dense[:, layer] |= self.is_dense_layer(layer)
        per_call = dens.mean(-1)
        return float(torch.where(dense, torch.ones_like(per_call), per_call).mean())
