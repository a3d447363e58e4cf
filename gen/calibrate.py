"""Sparse-vDiT's offline search (``gen calibrate sparse-vdit``): run a real pipeline,
choose each head's attention mode per (step, layer), write a plan file.

    from gen.calibrate import calibrate
    result = calibrate("tiny-wan", ["a red ball"], steps=2, out="tiny-wan.plan.safetensors")
    gen.sparsify(pipe, "sparse-vdit", plan="tiny-wan.plan.safetensors")

Algorithm 1 of the paper, as gen runs it:

1. The pipeline runs as usual (its own scheduler, CFG, VAE) with a search method on
   every self/joint attention layer. At the first call of each (step, layer) the method
   computes, for all heads at once, full attention ``O_0`` and each sparse mode's output
   ``O_i`` (skip, window, multi-diagonal, vertical stripe) on the real ``q, k, v``.
   The stripe columns of each head are the key blocks that receive the most attention
   probability under full attention at that call.
2. Per head, the normalised error ``err_i = ||O_i - O_0||^2 / mean_h ||O_0,h||^2`` over the
   video queries of the call (all samples), the loss ``L_i = err_i + lam * (1 - S_i)``
   with ``S_i`` the fraction of video x video pairs the mode skips, and the choice
   (``select_modes``): ``full`` when every ``L_i > eps``, else ``argmin_i L_i``.
3. The call returns the *chosen* modes' output, computed by the same code and kernel
   calls a run with the finished plan makes, so errors propagate to later layers and
   steps as in deployment, and a one-prompt plan reproduces the calibration run exactly.

Why this normalisation: the paper's loss is a raw MSE plus ``lam (1 - S)`` with
``lam = 0.5, eps = 1``, which only means something on the scale of its outputs. Dividing
by the layer's mean head energy ``mean_h ||O_0,h||^2`` (the same element count in both)
makes the error of skipping a head equal to its energy relative to the layer's average
head: skipping an average head costs exactly 1 = ``eps``, so the default threshold reads
"accept a mode whose error plus cost is at most that of dropping an average head", on
any model, layer and resolution. A per-head relative error (``/ ||O_0,h||^2``) would not
do: it is 1 for skipping *any* head, so it cannot find the weak heads that skipping is
for. Measured on the tiny models (random weights; 2 prompts x 3 steps, defaults, b = 64):

* tiny-wan: mean err skip 1.00, window 0.17, diagonal 0.045, stripe 0.15; chosen:
  window 42 %, stripe 58 % of the (step, layer, head) entries;
* tiny-hunyuan: skip 1.00, window 0.33, diagonal 0.071, stripe 0.33; chosen: diagonal
  75 %, stripe 25 %;

at sparsities 1 / 0.80 / 0.48 / 0.80; per-head skip errors spread 0.76-1.24 (the heads'
energy), so on these random weights no head is skipped or kept full. With 16-token
blocks (tiny-wan: window 0.15, diagonal 0.28, stripe 0.36 at 0.77 / 0.86 / 0.90) the
window wins 92 % of the heads: which mode wins depends on the geometry, as it should.

Scheduled dense calls (``dense_steps``, ``dense_layers``) run the stock attention and are
not searched: the plan marks them ``full`` with NaN errors.

CFG as two calls per step: the modes are decided on the first call of a (step, layer),
the conditional one in diffusers' Wan pipelines, and reused for the unconditional call,
as a plan is used at inference (one mode per step, layer and head for both branches).
Guidance-embedded models (HunyuanVideo) make one call per step.

Several prompts: each prompt runs its own pass (same seed) with on-the-fly choices,
and the plan applies the rule to the *mean over prompts* of each mode's error per
(step, layer, head), with stripe columns from the mean attention mass. A mean loss keeps
how much worse a mode is (a majority vote keeps only the ranking and ties on two
prompts). With one prompt the plan is exactly the choices the calibration pass ran.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gen.attention import AttentionContext, TokenLayout
from gen.attention.methods.sparse_vdit import (
    PlanMeta,
    SparseVDiTAttention,
    SparseVDiTConfig,
    SparseVDiTPlan,
)
from gen.attention.methods.sparse_vdit_modes import (
    FULL,
    MODE_NAMES,
    SKIP,
    STRIPE,
    ModeParams,
    key_block_mass,
    mode_sparsity,
    resolve_params,
    select_modes,
    top_stripes,
)
from gen.attention.plan_file import call_family

__all__ = ["CalibrationResult", "SparseVDiTSearch", "calibrate", "plan_summary", "read_prompts"]

logger = logging.getLogger("gen.calibrate")

Progress = Callable[[int, int, str], None]


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a prompts file: one per line; blank lines and ``#`` comments skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ValueError(f"cannot read the prompts file {path}: {err.strerror or err}.") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompt; write one prompt per line.")
    return prompts


class SparseVDiTSearch(SparseVDiTAttention):
    """The search's attention method: at the first call of each (step, layer) it measures
    every mode against full attention, chooses per head (``select_modes``) and records;
    every call then runs the chosen modes (see the module docstring).

    Call :meth:`begin` once with the run's size and :meth:`start_prompt` before each
    pipeline pass; :meth:`finish` aggregates the passes into a plan.
    """

    def _load_plan(self) -> None:
        return None  # the search makes the plan

    def begin(self, steps: int, layers: int, heads: int) -> None:
        """Size the records: ``steps`` denoising steps, ``layers`` attention layers and
        ``heads`` heads per layer."""
        self.steps, self.layers, self.heads = steps, layers, heads
        self.layout: TokenLayout | None = None
        self.head_dim: int | None = None
        self._params: ModeParams | None = None
        self.err_sum = torch.zeros(steps, layers, heads, 5, dtype=torch.float64)
        self.err_count = torch.zeros(steps, layers, dtype=torch.int64)
        self.mass_sum: torch.Tensor | None = None
        self.prompt_modes: list[torch.Tensor] = []

    def start_prompt(self) -> None:
        """A new pipeline pass: every (step, layer) is decided afresh."""
        self.decided = torch.zeros(self.steps, self.layers, dtype=torch.bool)
        self.modes_now = torch.full((self.steps, self.layers, self.heads), FULL, dtype=torch.int8)
        self._choice: dict[tuple[int, int], tuple[list[int], list[tuple[int, ...]]]] = {}
        self.prompt_modes.append(self.modes_now)

    def params(self, layout: TokenLayout) -> ModeParams:
        if self._params is None:
            cfg = self.config
            self._params = resolve_params(layout, cfg.block_size, cfg.window, cfg.diagonal, cfg.stripes)
        return self._params

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                  ctx: AttentionContext) -> torch.Tensor:
        step, layer = ctx.step_index, ctx.layer_index
        if self.layout is None:
            self.layout, self.head_dim = layout, q.shape[-1]
        elif layout != self.layout:
            raise ValueError(f"the calibration run changed geometry ({self.layout} -> {layout}); a plan "
                             "is made for one geometry.")
        if step is None or not 0 <= step < self.steps:
            raise ValueError(f"calibration was set up for {self.steps} steps but a call came at step {step}.")
        if layer is None or not 0 <= layer < self.layers or q.shape[1] != self.heads:
            raise ValueError(f"unexpected attention call (layer {layer}, {q.shape[1]} heads) for a search "
                             f"over {self.layers} layers x {self.heads} heads.")
        if not bool(self.decided[step, layer]):
            self._decide(q, k, v, layout, ctx, step, layer)
        modes, stripes = self._choice[step, layer]
        return self.run_modes(q, k, v, layout, ctx, modes, stripes)

    @torch.no_grad()
    def _decide(self, q, k, v, layout: TokenLayout, ctx: AttentionContext, step: int, layer: int) -> None:
        heads, p, vs = q.shape[1], self.params(layout), layout.video_slice
        mass = key_block_mass(q[:, :, vs], k[:, :, vs], p.block_size)  # (H, n_blocks)
        if self.mass_sum is None:
            self.mass_sum = torch.zeros(self.steps, self.layers, heads, mass.shape[-1], dtype=torch.float32)
        self.mass_sum[step, layer] += mass
        stripes = top_stripes(mass, p.stripes)
        cols = [tuple(r) for r in stripes.tolist()]
        o0 = self.run_modes(q, k, v, layout, ctx, [FULL] * heads, cols)[:, :, vs]
        energy = torch.stack([o0[:, h].float().pow(2).sum(dtype=torch.float64) for h in range(heads)])
        ref = energy.mean()
        err = torch.zeros(heads, 5, dtype=torch.float64)
        if ref > 0:
            err[:, SKIP] = energy.cpu() / ref.cpu()  # a skipped head's video output is exactly zero
            for mode in range(SKIP + 1, STRIPE + 1):
                oi = self.run_modes(q, k, v, layout, ctx, [mode] * heads, cols)[:, :, vs]
                for h in range(heads):
                    diff = (oi[:, h].float() - o0[:, h].float()).pow(2).sum(dtype=torch.float64)
                    err[h, mode] = float(diff) / float(ref)
        err32 = err.float()
        modes = select_modes(err32, mode_sparsity(p, layout, stripes), self.config.lam, self.config.eps)
        self.err_sum[step, layer] += err32.double()
        self.err_count[step, layer] += 1
        self.modes_now[step, layer] = modes
        self.decided[step, layer] = True
        self._choice[step, layer] = (modes.tolist(), cols)

    def finish(self, meta: dict) -> SparseVDiTPlan:
        """The plan from all passes: the rule on the mean error per (step, layer, head),
        stripe columns from the mean attention mass; ``meta`` adds PlanMeta fields."""
        if self.layout is None:
            raise ValueError("no attention call reached the search: was every step and layer scheduled dense "
                             "(dense_steps / dense_layers)?")
        p, layout = self._params, self.layout
        seen = self.err_count > 0
        count = self.err_count.clamp(min=1).double()
        errors = torch.where(seen[..., None, None], self.err_sum / count[..., None, None],
                             torch.tensor(float("nan"), dtype=torch.float64)).float()
        stripes = top_stripes(self.mass_sum / count[..., None, None].float(), p.stripes)
        default = torch.arange(p.stripes, dtype=torch.int32).expand_as(stripes)
        stripes = torch.where(seen[..., None, None], stripes, default).contiguous()
        modes = select_modes(errors, mode_sparsity(p, layout, stripes), self.config.lam, self.config.eps)
        info = PlanMeta(family=call_family(layout), grid=layout.grid,
                        text_len=layout.text_len, text_first=layout.text_first, steps=self.steps,
                        layers=self.layers, heads=self.heads, head_dim=self.head_dim,
                        lam=float(self.config.lam), eps=float(self.config.eps), **p.as_dict(), **meta)
        return SparseVDiTPlan(modes.contiguous(), stripes, errors.contiguous(), info)


@dataclass
class CalibrationResult:
    """What ``calibrate`` made.

    Attributes:
        plan: the plan (also written to ``path`` when one was given).
        path: the written plan file, or None.
        outputs: per prompt, the result of the calibration pass, i.e. of the chosen
            modes: the final latents (``output_type="latent"``, float32 numpy), or with
            ``decode=True`` the decoded frames ``(F, H, W, 3)`` in [0, 1].
        pass_modes: per prompt, the modes chosen on the fly in its pass
            (int8 ``[steps, layers, heads]``); equal to ``plan.modes`` with one prompt.
        seconds: wall time of the passes.
    """

    plan: SparseVDiTPlan
    path: Path | None
    outputs: list[np.ndarray] = field(default_factory=list)
    pass_modes: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0


def calibrate(
    model: str,
    prompts: Sequence[str],
    *,
    out: str | os.PathLike | None = None,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    lam: float | None = None,
    eps: float | None = None,
    seed: int = 0,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    image=None,
    overrides: dict | None = None,
    device: str | None = None,
    dtype: str | None = None,
    model_path: str | os.PathLike | None = None,
    pipe=None,
    progress: Progress | None = None,
    decode: bool = False,
) -> CalibrationResult:
    """Run Sparse-vDiT's search on ``model`` over ``prompts``; return (and write) the plan.

    Args:
        model: registry name (``gen models``), e.g. ``"wan2.1-t2v-1.3b"`` or ``"tiny-wan"``.
        prompts: one or more prompts (see the module docstring for how they combine).
        out: plan file to write (atomically); None to only return the plan.
        steps, height, width, frames, guidance: default to the model's; the plan is valid
            for exactly this step count and geometry.
        lam, eps: the search's cost weight and threshold (default: the config's, 0.5 and 1).
        seed: generator seed of every prompt's pass.
        negative_prompt, image: as for ``gen render`` (``image`` for image-to-video models:
            a path or a PIL image).
        overrides: more ``SparseVDiTConfig`` fields: ``block_size``, ``window``, ``diagonal``,
            ``stripes``, ``dense_steps``, ``dense_layers``, ``backend``.
        device, dtype, model_path, pipe: as for ``gen.render.render``.
        progress: ``progress(done, total, message)`` after each denoising step.
        decode: also run the VAE on each pass's latents (``outputs`` become frames). Off by
            default: the search needs no pixels, and on the tiny Wan the VAE decode is
            8.0 s of a 10.3 s calibration pass (CPU).

    Raises:
        ValueError: unknown model, bad geometry or parameters, unreadable image.
    """
    import gen
    from gen._calibration import load_calibration_model, resolve_calibration
    from gen._io import atomic_path

    prompts, base = resolve_calibration("sparse-vdit", SparseVDiTAttention.families, model, prompts, height=height,
                                        width=width, frames=frames, steps=steps, guidance=guidance, seed=seed,
                                        negative_prompt=negative_prompt)
    spec = base.spec
    height, width, frames, steps, guidance = base.height, base.width, base.frames, base.steps, base.guidance
    if "plan" in (overrides or {}):
        raise ValueError("calibration makes a plan; it does not take plan=.")
    values = dict(overrides or {})
    if lam is not None:
        values["lam"] = lam
    if eps is not None:
        values["eps"] = eps
    config = SparseVDiTConfig(**values)
    loaded = load_calibration_model(base, image=image, device=device, dtype=dtype, model_path=model_path, pipe=pipe,
                                    progress=progress)
    session, layers, heads, image_path = loaded.session, loaded.layers, loaded.heads, loaded.image

    from gen.api import sparsify

    # one install for every prompt: the search keeps its statistics across the passes
    handle = sparsify(session.pipeline(spec.name)[0], SparseVDiTSearch(config), model=spec.name)
    search: SparseVDiTSearch = handle.method
    search.begin(steps, layers, heads)
    total = steps * len(prompts)
    outputs: list[np.ndarray] = []
    t0 = time.perf_counter()
    try:
        for i, prompt in enumerate(prompts):
            search.start_prompt()
            for p in handle.patches:
                p.run.reset()

            def on_step(done: int, _total: int, i=i, prompt=prompt) -> None:
                if progress is not None:
                    progress(i * steps + done, total, f"prompt {i + 1}/{len(prompts)}: {prompt[:40]}")

            job = dataclasses.replace(base, prompt=prompt, image=image_path)
            result = session.run(job, install=False, on_step=on_step, decode=decode)
            value = result.frames if decode else result.latents
            outputs.append(value.float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value))
    finally:
        handle.restore()
        loaded.close()
    seconds = time.perf_counter() - t0
    plan = search.finish(dict(model=spec.name, height=height, width=width, frames=frames,
                              prompts=tuple(prompts), seed=seed, guidance=float(guidance),
                              gen_version=gen.__version__))
    path = None
    if out is not None:
        with atomic_path(out) as tmp:
            plan.save(tmp)
        path = Path(out)
        plan = SparseVDiTPlan(plan.modes, plan.stripes, plan.errors, plan.meta, source=str(path))
    logger.info("sparse-vdit plan for %s: %s", spec.name, plan)
    return CalibrationResult(plan, path, outputs, list(search.prompt_modes), seconds)


def plan_summary(plan: SparseVDiTPlan) -> dict:
    """Share of each mode over the (step, layer, head) entries, the mean video x video
    density and the mean call density (text included) of the plan, and per step."""
    video, call = plan.video_density(), plan.call_density()
    return {
        "shares": plan.shares(),
        "video_density": float(video.mean()),
        "call_density": float(call.mean()),
        "per_step": [
            {name: float((plan.modes[s] == i).float().mean()) for i, name in enumerate(MODE_NAMES)}
            | {"video_density": float(video[s].mean())}
            for s in range(plan.meta.steps)
        ],
    }
