"""PARO's offline calibration (``gen calibrate paro``): run a real pipeline with dense
attention, measure each head's attention map in the six token orders, choose an order
per (layer, head), mark empty heads, build block masks per timestep bin, write a plan.

    from gen.calibrate_paro import calibrate_paro
    result = calibrate_paro("shapes-wan", ["a red circle moving right"], steps=8,
                            density=0.5, out="shapes-wan.paro.safetensors")
    gen.sparsify(pipe, "paro", plan="shapes-wan.paro.safetensors")

How gen runs it (the authors' calibration code is not public; the paper's rules, and
gen's choices where it is silent):

1. The pipeline runs as usual (its scheduler, CFG, and no VAE decode) with an observer
   method on every self/joint attention layer that returns exact dense attention and
   records, at *every* call (both CFG branches, every prompt), block statistics of the
   call's softmax restricted to video→video (``gen.attention.methods.paro_calibration``):
   in chunks of query rows, never the ``Sv x Sv`` map.
2. **Orders.** Per (layer, head), the paper's two metrics per order, averaged over the
   calls: ``M_sparse`` (share of ``b x b`` blocks where >= ``sigma`` = 90 % of the entries
   are < ``eps`` = 1e-3) and ``M_quant`` (mean block ``max / mean``); the order minimising
   ``alpha (1 - M_sparse)/Σ + (1 - alpha) M_quant/Σ`` (``select_orders``). One order per
   (layer, head) for every bin, as the authors' plan files store it.
3. **Empty heads.** A head whose video queries put less than ``empty_mass`` (default 0.01)
   of their probability on video keys, averaged over the calls, is empty: its
   video→video part is not computed. The paper gives no threshold; 1 % is gen's. Wan
   self-attention has no text keys (every probability is video→video), so no Wan head is
   ever empty under this rule: the flag matters for joint-text models.
4. **Masks.** Per (bin, layer, head) the block mass of the chosen order, averaged over
   the calls in that bin (``bin = (step * bins) // steps``), and ``build_masks``: the last
   row and column on, then the heaviest blocks until ``density`` of the token pairs.
   A (bin, layer) that no call reached stays all-on.

Two passes or one: step 4 needs the block mass in the order step 2 chooses, which is
known only at the end. When the mass of all six orders fits in ``memory`` bytes (float32
``bins x layers x heads x 6 x nb²``: the tiny models, a few MB) one pass keeps them all;
otherwise (Wan 1.3B 480p: 9 GB) a first pass chooses the orders and a second pass, same
prompts and seeds, so the same trajectory, records the masses in those orders only.

The observer is dense, so the calibration trajectory is the model's own (the paper
calibrates on full-precision attention maps); ``dense_steps``/``dense_layers`` do not
apply here (every call is observed) and are a run-time choice on top of the plan.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gen.attention import AttentionContext, TokenLayout
from gen.attention.methods.paro import (
    DEFAULT_ALPHA,
    DEFAULT_BINS,
    DEFAULT_BLOCK,
    DEFAULT_DENSITY,
    ORDER_NAMES,
    ParoAttention,
    ParoConfig,
    ParoPlan,
    ParoPlanMeta,
    pack_masks,
    time_bin,
)
from gen.attention.methods.paro_calibration import (
    block_statistics,
    build_masks,
    order_metrics,
    select_orders,
)
from gen.attention.plan_file import call_family

__all__ = ["ParoCalibration", "ParoObserver", "calibrate_paro", "plan_summary"]

logger = logging.getLogger("gen.calibrate")

Progress = Callable[[int, int, str], None]


class ParoObserver(ParoAttention):
    """The calibration's attention method: exact dense attention (an all-on plan) that
    records block statistics of every call. :meth:`begin` sizes the records,
    ``phase`` is ``"orders"`` (all six orders: metrics, and masses when ``keep_all``) or
    ``"masses"`` (masses in the chosen ``orders`` only); :meth:`finish` makes the plan."""

    @property
    def needs_step(self) -> bool:
        return True  # statistics are kept per timestep bin

    def begin(self, *, steps: int, layers: int, heads: int, bins: int, block_size: int, eps: float,
              sigma: float, keep_all: bool, budget: int) -> None:
        self.steps, self.layers, self.heads, self.bins = steps, layers, heads, bins
        self.block_size, self.eps, self.sigma, self.keep_all, self.budget = block_size, eps, sigma, keep_all, budget
        self.layout: TokenLayout | None = None
        self.head_dim: int | None = None
        self.phase = "orders"
        self.m_sparse = torch.zeros(layers, heads, 6, dtype=torch.float64)
        self.m_quant = torch.zeros(layers, heads, 6, dtype=torch.float64)
        self.vv = torch.zeros(layers, heads, dtype=torch.float64)
        self.calls = torch.zeros(layers, dtype=torch.int64)
        self.mass: torch.Tensor | None = None  # float32 [bins, layers, heads, (6,) nb, nb]
        self.mass_calls = torch.zeros(bins, layers, dtype=torch.int64)
        self.chosen: torch.Tensor | None = None

    def choose_orders(self, alpha: float) -> torch.Tensor:
        """int8 ``[layers, heads]``: the orders from the metrics recorded so far."""
        count = self.calls.clamp(min=1).double().view(-1, 1, 1)
        seen = (self.calls > 0).view(-1, 1, 1)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        self.ms_mean = torch.where(seen, self.m_sparse / count, nan)
        self.mq_mean = torch.where(seen, self.m_quant / count, nan)
        return select_orders(self.ms_mean, self.mq_mean, alpha)

    def start_masses(self, orders: torch.Tensor) -> None:
        """Second pass: record masses in ``orders`` (int8 ``[layers, heads]``) only."""
        self.phase, self.chosen = "masses", orders
        self.mass, self.mass_calls = None, torch.zeros_like(self.mass_calls)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                  ctx: AttentionContext) -> torch.Tensor:
        step, layer = ctx.step_index, ctx.layer_index
        if self.layout is None:
            self.layout, self.head_dim = layout, q.shape[-1]
        elif layout != self.layout:
            raise ValueError(f"the calibration run changed geometry ({self.layout} -> {layout}); a plan is "
                             "made for one geometry.")
        if step is None or not 0 <= step < self.steps:
            raise ValueError(f"calibration was set up for {self.steps} steps but a call came at step {step}.")
        if layer is None or not 0 <= layer < self.layers or q.shape[1] != self.heads:
            raise ValueError(f"unexpected attention call (layer {layer}, {q.shape[1]} heads) for a calibration "
                             f"over {self.layers} layers x {self.heads} heads.")
        self._record(q, k, layout, ctx, time_bin(step, self.steps, self.bins), layer)
        return super().attention(q, k, v, layout, ctx)

    @torch.no_grad()
    def _record(self, q, k, layout: TokenLayout, ctx: AttentionContext, bin_: int, layer: int) -> None:
        vs, ts = layout.video_slice, layout.text_slice
        k_text = text_valid = None
        if layout.text_len:
            k_text = k[:, :, ts]
            if ctx.kv_valid is not None:
                text_valid = (ctx.kv_valid - layout.video_len).clamp(min=0)
        orders = tuple(range(6)) if self.phase == "orders" else tuple(sorted(set(self.chosen[layer].tolist())))
        stats = block_statistics(q[:, :, vs], k[:, :, vs], layout.grid, block_size=self.block_size, orders=orders,
                                 eps=self.eps, k_text=k_text, text_valid=text_valid, budget=self.budget)
        per_query = float(stats.batch * layout.video_len)  # masses as mean probability per query
        heads = q.shape[1]
        if self.phase == "orders":
            ms, mq = order_metrics(stats, sigma=self.sigma)
            self.m_sparse[layer] += ms
            self.m_quant[layer] += mq
            self.vv[layer] += stats.vv_mass
            self.calls[layer] += 1
            if not self.keep_all:
                return
            mass = stats.mass.float().transpose(0, 1) / per_query  # (H, 6, nb, nb)
        else:
            pick = torch.tensor([orders.index(int(o)) for o in self.chosen[layer].tolist()])
            mass = stats.mass[pick, torch.arange(heads)].float() / per_query  # (H, nb, nb)
        if self.mass is None:
            self.mass = torch.zeros(self.bins, self.layers, *mass.shape, dtype=torch.float32)
        self.mass[bin_, layer] += mass
        self.mass_calls[bin_, layer] += 1

    def finish(self, *, orders: torch.Tensor, density: float, empty_mass: float, meta: dict) -> ParoPlan:
        """The plan: ``orders``, empty heads, masks per bin at ``density``; ``meta`` adds
        :class:`ParoPlanMeta` fields."""
        if self.layout is None or self.mass is None:
            raise ValueError("no attention call reached the calibration.")
        layout, b = self.layout, self.block_size
        n = layout.video_len
        mass = self.mass
        if mass.dim() == 6:  # one pass: (bins, layers, heads, 6, nb, nb) -> the chosen order
            idx = orders.long().view(1, self.layers, self.heads, 1, 1, 1).expand(self.bins, -1, -1, 1, *mass.shape[-2:])
            mass = mass.gather(3, idx).squeeze(3)
        mass = mass / self.mass_calls.clamp(min=1).view(self.bins, self.layers, 1, 1, 1).float()
        masks, kept = build_masks(mass, density, n, b)
        seen = (self.mass_calls > 0).view(self.bins, self.layers, 1)
        masks = torch.where(seen.unsqueeze(-1).unsqueeze(-1), masks, torch.ones_like(masks))
        kept = torch.where(seen, kept, torch.full_like(kept, float("nan")))
        vv = torch.where((self.calls > 0).view(-1, 1), self.vv / self.calls.clamp(min=1).view(-1, 1).double(),
                         torch.ones_like(self.vv))
        empty = vv < empty_mass
        info = ParoPlanMeta(family=call_family(layout), grid=layout.grid, text_len=layout.text_len,
                            text_first=layout.text_first, steps=self.steps, layers=self.layers, heads=self.heads,
                            head_dim=self.head_dim, block_size=b, bins=self.bins, eps=float(self.eps),
                            sigma=float(self.sigma), empty_mass=float(empty_mass), density=float(density), **meta)
        return ParoPlan(orders.contiguous(), empty.contiguous(), pack_masks(masks), self.ms_mean.float(),
                        self.mq_mean.float(), kept.float().contiguous(), vv.float().contiguous(), info)


@dataclass
class ParoCalibration:
    """What :func:`calibrate_paro` made.

    Attributes:
        plan: the plan (also written to ``path`` when one was given).
        path: the written plan file, or None.
        passes: pipeline passes per prompt (1, or 2 when the six orders' masses did not fit
            in memory).
        seconds: wall time of the passes.
    """

    plan: ParoPlan
    path: Path | None
    passes: int = 1
    seconds: float = 0.0


def calibrate_paro(
    model: str,
    prompts: Sequence[str],
    *,
    out: str | os.PathLike | None = None,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    density: float | None = None,
    bins: int | None = None,
    alpha: float | None = None,
    block_size: int | None = None,
    eps: float = 1e-3,
    sigma: float = 0.9,
    empty_mass: float = 0.01,
    seed: int = 0,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    image: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    model_path: str | os.PathLike | None = None,
    pipe=None,
    progress: Progress | None = None,
    order: int | None = None,
    memory: int = 1 << 30,
    budget: int = 1 << 24,
) -> ParoCalibration:
    """Calibrate PARO on ``model`` over ``prompts``; return (and write) the plan.

    Args:
        model: registry name (``gen models``), e.g. ``"wan2.1-t2v-1.3b"`` or ``"shapes-wan"``.
        prompts: one or more prompts (their statistics are averaged).
        out: plan file to write (atomically); None to only return the plan.
        steps, height, width, frames, guidance: default to the model's; the plan is valid
            for exactly this step count and geometry.
        density: target video→video density of the masks, in (0, 1] (default 0.5).
        bins: timestep bins (default 4).
        alpha: order-selection weight in [0, 1] (default 0.5; see ``ParoConfig``).
        block_size: block edge in tokens (default 64, the paper's).
        eps, sigma: the sparse-block test of ``M_sparse`` (paper: 1e-3, 90 %).
        empty_mass: heads whose video queries put less than this share of their
            probability on video keys are empty (see the module docstring).
        seed: generator seed of every prompt's pass.
        negative_prompt: as for ``gen render``; image: input image file for
            image-to-video models.
        device, dtype, model_path, pipe: as for ``gen.render.render``.
        progress: ``progress(done, total, message)`` after each denoising step.
        order: give every head this order id instead of choosing (ablation: 0 keeps the
            model's frame-major order, i.e. PARO without reordering); the metrics are
            still recorded.
        memory: bytes the six orders' block masses may take for a one-pass calibration.
        budget: most probability elements held at once per statistics chunk.

    Raises:
        ValueError: unknown model, a family paro does not support, bad geometry or
            parameters, unreadable image.
    """
    import gen
    from gen._calibration import load_calibration_model, resolve_calibration
    from gen._io import atomic_path
    from gen.api import sparsify

    prompts, base = resolve_calibration("paro", ParoAttention.families, model, prompts, height=height, width=width,
                                        frames=frames, steps=steps, guidance=guidance, seed=seed,
                                        negative_prompt=negative_prompt)
    density = DEFAULT_DENSITY if density is None else density
    bins = DEFAULT_BINS if bins is None else bins
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    block_size = DEFAULT_BLOCK if block_size is None else block_size
    ParoConfig(bins=bins, density=density, alpha=alpha, block_size=block_size)  # checks the values
    for name, value, low, high in (("eps", eps, 0.0, 1.0), ("sigma", sigma, 0.0, 1.0),
                                   ("empty_mass", empty_mass, 0.0, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}.")
    spec = base.spec
    height, width, frames, steps, guidance = base.height, base.width, base.frames, base.steps, base.guidance
    if order is not None and (isinstance(order, bool) or not isinstance(order, int) or not 0 <= order < 6):
        raise ValueError(f"order must be an order id in [0, 5] ({', '.join(ORDER_NAMES)}) or None, got {order!r}.")
    if bins > steps:
        raise ValueError(f"bins={bins} is more than the run's {steps} steps; use at most {steps} bins.")
    loaded = load_calibration_model(base, image=image, device=device, dtype=dtype, model_path=model_path, pipe=pipe,
                                    progress=progress)
    session, layers, heads, image_path = loaded.session, loaded.layers, loaded.heads, loaded.image
    from gen.masks import layout_for_model

    layout = layout_for_model(spec, height, width, frames)
    nb = -(-layout.video_len // block_size)
    keep_all = bins * layers * heads * 6 * nb * nb * 4 <= memory
    passes = 1 if keep_all else 2

    # one install for every pass: the observer keeps its statistics across them
    handle = sparsify(session.pipeline(spec.name)[0], ParoObserver(ParoConfig(block_size=block_size)), model=spec.name)
    observer: ParoObserver = handle.method  # the installed instance (sparsify builds its own)
    observer.begin(steps=steps, layers=layers, heads=heads, bins=bins, block_size=block_size, eps=eps, sigma=sigma,
                   keep_all=keep_all, budget=budget)
    total = steps * len(prompts) * passes
    t0 = time.perf_counter()
    orders = None
    try:
        for p in range(passes):
            if p == 1:
                observer.start_masses(orders)
            for i, prompt in enumerate(prompts):
                for patch in handle.patches:
                    patch.run.reset()
                done0 = (p * len(prompts) + i) * steps
                what = f"pass {p + 1}/{passes}, " if passes > 1 else ""

                def on_step(done: int, _total: int, done0=done0, prompt=prompt, what=what, i=i) -> None:
                    if progress is not None:
                        progress(done0 + done, total, f"{what}prompt {i + 1}/{len(prompts)}: {prompt[:40]}")

                logger.info("paro calibration on %s: %sprompt %d/%d %r", spec.name, what, i + 1, len(prompts), prompt)
                job = dataclasses.replace(base, prompt=prompt, image=image_path)
                session.run(job, install=False, on_step=on_step, decode=False)
            if p == 0:
                orders = observer.choose_orders(alpha)
                if order is not None:
                    orders = torch.full_like(orders, order)
    finally:
        handle.restore()
        loaded.close()
    seconds = time.perf_counter() - t0
    plan = observer.finish(orders=orders, density=density, empty_mass=empty_mass,
                           meta=dict(model=spec.name, height=height, width=width, frames=frames, alpha=float(alpha),
                                     prompts=tuple(prompts), seed=seed, guidance=float(guidance),
                                     gen_version=gen.__version__))
    path = None
    if out is not None:
        with atomic_path(out) as tmp:
            plan.save(tmp)
        path = Path(out)
        plan = plan.with_source(str(path))
    kept = plan.kept_mass[~torch.isnan(plan.kept_mass)]
    logger.info("paro plan for %s (%d pass(es), %.1f s): %s; mean kept attention mass %.3f", spec.name, passes,
                seconds, plan, float(kept.mean()) if kept.numel() else math.nan)
    return ParoCalibration(plan, path, passes, seconds)


def plan_summary(plan: ParoPlan) -> dict:
    """Order shares, empty heads, the mean video and call density, the mean kept mass,
    and per bin the video density and kept mass: what ``gen calibrate paro`` prints."""
    video, call = plan.video_density(), plan.call_density()
    kept = plan.kept_mass.double()
    return {
        "orders": plan.order_shares(),
        "empty_heads": int(plan.empty.sum()),
        "video_density": float(video.mean()),
        "call_density": float(call.mean()),
        "kept_mass": float(kept.nanmean()) if kept.numel() else math.nan,
        "per_bin": [{"video_density": float(video[b].mean()), "kept_mass": float(kept[b].nanmean())}
                    for b in range(plan.meta.bins)],
        "order_names": list(ORDER_NAMES),
    }
