"""``gen batch``: every job of a manifest, resumable (``gen.batches``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from gen.cli import options as opt
from gen.cli.app import app
from gen.cli.common import console, overrides, print_written, setup_logging


@app.command("batch")
def batch_cmd(
    manifest: Path = typer.Argument(..., help="jobs: .jsonl (one JSON object per line), .csv (a prompt column) or text (one prompt per line)"),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="output folder: the files, their .json sidecars, index.md/html"),
    model: str = opt.model(None, "default model (see `gen models`; default shapes-wan)"),
    attention: str = opt.attention(None, "default attention method (see `gen methods`; default dense)"),
    set_: list[str] = opt.set_("default method parameter key=value (repeatable)"),
    steps: int = opt.steps("default denoising steps"),
    frames: int = opt.frames("default frames"),
    height: int = opt.height("default height in pixels"),
    width: int = opt.width("default width in pixels"),
    seed: int = opt.seed(None, "default seed (with --repeat N: seed, seed+1, ...)"),
    guidance: float = opt.guidance("default guidance scale"),
    negative_prompt: str = opt.negative_prompt("default negative prompt"),
    repeat: int = typer.Option(1, help="seeds per job"),
    naming: str = typer.Option("default", help="file names: default ({id or line}-{words}-s{seed}) | vbench ({prompt}-{n})"),
    force: bool = typer.Option(False, "--force", help="render every job again, even those already done"),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    model_path: Path = opt.model_path(),
    ulysses: int = opt.ulysses("N processes render each job together, sharing every attention call (diffusers' "
                               "Ulysses); launch with torchrun --nproc_per_node N. Without it the jobs are split "
                               "between the processes"),
    verbose: bool = opt.verbose(),
) -> None:
    """Render every job of MANIFEST into --out-dir; rerun the same command to resume.

    Each output gets a sidecar <name>.json (job, hash, versions, device, method, density,
    timings, status). Jobs already done with the same settings are skipped; a failed job is
    recorded and the batch goes on; the exit code is the number of failed jobs. Under
    `torchrun --nproc_per_node N -m gen batch ...` the jobs are split between the processes;
    with --ulysses N the N processes render each job together and process 0 writes.
    """
    from gen.batches import batch

    setup_logging(verbose)
    defaults = {k: v for k, v in dict(model=model, attention=attention, steps=steps, frames=frames, height=height,
                                      width=width, seed=seed, guidance=guidance,
                                      negative_prompt=negative_prompt).items() if v is not None}
    if set_:
        defaults["overrides"] = overrides(attention, set_)
    result = batch(manifest, out_dir, defaults=defaults, repeat=repeat, naming=naming, force=force,
                   device=device, dtype=dtype, model_path=model_path, progress=True, ulysses=ulysses)
    if ulysses > 1 and result.index is None:  # a Ulysses rank other than 0: rank 0 reports the same jobs
        raise typer.Exit(result.exit_code)
    console.print(f"rendered {len(result.rendered)}, skipped {len(result.skipped)} already done, "
                  f"failed {len(result.failed)}")
    for name, error in result.failed.items():
        console.print(f"[red]failed[/red] {escape(name)}: {escape(error)}", soft_wrap=True)
    print_written(result.index, label="index:")
    raise typer.Exit(result.exit_code)
