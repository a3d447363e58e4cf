"""``gen calibrate``: offline searches that write plan files for per-head methods.

One subcommand per method (``sparse-vdit`` today); a new one goes next to it on
``calibrate_app`` with the shared options of ``gen.cli.options``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from gen.cli import options as opt
from gen.cli.app import app, group
from gen.cli.common import (
    console,
    overrides,
    print_path,
    print_written,
    progress_bar,
    setup_logging,
)

calibrate_app = group("Offline searches that write plan files for per-head methods.")
app.add_typer(calibrate_app, name="calibrate")


@calibrate_app.command("sparse-vdit")
def calibrate_sparse_vdit(
    model: str = opt.model(..., "model name (see `gen models`); the plan is for it only"),
    prompts: Path = typer.Option(..., "--prompts", help="text file with one prompt per line (# comments skipped)"),
    out: Path = opt.out(help="plan file to write (safetensors)", required=True),
    steps: int = opt.steps("denoising steps (default: the model's); the plan is for exactly these"),
    height: int = opt.height(),
    width: int = opt.width(),
    frames: int = opt.frames("frames of video (default: the model's)"),
    lam: float = typer.Option(None, help="cost weight: loss = error + lam * (1 - sparsity) (default 0.5)"),
    eps: float = typer.Option(None, help="a head stays full when every loss exceeds eps (default 1; larger is sparser)"),
    seed: int = opt.seed(0, "random seed of every prompt's run"),
    guidance: float = opt.guidance(),
    negative_prompt: str = opt.negative_prompt(),
    image: Path = opt.image(),
    set_: list[str] = opt.set_("search parameter key=value: block_size, window, diagonal, "
                               "stripes, dense_steps, dense_layers, backend (repeatable)"),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    model_path: Path = opt.model_path(),
    verbose: bool = opt.verbose(),
) -> None:
    """Search Sparse-vDiT's per-head attention modes on real runs of MODEL; write a plan."""
    from gen.calibrate import calibrate, plan_summary, read_prompts

    setup_logging(verbose)
    texts = read_prompts(prompts)
    settings = overrides("sparse-vdit", set_)
    bar, update = progress_bar()
    with bar:
        update(0, None, "loading the model")
        result = calibrate(
            model, texts, out=out, steps=steps, height=height, width=width, frames=frames, lam=lam, eps=eps,
            seed=seed, guidance=guidance, negative_prompt=negative_prompt, image=image, overrides=settings,
            device=device, dtype=dtype, model_path=model_path, progress=update,
        )
    meta, summary = result.plan.meta, plan_summary(result.plan)
    table = Table(show_header=False, title="sparse-vdit plan")
    table.add_row("model", f"{meta.model} at {meta.geometry()}, {meta.steps} steps")
    table.add_row("search", f"{len(texts)} prompt(s), lam {meta.lam}, eps {meta.eps}, {result.seconds:.1f} s")
    table.add_row("mode parameters", f"blocks of {meta.block_size} tokens; window ±{meta.window}, diagonal "
                  f"±{meta.diagonal}, {meta.stripes} stripe(s) (blocks)")
    table.add_row("modes", ", ".join(f"{k} {v:.0%}" for k, v in summary["shares"].items()))
    table.add_row("density", f"video x video {summary['video_density']:.3f}, whole call {summary['call_density']:.3f}")
    console.print(table)
    print_written(result.path)
    console.print("use it:", highlight=False)
    print_path(f"gen render PROMPT --model {meta.model} --steps {meta.steps} --attention sparse-vdit "
               f"--set plan={result.path}")


@calibrate_app.command("paro")
def calibrate_paro(
    model: str = opt.model(..., "model name (see `gen models`); the plan is for it only"),
    prompts: Path = typer.Option(..., "--prompts", help="text file with one prompt per line (# comments skipped)"),
    out: Path = opt.out(help="plan file to write (safetensors)", required=True),
    steps: int = opt.steps("denoising steps (default: the model's); the plan is for exactly these"),
    height: int = opt.height(),
    width: int = opt.width(),
    frames: int = opt.frames("frames of video (default: the model's)"),
    density: float = typer.Option(None, help="target video-to-video block density of the masks, in (0, 1] "
                                  "(default 0.5)"),
    bins: int = typer.Option(None, help="timestep bins, one mask set each (default 4)"),
    alpha: float = typer.Option(None, help="order choice: alpha * sparsity metric + (1 - alpha) * quantization "
                                "metric, in [0, 1] (default 0.5)"),
    block_size: int = typer.Option(None, "--block-size", help="block edge in tokens (default 64, the paper's)"),
    eps: float = typer.Option(1e-3, help="an attention entry below eps counts as small (sparsity metric)"),
    sigma: float = typer.Option(0.9, help="a block is sparse when this share of its entries is small"),
    empty_mass: float = typer.Option(0.01, "--empty-mass", help="heads whose video queries put less than this "
                                     "share of their attention on video keys are marked empty"),
    order: int = typer.Option(None, help="give every head this axis order id 0-5 instead of choosing "
                              "(0 = the model's own order: PARO without reordering)"),
    seed: int = opt.seed(0, "random seed of every prompt's run"),
    guidance: float = opt.guidance(),
    negative_prompt: str = opt.negative_prompt(),
    image: Path = opt.image(),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    model_path: Path = opt.model_path(),
    verbose: bool = opt.verbose(),
) -> None:
    """Calibrate PARO on real runs of MODEL: an axis order per head, empty heads, and static
    block masks per timestep bin; write a plan."""
    from gen.calibrate import read_prompts
    from gen.calibrate_paro import calibrate_paro as run_calibration
    from gen.calibrate_paro import plan_summary

    setup_logging(verbose)
    texts = read_prompts(prompts)
    bar, update = progress_bar()
    with bar:
        update(0, None, "loading the model")
        result = run_calibration(
            model, texts, out=out, steps=steps, height=height, width=width, frames=frames, density=density,
            bins=bins, alpha=alpha, block_size=block_size, eps=eps, sigma=sigma, empty_mass=empty_mass,
            order=order, seed=seed, guidance=guidance, negative_prompt=negative_prompt, image=image,
            device=device, dtype=dtype, model_path=model_path, progress=update,
        )
    meta, summary = result.plan.meta, plan_summary(result.plan)
    table = Table(show_header=False, title="paro plan")
    table.add_row("model", f"{meta.model} at {meta.geometry()}, {meta.steps} steps")
    table.add_row("calibration", f"{len(texts)} prompt(s), {result.passes} pass(es) each, alpha {meta.alpha}, "
                  f"{result.seconds:.1f} s")
    table.add_row("orders", ", ".join(f"{k} {v:.0%}" for k, v in summary["orders"].items() if v))
    table.add_row("empty heads", f"{summary['empty_heads']} of {meta.layers * meta.heads}")
    table.add_row("masks", f"{meta.bins} bin(s), blocks of {meta.block_size} tokens")
    table.add_row("density", f"video x video {summary['video_density']:.3f}, whole call {summary['call_density']:.3f}")
    table.add_row("kept attention", " / ".join(f"{b['kept_mass']:.2f}" for b in summary["per_bin"]) + " per bin")
    console.print(table)
    print_written(result.path)
    console.print("use it:", highlight=False)
    print_path(f"gen render PROMPT --model {meta.model} --steps {meta.steps} --attention paro "
               f"--set plan={result.path}")
