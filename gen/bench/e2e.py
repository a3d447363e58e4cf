"""``gen bench e2e``: whole denoising runs, dense vs each sparse method, same seed.

Per method (``--attention stock,dense,radial,…``; ``stock`` is the model's own
attention, see ``gen.bench.common.STOCK``) one run of the model at its native geometry,
and per run:

* ``total_s``: wall time of the run; ``denoise_s``: of its denoising steps only;
  ``step_ms``: median step, ``steps_ms``: every step (milliseconds);
* ``attention_s`` / ``attention_share``: time inside the self/joint attention calls gen
  routes (every call of gen's processors' ``_attend``: the method's sparse kernel, or
  the stock dispatcher for steps/layers the schedule keeps dense), and its share of
  ``denoise_s``. Timed per call: ``time.perf_counter`` on the CPU, a pair of CUDA events
  per call on a GPU (summed after the run; no synchronisation inside the run). Cross-
  attention, projections, norms and RoPE are outside it;
* ``peak_mem_mb``: CUDA: ``torch.cuda.max_memory_allocated`` during the run (weights
  included) and ``peak_mem_delta_mb`` its growth over the memory held before the run.
  CPU: ``tracemalloc`` does not see torch's allocator, so the process's peak resident
  set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after the run, and its growth during
  the run (0 when the run stayed under an earlier peak of the process: a lower bound);
* ``density``: the method's pattern density at the call's layout (fraction of query-key
  pairs) and ``run_density``: averaged over all attention calls of the run, the calls
  the schedule keeps dense counting 1;
* ``speedup``: the baseline's ``denoise_s`` over this run's (baseline: ``stock`` when
  asked, else ``dense``, else the first method), ``attn_speedup`` likewise on
  ``attention_s``.

Two ways to run:

* default: the real pipeline (``gen.pipelines.load``: tiny models are built offline, real
  ones need their weights in the local Hugging Face cache), prompt to decoded frames;
  ``total_s`` includes text encoding and the VAE, steps are timed by
  ``callback_on_step_end``;
* ``random_weights=True``: the real transformer architecture from its config
  (``pipelines/configs/<model>/transformer.json``; tiny models from
  ``gen.pipelines.tiny.TINY_CONFIGS``) with random weights, so timing at full scale needs
  no checkpoint (same shapes, same FLOPs). Only the transformer's denoising loop runs:
  random latents and text embeddings of the pipeline's shapes (text length
  ``ModelSpec.text_tokens``), a flow-matching Euler update, decreasing timesteps, two
  transformer passes per step for classifier-free guidance (Wan, guidance > 1) and one
  otherwise. No text encoders and no VAE: ``total_s == denoise_s``.

With ``ulysses=N`` (``torchrun --nproc_per_node N -m gen bench e2e ... --ulysses N``) every
process runs every method together, each attention call shared by the N processes
(diffusers' Ulysses context parallelism, ``gen.parallel``): the times are rank 0's and
``attention_s`` includes the all-to-alls; the meta records the degree.

Before each timed run an untimed warm-up compiles the kernels (Triton's JIT would
otherwise land in the first step): one step with the method's dense-step schedule off,
so both the sparse and the scheduled-dense paths run once.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gen.pipelines.architecture import (
    CONFIG_DIR,
    build_random_transformer,
    random_transformer_inputs,
    transformer_config,
)
from gen.values import check_ulysses

from ._setup import DTYPES, bench_device, bench_dtype
from .common import STOCK, BenchResult, bench_meta, fmt, resolve_methods

__all__ = ["E2ERow", "E2EResult", "CONFIG_DIR", "transformer_config", "build_random_transformer", "run_e2e_bench",
           "save_plot"]

logger = logging.getLogger("gen.bench")


def _passes_per_step(spec, guidance: float) -> int:
    """Transformer calls per denoising step: 2 with classifier-free guidance (Wan, guidance
    > 1), 1 for guidance-distilled models (guidance is an input) or no guidance."""
    return 2 if not spec.guidance_embedded and guidance > 1.0 else 1


class _AttentionTimer:
    """Times every ``_attend`` call of gen's processors on the handle's transformers
    (see the module docstring); ``seconds()`` after the run."""

    def __init__(self, handle, device: torch.device) -> None:
        from gen.attention.processors import attention_modules

        self.cuda = device.type == "cuda"
        self.events: list = []
        self.total = 0.0
        self.calls = 0
        self._procs = []
        for patch in handle.patches:
            for _, module in attention_modules(patch.transformer, patch.adapter):
                proc = module.processor
                proc._attend = self._wrap(proc._attend)  # instance attribute shadows the method
                self._procs.append(proc)

    def _wrap(self, attend):
        def timed(*args, **kwargs):
            self.calls += 1
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = attend(*args, **kwargs)
                end.record()
                self.events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = attend(*args, **kwargs)
            self.total += time.perf_counter() - t0
            return out

        return timed

    def reset(self) -> None:
        self.events.clear()
        self.total, self.calls = 0.0, 0

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return self.total + sum(s.elapsed_time(e) for s, e in self.events) / 1e3
        return self.total

    def remove(self) -> None:
        for proc in self._procs:
            proc.__dict__.pop("_attend", None)
        self._procs = []


class _Memory:
    """Peak memory of a run (see the module docstring): ``start()``, run, ``stop()``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    @staticmethod
    def _rss_mb() -> float:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.base = self._rss_mb()

    def stop(self) -> tuple[float, float]:
        """``(peak_mb, growth_mb)``."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = self._rss_mb()
        return peak, max(0.0, peak - self.base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class E2ERow:
    """One method's run (see the module docstring for the columns). Times in seconds
    (``*_s``) or milliseconds (``*_ms``), memory in MiB; ``None`` = not measured."""

    method: str
    config: str = ""
    density: float | None = None
    run_density: float | None = None
    total_s: float | None = None
    denoise_s: float | None = None
    step_ms: float | None = None
    attention_s: float | None = None
    attention_share: float | None = None
    attention_calls: int = 0
    sparse_calls: int = 0
    dense_calls: int = 0
    peak_mem_mb: float | None = None
    peak_mem_delta_mb: float | None = None
    speedup: float | None = None
    attn_speedup: float | None = None
    steps_ms: list[float] = field(default_factory=list)
    note: str = ""


class E2EResult(BenchResult):
    """Result of :func:`run_e2e_bench`: ``meta`` and :class:`E2ERow` rows."""

    def to_markdown(self) -> str:
        m = self.meta
        geo = f"{m['width']}x{m['height']}" + (f"x{m['frames']}f" if m["frames"] > 1 else "")
        lines = [
            self.header(),
            "",
            f"{m['model']} at {geo}, {m['steps']} steps, {m['dtype']}, "
            f"{'random weights, transformer loop only' if m['random_weights'] else 'full pipeline'}, seed {m['seed']}",
            "",
            "| method | density | run density | total (s) | denoise (s) | step (ms) | attention (s) | attn. share "
            "| peak mem (MiB) | speedup | attn. speedup | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            share = None if r.attention_share is None else 100 * r.attention_share
            lines.append(
                f"| {r.method} | {fmt(r.density, '.3f')} | {fmt(r.run_density, '.3f')} | {fmt(r.total_s, '.2f')} | "
                f"{fmt(r.denoise_s, '.2f')} | {fmt(r.step_ms, '.1f')} | {fmt(r.attention_s, '.2f')} | "
                f"{fmt(share, '.0f')}{'' if share is None else ' %'} | {fmt(r.peak_mem_mb, '.0f')} | "
                f"{fmt(r.speedup, '.2f')} | {fmt(r.attn_speedup, '.2f')} | {r.note} |"
            )
        return "\n".join(lines)


def _densities(summary: dict) -> tuple[float | None, float | None, int, int]:
    """(pattern density, run density, sparse calls, dense calls) from a sparsify handle's summary."""
    sparse = dense = 0
    dens: list[float] = []
    for t in summary.get("transformers", []):
        sparse += t["sparse_calls"]
        dense += t["dense_calls"]
        dens += [d for d in t["density"].values() if d is not None]
    pattern = statistics.fmean(dens) if dens else None
    calls = sparse + dense
    if not calls:
        return pattern, None, 0, 0
    run = None if pattern is None and sparse else ((pattern or 0.0) * sparse + dense) / calls
    return pattern, run, sparse, dense


def run_e2e_bench(
    model: str,
    methods: str,
    *,
    random_weights: bool = False,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    prompt: str = "a red panda walking through a snowy forest, cinematic",
    guidance: float | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    warmup: bool = True,
    plan: str | Path | None = None,
    model_path: str | Path | None = None,
    command: str | None = None,
    progress=None,
    ulysses: int = 1,
) -> E2EResult:
    """Run the end-to-end benchmark (see the module docstring).

    Args:
        model: registry name (``gen models``).
        methods: comma-separated methods, each at the model's preset; ``stock`` for the
            unmodified attention. ``mask`` is skipped, ``sparse-vdit`` needs ``plan``.
        random_weights: time the transformer loop of the real architecture with random
            weights instead of the loaded pipeline.
        steps, height, width, frames, guidance: default to the model's own.
        device, dtype: default CUDA/bf16 when available, else CPU/fp32.
        seed: seed of latents, prompt embeddings (random weights) or the pipeline's
            generator; the same for every method.
        warmup: run the untimed warm-up step first.
        plan: ``gen calibrate sparse-vdit`` plan file (enables ``sparse-vdit``).
        model_path: local folder with the model's diffusers weights (pipeline mode).
        progress: optional ``callable(done, total, what)``.
        ulysses: processes that share each attention call (joins the process group that
            ``torchrun`` describes; must equal the number launched). 1: this process alone.
    """
    from gen.pipelines import check_geometry, get_spec

    spec = get_spec(model)
    height, width, frames = height or spec.height, width or spec.width, frames or spec.frames
    steps = steps or spec.steps
    guidance = spec.guidance if guidance is None else guidance
    check_geometry(spec, height, width, frames)
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}.")
    dev = bench_device(device)
    dtype = bench_dtype(dtype, dev)
    check_ulysses(ulysses)
    choices = resolve_methods(methods, spec, plan=plan)
    say = progress or (lambda done, total, what: None)
    if ulysses > 1:
        from gen.parallel import init_distributed

        _, _, dev = init_distributed(dev.type)  # cuda:LOCAL_RANK on GPUs

    result = E2EResult(meta=bench_meta(
        dev, command, model=spec.name, family=spec.family, height=height, width=width, frames=frames,
        steps=steps, guidance=guidance, dtype=dtype, seed=seed, random_weights=random_weights, ulysses=ulysses,
        token_grid=list(spec.token_grid(height, width, frames)), text_tokens=spec.text_tokens,
        passes_per_step=_passes_per_step(spec, guidance), warmup=warmup,
        attention_timing="cuda events per _attend call" if dev.type == "cuda" else "perf_counter per _attend call",
        memory="torch.cuda.max_memory_allocated" if dev.type == "cuda" else "ru_maxrss (process peak RSS)",
    ))
    runnable = [c for c in choices if not c.skip]
    total = len(runnable) * (steps + (1 if warmup else 0))
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        say(done, total, what)

    say(0, total, f"building {spec.name}")
    if random_weights:
        from gen.session import TransformerLoop

        target = build_random_transformer(spec, device=dev, dtype=DTYPES[dtype], seed=seed)
        if ulysses > 1:
            from gen.parallel import enable_ulysses

            enable_ulysses(target, ulysses)
        key, latents, inputs = random_transformer_inputs(spec, target, height=height, width=width, frames=frames,
                                              guidance=guidance, device=dev, dtype=DTYPES[dtype], seed=seed)
        runner = TransformerLoop(spec, target, latents=latents, key=key, kwargs=inputs, steps=steps,
                                 passes=_passes_per_step(spec, guidance), device=dev)
    else:
        from gen.session import Session

        session = Session(device=dev, dtype=dtype, model_path=model_path, progress=False, ulysses=ulysses)
        target = session.pipeline(spec.name)[0]
        runner = _PipelineRun(spec, session, prompt=prompt, height=height, width=width, frames=frames, steps=steps,
                              guidance=guidance, seed=seed)

    for choice in choices:
        if choice.skip:
            result.rows.append(E2ERow(choice.label, note=f"skipped: {choice.skip}"))
            continue
        result.rows.append(_run_method(choice, spec, target, runner, dev, warmup, tick))
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    _add_speedups(result.rows)
    return result


def _run_method(choice, spec, target, runner, dev: torch.device, warmup: bool, tick) -> E2ERow:
    from gen.api import sparsify

    method = choice.build(spec)
    row = E2ERow(choice.label, config=repr(method.config))
    if warmup:
        try:
            # dense_steps off: the sparse path runs in the one warm-up step
            with_schedule_off = {**choice.overrides, "dense_steps": 0}
            warm = sparsify(target, choice.name, model=spec.name, **with_schedule_off)
            try:
                with torch.inference_mode():
                    runner.warmup()
            finally:
                warm.restore()
        except ValueError as err:  # e.g. a plan bound to the full step count
            logger.debug("short warm-up refused (%s); warming up with a full run", err)
            with sparsify(target, method, model=spec.name), torch.inference_mode():
                runner.run(lambda what: None)
        tick(f"{choice.label}: warm-up")
    handle = sparsify(target, method, model=spec.name)
    timer = _AttentionTimer(handle, dev)
    mem = _Memory(dev)
    try:
        handle.reset()
        timer.reset()
        mem.start()
        with torch.inference_mode():
            total_s, steps_s = runner.run(lambda what: tick(f"{choice.label}: {what}"))
        row.peak_mem_mb, row.peak_mem_delta_mb = mem.stop()
        row.attention_s = timer.seconds()
        row.attention_calls = timer.calls
        row.density, row.run_density, row.sparse_calls, row.dense_calls = _densities(handle.summary())
        if row.sparse_calls == 0 and row.dense_calls and row.density is not None and row.density < 1.0:
            # e.g. radial's preset keeps its first 12 steps dense: a 4-step run times dense attention
            row.note = "never ran sparse: its dense steps/layers cover the whole run (time more --steps)"
            logger.warning("%s: %s", choice.label, row.note)
    finally:
        timer.remove()
        handle.restore()
    row.total_s = total_s
    row.denoise_s = sum(steps_s)
    row.steps_ms = [1e3 * s for s in steps_s]
    row.step_ms = statistics.median(row.steps_ms)
    row.attention_share = row.attention_s / row.denoise_s if row.denoise_s > 0 else None
    return row


def _add_speedups(rows: list[E2ERow]) -> None:
    ran = [r for r in rows if r.denoise_s is not None]
    if not ran:
        return
    by_name = {r.method: r for r in ran}
    base = by_name.get(STOCK) or by_name.get("dense") or ran[0]
    for r in ran:
        r.speedup = base.denoise_s / r.denoise_s if r.denoise_s else None
        if r.attention_s and base.attention_s:
            r.attn_speedup = base.attention_s / r.attention_s
        if r is base:
            r.note = (r.note + " baseline").strip()


class _PipelineRun:
    """One call of the loaded pipeline from a fixed seed through the run core; the steps
    are timed by the run core's step marks (synchronised on CUDA)."""

    def __init__(self, spec, session, *, prompt, height, width, frames, steps, guidance, seed) -> None:
        from gen.session import RenderJob

        if spec.task == "i2v":
            raise ValueError(f"{spec.name} needs an input image; time its T2V sibling or use --random-weights.")
        self.session, self.steps = session, steps
        self.job = RenderJob(prompt, model=spec.name, height=height, width=width, frames=frames, steps=steps,
                             guidance=guidance, seed=seed)

    def warmup(self) -> None:
        self.session.run(dataclasses.replace(self.job, steps=1), install=False)

    def run(self, tick) -> tuple[float, list[float]]:
        out = self.session.run(self.job, install=False, on_step=lambda i, n: tick(f"step {i}/{n}"))
        return out.seconds, out.step_seconds


def save_plot(result: E2EResult, path: str | Path) -> Path:
    """PNG of end-to-end speedup vs run density, one point per method, with 1/density."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    pts = [r for r in result.rows if r.speedup is not None and r.run_density]
    for r in pts:
        ax.plot([r.run_density], [r.speedup], "o", label=r.method)
        ax.annotate(r.method, (r.run_density, r.speedup), fontsize=7, xytext=(4, 4), textcoords="offset points")
    dens = sorted({r.run_density for r in pts})
    if dens:
        xs = [min(dens) * 0.8, 1.0]
        ax.plot(xs, [1 / x for x in xs], "k--", lw=0.8, label="attention-only ideal 1/density")
    ax.set_xlabel("run density (attention pairs computed / dense)")
    ax.set_ylabel("end-to-end speedup (denoising)")
    m = result.meta
    ax.set_title(f"{m['model']} on {m['device']} ({m['dtype']}, {m['steps']} steps)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    from gen._io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
