"""``gen bench fidelity``: how close each method stays to dense attention.

Two levels, each method at the model's preset:

* **attention** (``level="attention"``): one attention call, the method's output against
  gen's ``dense`` method on the same ``q, k, v`` (same kernels, so the difference is the
  sparsity alone and dense against itself is exactly 0):
  ``rel_l2 = ||out - ref|| / ||ref||`` and ``cosine = <out, ref> / (||out|| ||ref||)``
  over the whole output tensor, computed in float64. Only the pattern is measured: the
  method's schedule (``dense_steps``/``dense_layers``) is ignored here (the call is taken
  as sparse); per-step methods (``sparse-vdit``) get the call's step and layer. Inputs:

  - ``source="synthetic"``: :func:`synthetic_qkv` at the model's video token grid;
  - ``source="capture sS.lL"``: the calls of a ``gen capture`` file (text tokens and
    their padding included, as in the run).

* **end to end** (``level="e2e"``): the decoded video (or image) of the full pipeline
  with the method against the one with ``dense``, same prompt, seed and steps:
  ``mse`` and ``psnr = 10 log10(1 / mse)`` on pixels in [0, 1] (``None`` when the videos
  are identical: infinite), and ``ssim`` (:func:`ssim`). Here the schedule applies, and
  ``density`` is the run's (scheduled dense calls count 1). The ``dense`` row renders
  dense a second time: it is the run-to-run noise floor (0 on a deterministic device).

``density`` is the fraction of query-key pairs the method computes for the call
(text included).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ._setup import DTYPES, bench_device, bench_dtype
from .common import BenchResult, bench_meta, fmt, resolve_methods

__all__ = ["FidelityRow", "FidelityResult", "synthetic_qkv", "ssim", "psnr", "attention_fidelity",
           "run_fidelity_bench", "save_plot"]

logger = logging.getLogger("gen.bench")


def synthetic_qkv(layout, heads: int, head_dim: int, *, seed: int = 0, sinks: int = 4, sharpness: float = 8.0,
                  sink_bonus: float = 4.0, noise: float = 0.3, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Video-like attention inputs ``q, k, v``, each ``(1, heads, S, head_dim)``, over the
    video tokens of ``layout`` (frame-major ``(t, y, x)``; text is not generated).

    The scaled logits ``q·k / sqrt(D)`` between query token ``i`` at ``p_i = (t, y, x)``
    and key token ``j`` are approximately::

        sharpness * exp(-1/2 * sum_axis ((p_i - p_j)_axis / sigma_axis)^2)   # decay
        + sink_bonus * [j is a sink]                                         # sinks
        + noise terms of order noise^2

    * **decay**: the kernel comes from random Fourier features (``phi(p) = sqrt(2/D)
      cos(W p + b)``, ``W ~ N(0, diag(1/sigma^2))``, ``b ~ U(0, 2 pi)``): ``phi(p)·phi(p')``
      approximates the Gaussian kernel above, so attention decays with distance in
      space and time, as in video DiTs;
    * **spatial heads** (even head indices): ``sigma = (0.5 frames, 3 rows, 3 columns)``,
      attention stays in the query's frame, around its position;
    * **temporal heads** (odd): ``sigma = (4 frames, 0.5 rows, 0.5 columns)``, attention
      follows the query's position through time;
    * **sinks**: the first ``sinks`` tokens (frame 0, row 0) carry a direction ``u`` every
      query also has, adding ``sink_bonus`` to their logits for all queries;
    * ``v`` is standard normal; ``noise`` (relative) is added to ``q`` and ``k`` as content.

    Deterministic for a given ``seed`` (CPU generator).
    """
    g = torch.Generator().manual_seed(seed)
    t_, h_, w_ = layout.frames, layout.height, layout.width
    s = t_ * h_ * w_
    idx = torch.arange(s)
    pos = torch.stack([idx // (h_ * w_), (idx // w_) % h_, idx % w_], dim=-1).double()  # (S, 3)
    q = torch.empty(1, heads, s, head_dim, dtype=torch.float64)
    k = torch.empty_like(q)
    for h in range(heads):
        sigma = torch.tensor([0.5, 3.0, 3.0] if h % 2 == 0 else [4.0, 0.5, 0.5], dtype=torch.float64)
        w = torch.randn(head_dim, 3, generator=g, dtype=torch.float64) / sigma
        b = torch.rand(head_dim, generator=g, dtype=torch.float64) * 2 * math.pi
        phi = math.sqrt(2.0 / head_dim) * torch.cos(pos @ w.T + b)  # (S, D)
        u = torch.randn(head_dim, generator=g, dtype=torch.float64)
        u = u / u.norm()
        nq = torch.randn(s, head_dim, generator=g, dtype=torch.float64) * noise / math.sqrt(head_dim)
        nk = torch.randn(s, head_dim, generator=g, dtype=torch.float64) * noise / math.sqrt(head_dim)
        sink = (idx < sinks).double()[:, None]
        # SDPA divides by sqrt(D): pre-scale q so the logits are the ones documented above
        q[0, h] = math.sqrt(head_dim) * (sharpness * phi + u + nq)
        k[0, h] = phi + sink_bonus * sink * u + nk
    v = torch.randn(1, heads, s, head_dim, generator=g, dtype=torch.float64)
    return tuple(x.to(device, dtype) for x in (q, k, v))


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of two videos or images (Wang et al. 2004).

    ``a, b``: ``(F, H, W, C)`` (or ``(H, W, C)``) pixels in ``[0, data_range]``. Local
    means, variances and covariance under an ``window x window`` Gaussian (``sigma``),
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, over the "valid" region (no padding), on
    each channel of each frame; the mean of the SSIM map over all of them. Frames
    smaller than the window use a window of their smaller side (odd). 1.0 = identical.
    """
    a, b = (torch.as_tensor(x, dtype=torch.float64) for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.dim() == 3:
        a, b = a[None], b[None]
    x = a.permute(0, 3, 1, 2).reshape(-1, 1, a.shape[1], a.shape[2])  # (F*C, 1, H, W)
    y = b.permute(0, 3, 1, 2).reshape(-1, 1, b.shape[1], b.shape[2])
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2
    g = _gaussian_window(size, sigma, torch.float64)

    def blur(z):  # separable Gaussian filter, valid region
        z = torch.nn.functional.conv2d(z, g.view(1, 1, 1, -1))
        return torch.nn.functional.conv2d(z, g.view(1, 1, -1, 1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(smap.mean())


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> tuple[float, float | None]:
    """``(mse, psnr in dB)`` of pixels in ``[0, data_range]``; psnr is ``None`` (infinite)
    when ``mse == 0``."""
    a, b = (torch.as_tensor(x, dtype=torch.float64) for x in (a, b))
    mse = float(((a - b) ** 2).mean())
    return mse, (None if mse == 0 else 10.0 * math.log10(data_range**2 / mse))


@dataclass
class FidelityRow:
    """One comparison against dense (see the module docstring); ``None`` = not measured."""

    level: str
    source: str
    method: str
    density: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    mse: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    note: str = ""


class FidelityResult(BenchResult):
    """Result of :func:`run_fidelity_bench`: ``meta`` and :class:`FidelityRow` rows."""

    def to_markdown(self) -> str:
        m = self.meta
        lines = [self.header(), "", f"{m['model']}: {m['sources']}", "",
                 "| level | source | method | density | rel. L2 | cosine | PSNR (dB) | SSIM | note |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            p = "∞" if r.mse == 0 else fmt(r.psnr, ".2f")
            lines.append(f"| {r.level} | {r.source} | {r.method} | {fmt(r.density, '.3f')} | {fmt(r.rel_l2, '.2e')} | "
                         f"{fmt(r.cosine, '.5f')} | {p} | {fmt(r.ssim, '.4f')} | {r.note} |")
        return "\n".join(lines)


def _compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    o, r = out.double().flatten(), ref.double().flatten()
    rn, on = r.norm(), o.norm()
    rel = float((o - r).norm() / rn.clamp_min(1e-300))
    cos = float(torch.dot(o, r) / (on * rn).clamp_min(1e-300))
    return rel, cos


def attention_fidelity(q, k, v, layout, methods, *, source: str, ctx=None) -> list[FidelityRow]:
    """Rows for ``methods`` (``[(label, method or None, skip note)]``) on one call
    ``q, k, v`` ``(B, H, S, D)`` with ``layout``; the reference is gen's ``dense``."""
    from gen.attention import AttentionContext
    from gen.attention.methods import get_method

    ctx = ctx or AttentionContext()
    ref = get_method("dense").attention(q, k, v, layout, ctx)
    rows = []
    for label, method, skip in methods:
        if method is None:
            rows.append(FidelityRow("attention", source, label, note=f"skipped: {skip}"))
            continue
        try:
            if hasattr(method, "reset_observed"):
                method.reset_observed()  # a dynamic method's density: this call's alone
            out = method.attention(q, k, v, layout, ctx)
            try:
                dens = method.density(layout, q.shape[1], ctx)
            except NotImplementedError:  # dynamic methods: no static pattern to count
                dens = None
        except ValueError as err:  # e.g. a plan for another geometry
            rows.append(FidelityRow("attention", source, label, note=f"skipped: {err}"))
            continue
        rel, cos = _compare(out, ref)
        rows.append(FidelityRow("attention", source, label, dens, rel, cos))
    return rows


def run_fidelity_bench(
    model: str,
    methods: str,
    *,
    capture: str | Path | None = None,
    synthetic: bool = True,
    e2e: bool = True,
    plan: str | Path | None = None,
    prompt: str = "a red panda walking through a snowy forest, cinematic",
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    model_path: str | Path | None = None,
    command: str | None = None,
    progress=None,
) -> FidelityResult:
    """Run the fidelity benchmark (see the module docstring).

    Args:
        model: registry name; its presets, token grid and (for ``e2e``) pipeline.
        methods: comma-separated method names (``dense`` is the reference; ``mask`` is
            skipped, ``sparse-vdit`` needs ``plan``).
        capture: a ``gen capture`` file to measure on (its model's presets apply).
        synthetic: measure on :func:`synthetic_qkv` at the model's video grid.
        e2e: render with every method and compare to the dense render.
        steps, height, width, frames: pipeline settings for ``e2e`` (default the model's).
        seed: synthetic generator and pipeline seed.
        device: default CUDA when available. ``dtype``: attention-level inputs (default
            fp32) and the pipeline's (default the model's).
        progress: optional ``callable(done, total, what)``.
    """
    from gen.attention import AttentionContext, TokenLayout
    from gen.pipelines import get_spec

    spec = get_spec(model)
    dev = bench_device(device)
    if dtype is not None:  # None: each part's own default (the model's dtype for the renders)
        bench_dtype(dtype, dev)
    cap = None
    if capture is not None:
        from gen.capture import load_capture

        cap = load_capture(capture)
        if cap.meta["model"] != spec.name:
            raise ValueError(f"the capture is of {cap.meta['model']!r}, not {spec.name!r}: pass --model "
                             f"{cap.meta['model']}.")
    if not (synthetic or e2e or cap):
        raise ValueError("nothing to measure: enable --synthetic or --e2e, or pass --capture FILE.")
    choices = resolve_methods(methods, spec, plan=plan, allow_stock=False)
    built = []
    for c in choices:
        built.append((c.label, None if c.skip else c.build(spec), c.skip))
    attn_dtype = DTYPES[dtype or "fp32"]
    head_dim = spec.head_dim
    sources = []
    if synthetic:
        sources.append(f"synthetic {'x'.join(map(str, spec.token_grid()))} x {spec.heads} heads x {head_dim}")
    if cap:
        sources.append(f"capture {Path(capture).name} ({len(cap.calls)} calls)")
    if e2e:
        sources.append("end to end")
    result = FidelityResult(meta=bench_meta(
        dev, command, model=spec.name, family=spec.family, sources="; ".join(sources), seed=seed,
        attention_dtype=str(attn_dtype).removeprefix("torch."), reference="gen dense method",
        capture=None if cap is None else {**cap.meta, "file": str(capture)},
    ))
    say = progress or (lambda done, total, what: None)
    total = int(synthetic) + (len(cap.calls) if cap else 0) + (len(built) + 1 if e2e else 0)
    done = 0

    if synthetic:
        say(done, total, "synthetic inputs")
        t, h, w = spec.token_grid()
        layout = TokenLayout(t, h, w)
        q, k, v = synthetic_qkv(layout, spec.heads, head_dim, seed=seed, device=dev, dtype=attn_dtype)
        result.rows += attention_fidelity(q, k, v, layout, built, source="synthetic",
                                          ctx=AttentionContext(step_index=0, layer_index=0))
        done += 1
    for call in cap.calls if cap else []:
        say(done, total, f"capture {call.key}")
        ctx = AttentionContext(step_index=call.step, num_steps=cap.meta.get("num_steps"), layer_index=call.layer,
                               branch=call.branch,
                               kv_valid=None if call.kv_valid is None else call.kv_valid.to(dev))
        q, k, v = (x.to(dev, attn_dtype) for x in (call.q, call.k, call.v))
        result.rows += attention_fidelity(q, k, v, call.layout, built, source=f"capture {call.key}", ctx=ctx)
        done += 1
    if e2e:
        result.rows += _e2e_rows(spec, choices, prompt=prompt, steps=steps, height=height, width=width,
                                 frames=frames, seed=seed, device=dev, dtype=dtype and DTYPES[dtype],
                                 model_path=model_path, say=lambda what: say(done + what[0], total, what[1]))
    return result


def _e2e_rows(spec, choices, *, prompt, steps, height, width, frames, seed, device, dtype, model_path, say):
    from gen.session import RenderJob, Session

    from .e2e import _densities

    if spec.task == "i2v":
        return [FidelityRow("e2e", "video", c.label, note=f"skipped: {spec.name} needs an input image") for c in choices]
    base = RenderJob(prompt, model=spec.name, height=height, width=width, frames=frames, steps=steps,
                     seed=seed).resolved()
    say((0, "loading the pipeline"))
    session = Session(device=device, dtype=dtype, model_path=model_path, progress=False)
    session.pipeline(spec.name)

    def render(name: str, overrides: dict):
        # the frames as written (uint8), so the PSNR is the one a viewer of the files sees
        out = session.run(dataclasses.replace(base, attention=name, overrides=overrides))
        _, run_density, _, _ = _densities(out.attention)
        return torch.from_numpy(out.frames.astype("float64") / 255.0), run_density

    source = "video" if spec.is_video else "image"
    ref, _ = render("dense", {})
    say((1, "dense reference"))
    rows = []
    for i, c in enumerate(choices, 2):
        if c.skip:
            rows.append(FidelityRow("e2e", source, c.label, note=f"skipped: {c.skip}"))
            continue
        # dense renders again: its row is the run-to-run noise floor (0 when deterministic)
        frames_, dens = render(c.name, c.overrides)
        mse, p = psnr(frames_, ref)
        rows.append(FidelityRow("e2e", source, c.label, dens, mse=mse, psnr=p, ssim=ssim(frames_, ref),
                                note="identical to dense" if mse == 0 else ""))
        say((i, f"{c.label} render"))
    return rows


def save_plot(result: FidelityResult, path: str | Path) -> Path:
    """PNG: attention-level relative L2 error vs density per method (left) and
    end-to-end PSNR vs run density (right, when measured)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .e2e import _save

    att = [r for r in result.rows if r.level == "attention" and r.rel_l2 is not None]
    vid = [r for r in result.rows if r.level == "e2e" and r.mse is not None]
    fig, axes = plt.subplots(1, 2 if vid else 1, figsize=(10 if vid else 6, 4), dpi=120, squeeze=False)
    ax = axes[0][0]
    for method in dict.fromkeys(r.method for r in att):
        pts = [(r.density, r.rel_l2) for r in att if r.method == method and r.density is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=method, alpha=0.8)
    ax.set_xlabel("density (query-key pairs computed / dense)")
    ax.set_ylabel("relative L2 error vs dense (attention output)")
    ax.set_title(f"{result.meta['model']}: attention-level error", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if vid:
        ax = axes[0][1]
        for r in vid:
            y = r.psnr if r.psnr is not None else float("nan")  # identical: no finite PSNR to draw
            ax.plot([r.density], [y], "o", label=r.method)
        ax.set_xlabel("run density")
        ax.set_ylabel("PSNR vs dense (dB)")
        ax.set_title("end to end", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result.meta['device']}", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
