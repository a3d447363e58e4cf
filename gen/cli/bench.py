"""``gen bench kernels|e2e|fidelity``: kernels and whole runs against dense baselines (``gen.bench``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from gen.cli import options as opt
from gen.cli.app import app, group
from gen.cli.common import command_line, console, print_written, progress_bar, setup_logging

bench_app = group("Benchmarks: kernels vs dense baselines.")
app.add_typer(bench_app, name="bench")

# the benchmarks' dtype is the inputs' (bf16 on CUDA, fp32 on the CPU unless given); gen.bench
# checks it with its own message
BENCH_DTYPE_HELP = "bf16 | fp16 | fp32 (default bf16 on CUDA, fp32 on CPU)"


def comma_floats(text: str, what: str) -> list[float]:
    """``"1,0.5"`` → ``[1.0, 0.5]``: numbers in [0, 1], at least one."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}.") from None
    if not vals or any(not 0.0 <= x <= 1.0 for x in vals):
        raise ValueError(f"{what} must be numbers in [0, 1], got {text!r}.")
    return vals


def _write_outputs(result, json_out: Path | None, markdown: Path | None, plot: Path | None, save_plot) -> None:
    from gen._io import atomic_write_text

    written = []
    if json_out:
        written.append(atomic_write_text(json_out, result.to_json()))
    if markdown:
        written.append(atomic_write_text(markdown, result.to_markdown() + chr(10)))
    if plot:
        written.append(save_plot(result, plot))
    print_written(*written)


@bench_app.command("kernels")
def bench_kernels(
    ctx: typer.Context,
    shape: str = typer.Option("wan2.1-1.3b-480p", help="attention shape: one of the names `gen bench kernels --list` prints"),
    quick: bool = typer.Option(False, "--quick", help="tiny shape (B=1, H=2, S=1000, D=64): runs in seconds on a CPU"),
    density: str = typer.Option("1,0.5,0.25,0.1", help="plan densities, comma-separated (1 = dense plan)"),
    dtype: str = opt.dtype(BENCH_DTYPE_HELP, check=False),
    device: str = opt.device(),
    backend: str = typer.Option(None, help="gen backends to time, comma-separated: auto (the automatic choice), triton, sdpa, masked, gather, flex, torch (default: triton on CUDA; all of them on the CPU)"),
    block_m: int = typer.Option(128, help="plan query block (tokens)"),
    block_n: int = typer.Option(64, help="plan key block (tokens)"),
    reps: int = typer.Option(5, help="timed repetitions on CPU (CUDA uses triton.testing.do_bench)"),
    seed: int = opt.seed(0, "seed for inputs and random plans"),
    check: bool = typer.Option(True, help="also report the error against the PyTorch reference"),
    json_out: Path = opt.json_out(),
    markdown: Path = opt.markdown(),
    plot: Path = opt.plot("write a PNG of speedup vs density here"),
    method: str = typer.Option(None, help="also time these methods' preset plans, comma-separated (e.g. radial,gna)"),
    model: str = typer.Option(None, help="model whose native shape and presets --method uses (default wan2.1-t2v-1.3b; tiny-wan with --quick)"),
    list_shapes: bool = typer.Option(False, "--list", help="list the named shapes and exit"),
    baselines: str = typer.Option("flex,int8", help="extra rows beside SDPA and gen's kernel, comma-separated: flex (compiled flex_attention on the same plans), int8 (PARO's INT8 kernel, int8 and int8-pv); 'none' for neither (CUDA only)"),
    verbose: bool = opt.verbose("debug logs (backend choice, …)"),
) -> None:
    """Time block-sparse attention against dense torch SDPA at a model's native shape.

    Prints time, TFLOP/s, speedup over the best dense SDPA backend, percent of the ideal
    1/density, and the error against the PyTorch reference.
    """
    import torch

    from gen.bench.kernels import QUICK_SHAPE, SHAPES, run_kernel_bench, save_plot

    setup_logging(verbose)
    log = logging.getLogger("gen.bench")
    if list_shapes:
        for s in SHAPES.values():
            console.print(f"{s.name:20s} B={s.batch} H={s.heads} S={s.seq_len} D={s.head_dim}")
        return
    if quick:
        the_shape = QUICK_SHAPE
    elif shape in SHAPES:
        the_shape = SHAPES[shape]
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)} (or --quick).")
    densities = comma_floats(density, "--density")
    on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    dtype = dtype or ("bf16" if on_cuda else "fp32")
    backends = [b.strip() for b in backend.split(",") if b.strip()] if backend else None
    if backends:
        from gen.attention import BACKENDS

        if unknown := [b for b in backends if b not in ("auto", *BACKENDS)]:
            raise ValueError(f"unknown backend {unknown[0]!r}; choose from auto, {', '.join(BACKENDS)}.")
    if backends is None and quick and not on_cuda:
        # every CPU backend side by side, and the Triton kernel through the interpreter
        backends = ["auto", "sdpa", "masked", "gather", "flex", "torch", "triton"]
    if backends and "triton" in backends and not on_cuda:
        log.info("no CUDA: the Triton kernel runs through the interpreter (correctness only, timing meaningless)")
    if not on_cuda and not quick:
        log.warning("full-size shape on the CPU: this is slow and says nothing about GPU speed; try --quick")

    extras = {b.strip() for b in baselines.split(",") if b.strip()} - {"none"}
    if unknown := sorted(extras - {"flex", "int8"}):
        raise ValueError(f"unknown baseline {unknown[0]!r} in --baselines; choose from flex, int8 (or none).")
    command = command_line(ctx)
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        # the spinner for a terminal, a timed log line for a log file (where the time goes)
        status.update(msg)
        log.info("%6.1f s  %s", time.perf_counter() - t0, msg)

    with console.status("benchmarking…") as status:
        plans = []
        if method:
            the_shape, plans = _method_plans(method, model or ("tiny-wan" if quick else "wan2.1-t2v-1.3b"))
        result = run_kernel_bench(
            the_shape, densities, dtype=dtype, device=device, backends=backends, block_m=block_m, block_n=block_n,
            reps=reps, seed=seed, check=check, command=command, progress=progress, plans=plans,
            quant=("int8", "int8-pv") if "int8" in extras else (), flex="flex" in extras,
        )

    m = result.meta
    table = Table(title=f"{the_shape.name}: B={the_shape.batch} H={the_shape.heads} S={the_shape.seq_len} "
                        f"D={the_shape.head_dim} {dtype} on {m['device']}")
    with_plan_ms = any(r.plan_ms is not None for r in result.rows)
    for col in ("impl", "plan", "density", "ms", "TFLOP/s", "speedup", "% ideal", "rel err") + (("plan ms",) if with_plan_ms else ()):
        table.add_column(col, justify="left" if col in ("impl", "plan") else "right", no_wrap=True)
    notes = []
    for r in result.rows:
        impl = r.impl
        if r.note:
            notes.append(r.note)
            impl += "*" * len(set(notes[: notes.index(r.note) + 1]))
        table.add_row(
            impl, r.plan, f"{r.density:.3f}", f"{r.time_ms:.2f}", f"{r.tflops:.3f}",
            "–" if r.speedup is None else f"{r.speedup:.2f}x",
            "–" if r.pct_ideal is None else f"{r.pct_ideal:.0f}%",
            "–" if r.rel_err is None else f"{r.rel_err:.1e}",
            *(("–" if r.plan_ms is None else f"{r.plan_ms:.2f}",) if with_plan_ms else ()),
        )
    console.print(table)
    for i, note in enumerate(dict.fromkeys(notes), 1):
        console.print(f"[dim]{'*' * i} {note}[/dim]")
    for what in m.get("skipped", []):
        console.print(f"[dim]skipped {escape(what)}[/dim]")
    if not on_cuda:
        console.print("[dim]CPU run: numbers show the harness works; GPU figures live in BENCHMARKS.md.[/dim]")
    _write_outputs(result, json_out, markdown, plot, save_plot)


def _method_plans(methods: str, model: str):
    """The native video-attention shape of ``model`` and its presets' plans per method."""
    from gen.attention import TokenLayout
    from gen.attention.methods import get_method
    from gen.bench.kernels import AttentionShape
    from gen.pipelines import get_spec

    spec = get_spec(model)
    t, h, w = spec.token_grid()
    layout = TokenLayout(t, h, w)
    plans, length = [], None
    for name in [m.strip() for m in methods.split(",") if m.strip()]:
        meth = get_method(name, model=spec.name, family=spec.family)
        if not meth.static:
            # dynamic: a planner run on the bench's own inputs (taken as already in the
            # method's token order), its estimation timed apart
            if not hasattr(meth, "estimate"):
                raise ValueError(f"method {name!r} has no plan to time (its pattern depends on the inputs).")
            if length is not None and layout.video_len != length:
                raise ValueError("the methods plan over different token counts (padded orders); time them one at a time.")
            length = layout.video_len
            plans.append((name, lambda q, k, v, meth=meth: meth.estimate(q, k, v, layout).plan))
            continue
        try:
            plan = meth.plan(layout, spec.heads)
        except NotImplementedError:
            raise ValueError(f"method {name!r} has no static plan to time (its pattern depends on the inputs).") from None
        if length is not None and plan.q_len != length:
            raise ValueError("the methods plan over different token counts (padded orders); time them one at a time.")
        length = plan.q_len
        plans.append((name, plan))
    return AttentionShape(f"{spec.name} video", 1, spec.heads, length, spec.head_dim), plans


@bench_app.command("e2e")
def bench_e2e(
    ctx: typer.Context,
    model: str = opt.model("wan2.1-t2v-1.3b", "model name (see `gen models`); tiny-wan with --quick"),
    attention: str = opt.attention("stock,dense,radial,gna", "methods at their presets, comma-separated; "
                                   "'stock' = the model's own attention"),
    quick: bool = typer.Option(False, "--quick", help="tiny model (tiny-wan unless --model is a tiny one), 2 steps: runs on a CPU"),
    random_weights: bool = typer.Option(False, "--random-weights", help="real architecture from its shipped config with random "
                                        "weights; times the transformer loop only (no checkpoint needed)"),
    steps: int = opt.steps(),
    height: int = opt.height(),
    width: int = opt.width(),
    frames: int = opt.frames(),
    prompt: str = typer.Option(None, help="prompt (pipeline mode; default: the model's example prompt)"),
    seed: int = opt.seed(0, "seed, the same for every method"),
    warmup: bool = typer.Option(True, help="one untimed warm-up step per method (compiles the kernels)"),
    plan: Path = typer.Option(None, help="calibrated plan file for sparse-vdit or paro (`gen calibrate sparse-vdit|paro`); without it they are skipped"),
    device: str = opt.device(),
    dtype: str = opt.dtype(BENCH_DTYPE_HELP, check=False),
    model_path: Path = opt.model_path(),
    json_out: Path = opt.json_out(),
    markdown: Path = opt.markdown(),
    plot: Path = opt.plot("write a PNG of speedup vs density here"),
    ulysses: int = opt.ulysses("N processes share each attention call (diffusers' Ulysses); launch with torchrun "
                               "--nproc_per_node N; rank 0 reports and writes"),
    verbose: bool = opt.verbose(),
) -> None:
    """Time whole denoising runs, dense vs each method: latency, peak memory, attention share."""
    from gen.bench.e2e import run_e2e_bench, save_plot
    from gen.pipelines import get_spec

    setup_logging(verbose)
    if quick:
        model = model if get_spec(model).is_local else "tiny-wan"
        steps = steps or 2
    prompt = prompt or get_spec(model).prompt
    import os

    bar, update = progress_bar(enabled=os.environ.get("RANK", "0") == "0")
    with bar:
        result = run_e2e_bench(
            model, attention, random_weights=random_weights, steps=steps, height=height, width=width,
            frames=frames, prompt=prompt, seed=seed, device=device, dtype=dtype, warmup=warmup, plan=plan,
            model_path=model_path, command=command_line(ctx), progress=update, ulysses=ulysses,
        )
    if ulysses > 1:
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:  # rank 0 reports for all
            return
    m = result.meta
    table = Table(title=f"{m['model']} {m['width']}x{m['height']}x{m['frames']}, {m['steps']} steps, {m['dtype']} on "
                        f"{m['device']}" + (" (random weights, transformer loop)" if random_weights else ""))
    for col in ("method", "density", "total s", "step ms", "attn share", "peak MiB", "speedup", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in result.rows:
        table.add_row(r.method, "–" if r.run_density is None else f"{r.run_density:.3f}",
                      "–" if r.total_s is None else f"{r.total_s:.2f}", "–" if r.step_ms is None else f"{r.step_ms:.1f}",
                      "–" if r.attention_share is None else f"{100 * r.attention_share:.0f}%",
                      "–" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}",
                      "–" if r.speedup is None else f"{r.speedup:.2f}x", escape(r.note))
    console.print(table)
    if m["device"].startswith("cpu"):
        console.print("[dim]CPU run: numbers show the harness works; GPU figures live in BENCHMARKS.md.[/dim]")
    _write_outputs(result, json_out, markdown, plot, save_plot)


@bench_app.command("fidelity")
def bench_fidelity(
    ctx: typer.Context,
    model: str = opt.model(help="model whose presets, grid and pipeline to use"),
    attention: str = opt.attention("dense,radial,gna,rectified,sparse-vdit", "methods at their presets, comma-separated"),
    quick: bool = typer.Option(False, "--quick", help="a CPU-sized model (shapes-wan unless --model is one), 2 steps"),
    capture: Path = typer.Option(None, help="a `gen capture` file to measure attention error on"),
    synthetic: bool = typer.Option(True, help="measure attention error on the synthetic video-like inputs"),
    e2e: bool = typer.Option(True, help="render with each method and compare to the dense render (PSNR, SSIM)"),
    plan: Path = typer.Option(None, help="calibrated plan file for sparse-vdit or paro (`gen calibrate sparse-vdit|paro`); without it they are skipped"),
    prompt: str = typer.Option(None, help="prompt of the renders (default: the model's example prompt)"),
    steps: int = opt.steps("denoising steps of the renders (default: the model's)"),
    height: int = opt.height(),
    width: int = opt.width(),
    frames: int = opt.frames(),
    seed: int = opt.seed(0, "seed of the synthetic inputs and the renders"),
    device: str = opt.device(),
    dtype: str = opt.dtype("bf16 | fp16 | fp32: attention inputs (default fp32) and pipeline (default the model's)",
                           check=False),
    model_path: Path = opt.model_path(),
    json_out: Path = opt.json_out(),
    markdown: Path = opt.markdown(),
    plot: Path = opt.plot("write a PNG of error vs density here"),
    verbose: bool = opt.verbose(),
) -> None:
    """Error of each method against dense: attention-level (rel. L2, cosine) and end to end (PSNR, SSIM)."""
    from gen.bench.fidelity import run_fidelity_bench, save_plot
    from gen.pipelines import get_spec

    setup_logging(verbose)
    if quick:
        model = model if get_spec(model).is_local else "shapes-wan"
        steps = steps or 2
    prompt = prompt or get_spec(model).prompt
    bar, update = progress_bar()
    with bar:
        result = run_fidelity_bench(
            model, attention, capture=capture, synthetic=synthetic, e2e=e2e, plan=plan, prompt=prompt,
            steps=steps, height=height, width=width, frames=frames, seed=seed, device=device, dtype=dtype,
            model_path=model_path, command=command_line(ctx), progress=update,
        )
    table = Table(title=f"{result.meta['model']} vs dense on {result.meta['device']}")
    for col in ("level", "source", "method", "density", "rel L2", "cosine", "PSNR dB", "SSIM", "note"):
        table.add_column(col, justify="left" if col in ("level", "source", "method", "note") else "right")

    def f(x, spec):
        return "–" if x is None else format(x, spec)

    for r in result.rows:
        table.add_row(r.level, r.source, r.method, f(r.density, ".3f"), f(r.rel_l2, ".2e"), f(r.cosine, ".5f"),
                      "∞" if r.mse == 0 else f(r.psnr, ".2f"), f(r.ssim, ".4f"), escape(r.note))
    console.print(table)
    _write_outputs(result, json_out, markdown, plot, save_plot)
