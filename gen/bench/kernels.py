"""``gen bench kernels``: block-sparse attention vs dense SDPA, in one run.

For each plan (dense and random plans at the asked densities) at one of the native
attention shapes below, time our kernel and torch's ``scaled_dot_product_attention``
(every SDPA backend that runs on the device), and report:

* ``time_ms``: median wall time of one forward call;
* ``tflops``: useful work, ``4 * B * H * Sq * Skv * D * density`` FLOPs per call;
* ``speedup``: best dense SDPA time / our time;
* ``pct_ideal``: speedup / (1 / density) in percent (100 % = time scales with density);
* ``rel_err``: ``||out - ref|| / ||ref||`` against the PyTorch reference in fp64 on the
  same plan (a correctness check riding along, not a benchmark figure);
* ``plan_ms``: estimation time per call of a dynamic method (one whose plan depends on
  ``q``/``k``, e.g. ``rectified``: pooling, pooled scores, selection, R and C), timed
  apart from the attention it plans; static plans are built once and cached (``None``).

A plan with per-visit pooling levels (``psa``: ``visit_data["level"]``) is timed with the
pyramid operation (``gen.attention.pyramid``: backends ``triton``, ``masked``, ``torch``,
or ``auto``; the others have no pyramid variant and are listed as skipped), its pooled-key
tile 32 and pyramid up to the plan's highest level; its ``density`` counts a level-``L``
visit as ``1/L`` and ``rel_err`` is against the fp64 pyramid reference.

A chunk plan (``vmoba``: chunks of any length, a per-token chunk bitmask) is timed with
the chunk operation (``gen.attention.chunk_sparse``: backends ``triton``, ``torch``, or
``auto``; the others are listed as skipped); its ``density`` is the fraction of pairs its
rows attend and ``rel_err`` is against the fp64 chunk reference.

On CUDA each plain plan is also timed with PARO's INT8 kernel (``gen.attention.quant``:
``int8`` = INT8 QK, ``int8-pv`` = INT8 QK and PV; rows ``triton int8`` / ``triton int8-pv``
beside the plain kernel and SDPA, their ``rel_err`` the quantization error against the
unquantized fp64 reference; ``quant=()`` turns them off).

Third-party baselines in the same run (``gen.bench.baselines``): ``flex`` (compiled torch
``flex_attention`` with a ``BlockMask`` of the same plan, CUDA only) and dense
``xformers`` (when installed). What did not run is listed in ``meta["skipped"]``.

On the CPU the numbers only show the harness works; speed claims come from a GPU run
recorded in BENCHMARKS.md. ``--quick`` shrinks the shape so the whole run takes
seconds on a laptop CPU (used in CI).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._setup import DTYPES, bench_device, bench_dtype

__all__ = ["AttentionShape", "SHAPES", "QUICK_SHAPE", "KernelBenchRow", "run_kernel_bench"]


@dataclass(frozen=True)
class AttentionShape:
    """One attention call's shape: ``(batch, heads, seq_len, head_dim)`` in tokens.

    ``text_len`` tokens are part of ``seq_len`` (joint attention); plans here treat all
    tokens alike, so it is informational.
    """

    name: str
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    text_len: int = 0


# Native shapes of the supported models (self-attention of one transformer block).
SHAPES: dict[str, AttentionShape] = {
    s.name: s
    for s in (
        AttentionShape("wan2.1-1.3b-480p", 1, 12, 32760, 128),  # 21 x 30 x 52 latent tokens
        AttentionShape("wan2.1-14b-720p", 1, 40, 75600, 128),  # 21 x 45 x 80
        AttentionShape("hunyuan-720p-129f", 1, 24, 118800 + 256, 128, text_len=256),  # 33 x 45 x 80 + text
        AttentionShape("flux-1024", 1, 24, 4096 + 512, 128, text_len=512),
        AttentionShape("flux-4096", 1, 24, 65536 + 512, 128, text_len=512),
        # CPU-sized: long enough (S >= 4096) for the sparse CPU backends to show their
        # scaling, short enough to time on a 2-core CPU in seconds
        AttentionShape("cpu-4k", 1, 4, 4096, 64),
    )
}
QUICK_SHAPE = AttentionShape("quick", 1, 2, 1000, 64)


@dataclass
class KernelBenchRow:
    """One timed configuration (see the module docstring for the columns)."""

    impl: str
    plan: str
    density: float
    time_ms: float
    tflops: float
    speedup: float | None = None
    pct_ideal: float | None = None
    rel_err: float | None = None
    note: str = ""
    plan_ms: float | None = None


@dataclass
class KernelBenchResult:
    meta: dict
    rows: list[KernelBenchRow] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "rows": [asdict(r) for r in self.rows]}, indent=2)

    def to_markdown(self) -> str:
        m = self.meta
        lines = [
            f"`{m['command']}` — {m['device']}, {m['shape']['name']} "
            f"(B={m['shape']['batch']}, H={m['shape']['heads']}, S={m['shape']['seq_len']}, "
            f"D={m['shape']['head_dim']}), {m['dtype']}, torch {m['torch']}, triton {m['triton']}, "
            f"commit {m['commit']}, {m['date']}",
            "",
            "| impl | plan | density | time (ms) | TFLOP/s | speedup vs best SDPA | % of ideal | rel. err | estimation (ms) | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]

        def f(x, fmt):
            return "–" if x is None else format(x, fmt)

        for r in self.rows:
            lines.append(
                f"| {r.impl} | {r.plan} | {r.density:.3f} | {r.time_ms:.3f} | {r.tflops:.2f} | "
                f"{f(r.speedup, '.2f')} | {f(r.pct_ideal, '.0f')} | {f(r.rel_err, '.1e')} | "
                f"{f(r.plan_ms, '.3f')} | {r.note} |"
            )
        return "\n".join(lines)


def _time_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn()``; CUDA timed by Triton's ``do_bench`` (L2 flushed)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sdpa_backends(device: torch.device):
    """(name, context manager factory) for each SDPA backend worth timing on ``device``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return [("sdpa", contextlib.nullcontext)]  # torch picks its CPU kernel
    out = []
    for name, be in (
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa-cudnn", getattr(SDPBackend, "CUDNN_ATTENTION", None)),
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        if be is not None:
            out.append((name, lambda be=be: sdpa_kernel([be])))
    return out


def _commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


@torch.no_grad()  # an inference benchmark (compiled flex on the CPU also needs it)
def run_kernel_bench(
    shape: AttentionShape,
    densities: list[float],
    *,
    dtype: str = "bf16",
    device: str | None = None,
    backends: list[str] | None = None,
    block_m: int = 128,
    block_n: int = 64,
    reps: int = 5,
    seed: int = 0,
    check: bool = True,
    command: str | None = None,
    progress=None,
    plans: list[tuple[str, object]] | None = None,
    quant: tuple[str, ...] = ("int8", "int8-pv"),
    flex: bool = True,
) -> KernelBenchResult:
    """Run the kernel benchmark and return its rows (see the module docstring).

    Args:
        shape: attention shape to time.
        densities: plan densities; 1.0 is the dense plan, others are random plans with
            a fixed number of key blocks per query block.
        dtype: "bf16", "fp16" or "fp32".
        device: "cuda", "cpu" or None (CUDA when available).
        backends: gen backends to time (``gen.attention.BACKENDS``, or ``"auto"``: the
            automatic choice, labelled with what it chose); default: triton on CUDA; on
            the CPU auto, sdpa, gather, flex and torch side by side. A named backend that
            cannot run a plan (sdpa on a sparse plan, say) is listed in ``meta["skipped"]``
            with the reason.
        block_m, block_n: plan block sizes in tokens.
        reps: timed repetitions on the CPU (CUDA uses do_bench's own).
        seed: seed for inputs and random plans.
        check: also compute ``rel_err`` against the fp64 PyTorch reference.
        plans: extra ``(label, BlockPlan)`` pairs to time, e.g. a method preset's plan at
            the shape (``gen bench kernels --method radial``); their ``q_len`` must equal
            ``shape.seq_len``. A dynamic method gives a planner instead of a plan,
            ``planner(q, k, v) -> BlockPlan``: it runs on the bench's inputs, and its own
            time is reported as ``plan_ms``.
        progress: optional callable(str) told what runs next.
        quant: INT8 modes (PARO's kernel, ``gen.attention.quant``) also timed on each
            plain plan, on CUDA only (the interpreter's time means nothing): rows
            ``<backend> int8`` / ``<backend> int8-pv`` beside the plain kernel and SDPA,
            ``rel_err`` against the unquantized fp64 reference (the quantization error).
        flex: also time compiled ``flex_attention`` on each plan (CUDA only). Its first
            compile takes tens of seconds; off, the run lists it in ``meta["skipped"]``.
    """
    from gen.attention import BlockPlan, block_sparse_attention
    from gen.attention import reference as ref_mod
    from gen.attention.backends import choose
    from gen.attention.backends.block_sparse import describe

    dev = bench_device(device)
    dtype = bench_dtype(dtype, dev)
    backends = backends or (["triton"] if dev.type == "cuda" else ["auto", "sdpa", "masked", "gather", "flex", "torch"])
    gen_ = torch.Generator().manual_seed(seed)
    b, h, s, d = shape.batch, shape.heads, shape.seq_len, shape.head_dim
    tdtype = DTYPES[dtype]
    q, k, v = (torch.randn(b, h, s, d, generator=gen_).to(dev, tdtype) for _ in range(3))
    flops_dense = 4.0 * b * h * s * s * d
    say = progress or (lambda msg: None)

    result = KernelBenchResult(
        meta={
            "device": _device_name(dev),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "python": sys.version.split()[0],
            "commit": _commit(),
            "command": command or "run_kernel_bench(...)",
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "dtype": dtype,
            "shape": asdict(shape),
            "block_m": block_m,
            "block_n": block_n,
            "seed": seed,
            "skipped": [],
        }
    )
    from . import baselines

    best_sdpa = math.inf
    for name, ctx in _sdpa_backends(dev):
        say(f"timing {name}")
        try:
            with ctx():
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
                fn()
                t = _time_ms(fn, dev, reps)
        except RuntimeError as err:  # backend not available for this dtype/shape/device
            result.rows.append(KernelBenchRow(name, "dense", 1.0, math.nan, math.nan, note=f"unavailable: {str(err).splitlines()[0][:80]}"))
            continue
        best_sdpa = min(best_sdpa, t)
        result.rows.append(KernelBenchRow(name, "dense", 1.0, t, flops_dense / t / 1e9))
    try:
        say("timing xformers")
        t, _ = baselines.time_xformers(q, k, v, lambda fn: _time_ms(fn, dev, reps))
        result.rows.append(KernelBenchRow("xformers", "dense", 1.0, t, flops_dense / t / 1e9))
    except baselines.Skip as why:
        result.meta["skipped"].append(f"xformers: {why}")

    todo = []
    for density in densities:
        if density >= 1.0:
            todo.append(("dense", BlockPlan.dense(s, s, block_m, block_n, device=dev)))
        else:
            todo.append(("random", BlockPlan.random(s, s, density, batch=1, heads=h, block_m=block_m,
                                                    block_n=block_n, generator=gen_, device=dev)))
    plan_times = {}
    for label, plan in plans or []:
        if callable(plan):
            say(f"estimating {label}")
            planner = plan
            plan = planner(q, k, v)
            plan_times[label] = _time_ms(lambda planner=planner: planner(q, k, v), dev, reps)
        if plan.q_len != s:
            raise ValueError(f"plan {label!r} covers {plan.q_len} tokens but the shape has {s}.")
        todo.append((label, plan.to(dev)))
    for label, plan in todo:
        if hasattr(plan, "row_bits"):  # a chunk plan (vmoba): per-token chunk selection
            _time_chunks(result, label, plan, q, k, v, backends, best_sdpa, flops_dense, dev, reps, check, say,
                         plan_times.get(label))
            continue
        if "level" in plan.visit_data:
            _time_pyramid(result, label, plan, q, k, v, backends, best_sdpa, flops_dense, dev, reps, check, say,
                          plan_times.get(label))
            continue
        dens = plan.density()
        ref_out = None
        if check:
            say(f"reference for {label}")
            ref_out = ref_mod.block_sparse_attention(q.double(), k.double(), v.double(), plan)
        for be in backends:
            interp = be == "triton" and dev.type != "cuda"
            say(f"timing {be} on {label}")
            call = describe(q, k, plan)
            try:
                impl = f"auto ({choose('block_sparse', call).name})" if be == "auto" else choose("block_sparse", call, be).name
                impl = "gen-sdpa" if impl == "sdpa" else impl  # not the stock "sdpa" row
            except ValueError as why:
                result.meta["skipped"].append(f"{be} on {label}: {why}")
                continue
            fn = lambda be=be, plan=plan: block_sparse_attention(q, k, v, plan, backend=None if be == "auto" else be)
            out = fn()
            t = _time_ms(fn, dev, 1 if interp else reps)
            speed = best_sdpa / t if math.isfinite(best_sdpa) else None
            err = None
            if ref_out is not None:
                err = float((out.double() - ref_out).norm() / ref_out.norm().clamp_min(1e-300))
            result.rows.append(KernelBenchRow(
                impl, label, dens, t, flops_dense * dens / t / 1e9, speed,
                None if speed is None or dens == 0 else 100.0 * speed * dens, err,
                note="Triton interpreter on the CPU: checks correctness; its time means nothing" if interp else "",
                plan_ms=plan_times.get(label),
            ))
        if dev.type == "cuda" and quant:
            _time_quant(result, label, plan, q, k, v, backends, best_sdpa, flops_dense, dev, reps, ref_out, say,
                        plan_times.get(label), quant)
        if not flex:
            if "flex: not asked for" not in result.meta["skipped"]:
                result.meta["skipped"].append("flex: not asked for")
            continue
        try:
            say(f"timing flex_attention on {label}")
            t, out = baselines.time_flex(q, k, v, plan, lambda fn: _time_ms(fn, dev, reps))
            err = None if ref_out is None else float((out.double() - ref_out).norm() / ref_out.norm().clamp_min(1e-300))
            speed = best_sdpa / t if math.isfinite(best_sdpa) else None
            result.rows.append(KernelBenchRow("flex", label, dens, t, flops_dense * dens / t / 1e9, speed,
                                              None if speed is None or dens == 0 else 100.0 * speed * dens, err))
        except baselines.Skip as why:
            if f"flex: {why}" not in result.meta["skipped"]:
                result.meta["skipped"].append(f"flex: {why}")
    return result


def _time_variant(result, label, op: str, what: str, describe_call, run, ref_out, dens, backends, best_sdpa,
                  flops_dense, dev, reps, say, plan_ms) -> None:
    """Rows for a plan of a kernel variant (operation ``op`` of the backend registry): each
    asked-for backend that has the operation, timed on ``run(backend)``, its error against
    ``ref_out``; ``what`` names the variant in the skip notes (flex has none)."""
    from gen.attention.backends import backends as op_backends
    from gen.attention.backends import choose

    names = {b.name for b in op_backends(op)}
    for be in backends:
        interp = be == "triton" and dev.type != "cuda"
        if be != "auto" and be not in names:
            result.meta["skipped"].append(f"{be} on {label}: no {what} variant")
            continue
        try:
            chosen = choose(op, describe_call, None if be == "auto" else be).name
        except ValueError as why:
            result.meta["skipped"].append(f"{be} on {label}: {why}")
            continue
        impl = f"auto ({chosen})" if be == "auto" else chosen
        say(f"timing {be} on {label}")
        fn = lambda be=be: run(None if be == "auto" else be)  # noqa: E731
        out = fn()
        t = _time_ms(fn, dev, 1 if interp else reps)
        speed = best_sdpa / t if math.isfinite(best_sdpa) else None
        err = None
        if ref_out is not None:
            err = float((out.double() - ref_out).norm() / ref_out.norm().clamp_min(1e-300))
        result.rows.append(KernelBenchRow(
            impl, label, dens, t, flops_dense * dens / t / 1e9, speed,
            None if speed is None or dens == 0 else 100.0 * speed * dens, err,
            note="Triton interpreter on the CPU: checks correctness; its time means nothing" if interp else "",
            plan_ms=plan_ms,
        ))
    note = f"flex_attention baseline on {label}: no {what} variant"
    if note not in result.meta["skipped"]:
        result.meta["skipped"].append(note)


def _time_quant(result, label, plan, q, k, v, backends, best_sdpa, flops_dense, dev, reps, ref_out, say,
                plan_ms, modes) -> None:
    """Rows for the INT8 variant (PARO) of a plain plan, one per mode and backend, through
    the ``quant_block_sparse`` operation; ``impl`` gets the mode appended."""
    from gen.attention.backends.quant import describe
    from gen.attention.quant import quantized_block_sparse_attention

    for mode in modes:
        start = len(result.rows)
        _time_variant(result, label, "quant_block_sparse", f"INT8 ({mode})", describe(q, k, plan),
                      lambda be, mode=mode: quantized_block_sparse_attention(q, k, v, plan, quant=mode, backend=be),
                      ref_out, plan.density(), backends, best_sdpa, flops_dense, dev, reps, say, plan_ms)
        for row in result.rows[start:]:
            row.impl = f"{row.impl} {mode}"


def _time_pyramid(result, label, plan, q, k, v, backends, best_sdpa, flops_dense, dev, reps, check, say,
                  plan_ms) -> None:
    """Rows for a plan with pooling levels (PSA), through the pyramid operation."""
    from gen.attention.backends.pyramid import describe
    from gen.attention.pyramid import level_density, pyramid_attention, pyramid_attention_reference

    top = max(1, int(plan.visit_data["level"].max()))
    top = 1 << (top - 1).bit_length()
    ref_out = None
    if check:
        say(f"reference for {label}")
        ref_out = pyramid_attention_reference(q.double(), k.double(), v.double(), plan, max_level=top)
    _time_variant(result, label, "pyramid", "pyramid (pooled-level)", describe(q, k, plan),
                  lambda be: pyramid_attention(q, k, v, plan, backend=be, tile_n=32, max_level=top), ref_out,
                  level_density(plan), backends, best_sdpa, flops_dense, dev, reps, say, plan_ms)


def _time_chunks(result, label, plan, q, k, v, backends, best_sdpa, flops_dense, dev, reps, check, say,
                 plan_ms) -> None:
    """Rows for a chunk plan (VMoBA), through the chunk operation: ``density`` is the
    fraction of pairs the rows attend, ``rel_err`` against the fp64 chunk reference."""
    from gen.attention.backends.chunk import describe
    from gen.attention.chunk_sparse import chunk_sparse_attention

    ref_out = None
    if check:
        say(f"reference for {label}")
        ref_out = chunk_sparse_attention(q.double(), k.double(), v.double(), plan, backend="torch")
    _time_variant(result, label, "chunk_sparse", "chunk (per-token selection)", describe(q, q.shape[2], k.shape[2]),
                  lambda be: chunk_sparse_attention(q, k, v, plan, backend=be), ref_out, plan.density(), backends,
                  best_sdpa, flops_dense, dev, reps, say, plan_ms)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        return "missing"


def save_plot(result: KernelBenchResult, path: Path) -> Path:
    """PNG of speedup over the best dense SDPA vs plan density, with the ideal 1/density."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    impls = sorted({r.impl for r in result.rows if r.speedup is not None})
    for impl in impls:
        pts = sorted((r.density, r.speedup) for r in result.rows if r.impl == impl and r.speedup and r.density > 0)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
    dens = sorted({r.density for r in result.rows if r.density > 0})
    if dens:
        ax.plot(dens, [1 / x for x in dens], "k--", label="ideal 1/density")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("plan density")
    ax.set_ylabel("speedup vs best dense SDPA")
    shape = result.meta["shape"]
    ax.set_title(f"{shape['name']} on {result.meta['device']} ({result.meta['dtype']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
