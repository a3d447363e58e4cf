"""``gen check kernels|gpu``: do gen's kernels compile (no GPU needed) and run on this machine's GPUs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from gen.check.gpu import BUDGET_S
from gen.cli import options as opt
from gen.cli.app import app, group
from gen.cli.common import console, print_written, progress_bar

check_app = group("Checks that gen's kernels compile and run on a machine's GPUs.")
app.add_typer(check_app, name="check")


@check_app.command("kernels")
def check_kernels(
    full: bool = typer.Option(False, "--full", help="every config the autotuners may keep (minutes), not the fast subset"),
    arch: str = typer.Option("80,90", help="compute capabilities to compile for, comma-separated (80: A100, 90: H100/H200)"),
    kernel: str = typer.Option(None, help="only these kernel functions, comma-separated (default: all)"),
    jobs: int = typer.Option(None, help="compile processes (default: one per CPU core)"),
    json_out: Path = opt.json_out("write every row as JSON"),
    markdown: Path = opt.markdown("write the table as markdown"),
) -> None:
    """Compile every Triton kernel ahead of time for sm_80/sm_90 (no GPU needed) and check
    shared memory, register spills and tensor-core instructions. Exits 1 on any problem."""
    import json as _json

    from gen._io import atomic_write_text
    from gen.check.kernels import markdown_table, rows_as_dicts, run_checks
    from gen.kernels.aot import KERNELS, TARGETS

    try:
        archs = tuple(int(a) for a in arch.split(",") if a.strip())
    except ValueError:
        raise ValueError(f"--arch takes compute capabilities such as 80,90; got {arch!r}.") from None
    if not archs or any(a not in TARGETS for a in archs):
        raise ValueError(f"--arch must name some of {', '.join(map(str, TARGETS))}; got {arch!r}.")
    kernels = tuple(k.strip() for k in kernel.split(",")) if kernel else None
    if kernels and (unknown := [k for k in kernels if k not in KERNELS]):
        raise ValueError(f"unknown kernel {unknown[0]!r}; known: {', '.join(KERNELS)}.")
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}.")
    bar, update = progress_bar()
    with bar:
        rows = run_checks(full=full, archs=archs, kernels=kernels, jobs=jobs,
                          on_row=lambda row, done, total: update(done, total, f"{row.case} {row.arch} {row.tile}"))
    bad = [r for r in rows if not r.ok]
    table = Table(title=f"{len(rows)} compiles, {len(bad)} with problems")
    for col in ("kernel", "case", "arch", "tile", "w", "s", "regs", "spills", "smem KiB", "wgmma", "mma", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.kernel.strip("_"), r.case, r.arch, r.tile, str(r.warps), str(r.stages), str(r.registers),
                      f"{r.spill_stores}/{r.spill_loads}", "" if r.shared is None else f"{r.shared / 1024:.0f}",
                      str(r.wgmma), str(r.mma_sync), "ok" if r.ok else "[red]" + escape("; ".join(r.problems)))
    console.print(table)
    if json_out:
        atomic_write_text(json_out, _json.dumps(rows_as_dicts(rows), indent=1))
    if markdown:
        atomic_write_text(markdown, markdown_table(rows))
    print_written(json_out, markdown)
    if bad:
        raise typer.Exit(1)


@check_app.command("gpu")
def check_gpu(
    out: Path = typer.Option(Path("gpu-check"), help="folder for the report (gpu_check.md, gpu_check.json) and logs"),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would run, run nothing heavy (any machine)"),
    budget_s: float = typer.Option(BUDGET_S, help="time budget for all steps, seconds"),
    quick: bool = typer.Option(False, "--quick", help="tiny sizes, to check the plumbing on a CPU"),
) -> None:
    """The prepared GPU check: GPU correctness tests at real shapes, kernel speed against
    SDPA and flex, the cache kernel, long-video FPS; one markdown report.

    Without a CUDA device (and without --dry-run or --quick) it says so and exits with 2."""
    from gen.check.gpu import run_gpu_check

    if not budget_s > 0:
        raise ValueError(f"--budget-s must be a positive number of seconds, got {budget_s}.")
    report = run_gpu_check(out, dry_run=dry_run, budget_s=budget_s, quick=quick)
    print_written(report, label="report:")
