"""The ``gen`` command line.

    gen render PROMPT [--model M] [--attention A] [--set k=v]   render a clip (mp4) or image (png)
    gen batch MANIFEST -o DIR      render every job of a manifest (resumable; torchrun splits the jobs)
    gen models                     models gen knows, and which have weights here
    gen methods                    attention methods, their parameters and presets (with densities)
    gen masks --method M           picture of a method's mask at a model's geometry
    gen calibrate sparse-vdit      offline per-head mode search, writes a plan file
    gen demo                       the Gradio app
    gen info                       versions, devices, the attention backend gen would pick, kernel status
    gen check kernels [--full]     compile every Triton kernel ahead of time for sm_80/sm_90 (no GPU needed)
    gen check gpu [--dry-run]      the prepared GPU check: correctness, kernel speed, long-video FPS, one report
    gen bench kernels [--quick]    block-sparse kernel vs dense SDPA (time, TFLOP/s, speedup)
    gen bench e2e [--quick]        whole denoising runs per method: latency, memory, attention share
    gen bench fidelity [--quick]   error vs dense: attention (rel. L2, cosine) and video (PSNR, SSIM)
    gen capture --model M ...      save q, k, v of chosen steps/layers of a run (safetensors)
    gen long PROMPT --schedule S   long video chunk by chunk with a KV cache, streamed to an mp4
    gen train-tiny [--causal]      train the built-in shapes-wan model (or its causal variant) from its seed
    gen eval-tiny                  render held-out seeds of shapes-wan and score them (colour, motion, ...)
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    help="gen: fast and long video/image diffusion for diffusers pipelines.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: kernels vs dense baselines.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
check_app = typer.Typer(help="Checks that gen's kernels compile and run on a machine's GPUs.", no_args_is_help=True)
app.add_typer(check_app, name="check")

console = Console()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
        force=True,
    )
    logging.getLogger("gen").setLevel(logging.DEBUG if verbose else logging.INFO)


def _command_line(ctx: typer.Context) -> str:
    """The command as a user would retype it: ``gen <sub> <options given>`` (for result files)."""
    names, c = [], ctx
    while c.parent is not None:  # subcommand names, without the program name (gen / python -m gen)
        names.append(c.info_name)
        c = c.parent
    parts = ["gen", *reversed(names)]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if getattr(source, "name", "DEFAULT") == "DEFAULT":
            continue
        value = ctx.params[param.name]
        flag = param.opts[0]
        if getattr(param, "is_flag", False):
            parts.append(flag if value else (param.secondary_opts or [flag])[0])
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0.0 <= x <= 1.0 for x in vals):
        raise typer.BadParameter(f"{what} must be numbers in [0, 1], got {text!r}")
    return vals


@app.command()
def info() -> None:
    """Print versions, devices and the block-sparse attention backend that would be used."""
    import torch

    import gen

    table = Table(show_header=False)
    table.add_row("gen", gen.__version__)
    table.add_row("python", sys.version.split()[0])
    table.add_row("torch", torch.__version__)
    try:
        import triton

        table.add_row("triton", triton.__version__)
    except ImportError:
        table.add_row("triton", "not installed")
    cuda = torch.cuda.is_available()
    table.add_row("CUDA", torch.cuda.get_device_name(0) if cuda else "no CUDA device")
    dev = torch.device("cuda" if cuda else "cpu")
    from gen.attention.backends import choose
    from gen.attention.backends.registry import Call

    dt = torch.bfloat16 if cuda else torch.float32
    for what, full, dens in (("dense plan", True, 1.0), ("sparse plan", False, 0.25)):
        # a Wan 2.1 1.3B 480p-sized call; the choice is made per call by shape, plan and device
        call = Call(device=dev, dtype=dt, batch=1, heads=12, q_len=32760, kv_len=32760, head_dim=128,
                    full=full, density=dens, return_lse=True)
        got = choose("block_sparse", call)
        why_not = "; ".join(f"{n}: {w}" for n, w in got.skipped)
        table.add_row(f"attention backend ({what})",
                      escape(f"{got.name} on {dev.type}: {got.reason}" + (f" (skipped {why_not})" if why_not else "")))
    est = Call(device=dev, dtype=dt, batch=1, heads=12, q_len=256, kv_len=256, head_dim=128)
    got = choose("block_stats", est)
    table.add_row("block estimation (dynamic methods)", escape(f"{got.name} on {dev.type}: {got.reason}"))
    table.add_row("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset"))
    if cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        from gen.kernels.status import kernel_status

        for row in kernel_status(dev):
            if row["ok"]:
                text = f"compiled and ran; autotuned {row['config']}; bf16 error vs SDPA {row['error_vs_sdpa']:.1e}"
            else:
                text = "[red]failed: " + escape(row["error"])
            table.add_row(f"kernel {row['name']}", text)
    else:
        table.add_row("kernels", "no compiled run here (no CUDA device, or TRITON_INTERPRET set); "
                                 "`gen check kernels` compiles them for sm_80/sm_90 without a GPU")
    console.print(table)


def _read_prompt(prompt: str) -> str:
    """``@FILE`` reads the prompt from a file, ``-`` from stdin; several prompts belong to
    ``gen batch``."""
    if prompt == "-":
        text, source = sys.stdin.read(), "stdin"
    elif prompt.startswith("@") and len(prompt) > 1:
        path = Path(prompt[1:]).expanduser()
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read the prompt file {path}: {getattr(err, 'strerror', None) or err}.") from None
    else:
        return prompt
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"no prompt in {source}.")
    if len(lines) > 1:
        raise ValueError(f"{source} holds {len(lines)} prompts; render them all with "
                         f"`gen batch {prompt[1:] if prompt != '-' else 'FILE'} --out-dir DIR`.")
    return lines[0]


@app.command()
def render(
    prompt: str = typer.Argument(..., help="text prompt; @FILE reads it from a file, - from stdin"),
    model: str = typer.Option("shapes-wan", "--model", "-m", help="model name (see `gen models`)"),
    attention: str = typer.Option("dense", "--attention", "-a", help="attention method (see `gen methods`)"),
    set_: list[str] = typer.Option(None, "--set", help="method parameter override key=value (repeatable)"),
    steps: int = typer.Option(None, help="denoising steps (default: the model's)"),
    frames: int = typer.Option(None, help="frames of video (default: the model's)"),
    height: int = typer.Option(None, help="height in pixels (default: the model's)"),
    width: int = typer.Option(None, help="width in pixels (default: the model's)"),
    seed: int = typer.Option(0, help="random seed"),
    random_seed: bool = typer.Option(False, "--random-seed", help="draw a random seed (printed)"),
    guidance: float = typer.Option(None, help="guidance scale (default: the model's)"),
    negative_prompt: str = typer.Option(None, help="negative prompt"),
    image: Path = typer.Option(None, help="input image for image-to-video models"),
    out: Path = typer.Option(None, "--out", "-o", help="output file (.mp4 or .gif for video; .png, .jpg or .webp for images); default: a unique name in outputs/"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    dtype: str = typer.Option(None, help="bf16 | fp16 | fp32 (default: the model's)"),
    model_path: Path = typer.Option(None, help="local folder with the model's diffusers-format weights"),
    ulysses: int = typer.Option(1, "--ulysses", min=1, help="N processes share each attention call (diffusers' "
                                "Ulysses context parallelism); launch with torchrun --nproc_per_node N"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs"),
) -> None:
    """Render PROMPT to a video (mp4) or image (png) with a sparse attention method."""
    import secrets

    from gen.attention.methods import parse_overrides
    from gen.render import render as do_render

    _setup_logging(verbose)
    if random_seed:
        seed = secrets.randbelow(2**31)
    if dtype is not None and dtype not in ("bf16", "fp16", "fp32"):
        raise typer.BadParameter(f"--dtype must be bf16, fp16 or fp32, got {dtype!r}")
    try:
        prompt = _read_prompt(prompt)
        overrides = parse_overrides(attention, set_ or [])
        if ulysses > 1:
            result = _render_ulysses(
                ulysses, prompt, model=model, attention=attention, overrides=overrides, steps=steps, frames=frames,
                height=height, width=width, seed=seed, guidance=guidance, negative_prompt=negative_prompt,
                image=image, out=out, device=device, dtype=dtype, model_path=model_path,
            )
            if result is None:  # not rank 0: rank 0 wrote the file and reports
                return
        else:
            result = do_render(
                prompt, model=model, attention=attention, overrides=overrides, steps=steps, frames=frames,
                height=height, width=width, seed=seed, guidance=guidance, negative_prompt=negative_prompt,
                image=image, out=out, device=device, dtype=dtype, model_path=model_path,
            )
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    table = Table(show_header=False, title=f"wrote {result.path}")
    table.add_row("model / attention", f"{model} / {attention}")
    table.add_row("seed", str(result.seed))
    table.add_row("frames", str(result.frames))
    table.add_row("time", f"{result.seconds:.2f} s generate + {result.load_seconds:.2f} s load")
    for t in result.attention.get("transformers", []):
        dens = ", ".join(f"{k}: {v:.3f}" if v is not None else f"{k}: n/a" for k, v in t["density"].items())
        table.add_row(f"{t['family']} attention", f"{t['sparse_calls']} sparse / {t['dense_calls']} dense calls "
                      f"over {t['layers']} layers")
        table.add_row("density", dens or "n/a")
        if t["dense_layers"]:
            table.add_row("ran dense", f"layers {t['dense_layers']} (schedule)")
    console.print(table)


def _render_ulysses(degree: int, prompt: str, *, out, device, dtype, model_path, image, **job):
    """``gen render --ulysses N`` under ``torchrun --nproc_per_node N``: every rank joins the
    process group (gloo on the CPU, nccl on cuda:LOCAL_RANK), loads the model with Ulysses
    over the N ranks and renders the same job with the same seed; rank 0 writes the file
    and gets the result, the others None."""
    import torch.distributed as dist

    from gen.parallel import init_distributed
    from gen.render import RenderResult, default_output_path, warn_outside_vocabulary, write_output
    from gen.session import RenderJob, Session
    from gen.values import check_output_path

    rank, _, dev = init_distributed(device)
    try:
        job = RenderJob(prompt, image=None if image is None else str(image), **job).resolved()
        spec = job.spec
        if rank == 0:
            warn_outside_vocabulary(spec, prompt)
        path = Path(out) if out else default_output_path(spec, prompt, job.attention, job.seed)
        check_output_path(path, video=spec.is_video)
        result = Session(device=str(dev), dtype=dtype, model_path=model_path, ulysses=degree).run(job)
        if rank == 0:
            write_output(result.frames, path, spec.fps)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    return RenderResult(path, result.seconds, result.load_seconds, result.frames.shape[0], job.seed,
                        result.attention)


@app.command("batch")
def batch_cmd(
    manifest: Path = typer.Argument(..., help="jobs: .jsonl (one JSON object per line), .csv (a prompt column) or text (one prompt per line)"),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="output folder: the files, their .json sidecars, index.md/html"),
    model: str = typer.Option(None, "--model", "-m", help="default model (see `gen models`; default shapes-wan)"),
    attention: str = typer.Option(None, "--attention", "-a", help="default attention method (see `gen methods`; default dense)"),
    set_: list[str] = typer.Option(None, "--set", help="default method parameter key=value (repeatable)"),
    steps: int = typer.Option(None, help="default denoising steps"),
    frames: int = typer.Option(None, help="default frames"),
    height: int = typer.Option(None, help="default height in pixels"),
    width: int = typer.Option(None, help="default width in pixels"),
    seed: int = typer.Option(None, help="default seed (with --repeat N: seed, seed+1, ...)"),
    guidance: float = typer.Option(None, help="default guidance scale"),
    negative_prompt: str = typer.Option(None, help="default negative prompt"),
    repeat: int = typer.Option(1, help="seeds per job"),
    naming: str = typer.Option("default", help="file names: default ({id or line}-{words}-s{seed}) | vbench ({prompt}-{n})"),
    force: bool = typer.Option(False, "--force", help="render every job again, even those already done"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    dtype: str = typer.Option(None, help="bf16 | fp16 | fp32 (default: the model's)"),
    model_path: Path = typer.Option(None, help="local folder with the model's diffusers-format weights"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs"),
) -> None:
    """Render every job of MANIFEST into --out-dir; rerun the same command to resume.

    Each output gets a sidecar <name>.json (job, hash, versions, device, method, density,
    timings, status). Jobs already done with the same settings are skipped; a failed job is
    recorded and the batch goes on; the exit code is the number of failed jobs. Under
    `torchrun --nproc_per_node N -m gen batch ...` the jobs are split between the processes.
    """
    from gen.attention.methods import parse_overrides
    from gen.batches import batch

    _setup_logging(verbose)
    defaults = {k: v for k, v in dict(model=model, attention=attention, steps=steps, frames=frames, height=height,
                                      width=width, seed=seed, guidance=guidance,
                                      negative_prompt=negative_prompt).items() if v is not None}
    try:
        if set_:
            if attention is None:
                raise ValueError("--set needs --attention: the parameters belong to a method.")
            defaults["overrides"] = parse_overrides(attention, set_)
        result = batch(manifest, out_dir, defaults=defaults, repeat=repeat, naming=naming, force=force,
                       device=device, dtype=dtype, model_path=model_path, progress=True)
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    done = len(result.rendered)
    console.print(f"rendered {done}, skipped {len(result.skipped)} already done, failed {len(result.failed)}")
    for name, error in result.failed.items():
        console.print(f"[red]failed[/red] {escape(name)}: {escape(error)}", soft_wrap=True)
    if result.index is not None:
        console.print("index:")
        console.print(str(result.index), soft_wrap=True)
    raise typer.Exit(result.exit_code)


@app.command()
def models() -> None:
    """List the models gen knows and whether their weights are available here."""
    from gen.pipelines import list_models

    table = Table(title="models")
    for col in ("name", "task", "family", "default size", "weights", "source"):
        table.add_column(col)
    for spec, available, where in list_models():
        size = f"{spec.width}x{spec.height}" + (f"x{spec.frames}f" if spec.frames > 1 else "")
        table.add_row(spec.name, spec.task, spec.family, size,
                      "[green]yes[/green]" if available else "[dim]no[/dim]", where)
    console.print(table)


def _preset_grid_density(method: str, key: str, *, precomputed: bool = True) -> tuple[str, float] | None:
    """``("21x30x52", 0.339...)``: the native video grid of the model ``key`` names and the
    density of ``method``'s preset for it there; None for family presets and methods
    without a static plan. Takes the number from ``PRESET_DENSITIES`` when it is recorded
    for that grid (building a plan at a model's full size takes seconds), else builds the
    plan (always with ``precomputed=False``)."""
    from gen.pipelines import MODELS

    spec = MODELS.get(key)
    if spec is None:
        return None
    from gen.attention import TokenLayout
    from gen.attention.methods import get_method
    from gen.attention.methods.presets import PRESET_DENSITIES
    from gen.masks import layout_for_model

    try:
        layout = layout_for_model(spec)
        grid = f"{layout.frames}x{layout.height}x{layout.width}"
        recorded = PRESET_DENSITIES.get(method, {}).get(key)
        if precomputed and recorded is not None and recorded[0] == grid:
            return recorded
        video = TokenLayout(layout.frames, layout.height, layout.width)
        d = get_method(method, model=key, family=spec.family).density(video, spec.heads)
    except (NotImplementedError, ValueError):
        return None
    return grid, d


def _preset_density(method: str, key: str) -> str:
    """``, density 0.339 at 21x30x52`` for a preset keyed by a model name (its native
    geometry), empty for family presets and methods without a static plan."""
    got = _preset_grid_density(method, key)
    if got is None:
        return ""
    grid, d = got
    return f"  [green]density {d:.3f}[/green] at {grid}"


def _methods_lines() -> list[str]:
    """What ``gen methods`` prints, one console line (rich markup) per entry, built from the
    method registry (imports torch)."""
    import dataclasses

    from gen.attention.methods import PRESETS, list_methods, method_class

    lines = []
    for name in list_methods():
        cls = method_class(name)
        lines.append(f"[bold]{name}[/bold] — {cls.summary}  [dim](models: {', '.join(cls.families)})[/dim]")
        for f in dataclasses.fields(cls.config_cls):
            default = f.default if f.default is not dataclasses.MISSING else "required"
            lines.append(f"    {f.name} = {default!r}")
        for key, values in PRESETS.get(name, {}).items():
            lines.append(f"    preset [cyan]{key}[/cyan]: {values}{_preset_density(name, key)}")
    return lines


_METHODS_CACHE_FORMAT = 1


def _methods_cache_file() -> Path:
    """``$GEN_CACHE_DIR/methods.json`` (default ``~/.cache/gen``), as the model cache."""
    return Path(os.environ.get("GEN_CACHE_DIR") or "~/.cache/gen").expanduser() / "methods.json"


def _methods_cache_key() -> str:
    """Hash of everything the listing is made from: every source and JSON file of the gen
    packages (methods, presets, model registry, plans), the Python and torch versions."""
    import hashlib
    import importlib.metadata
    import importlib.util

    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    digest = hashlib.sha256(f"{_METHODS_CACHE_FORMAT}\n{sys.version}\n{torch_version}\n".encode())
    for package in ("gen", "gen.attention", "gen.kernels", "gen.pipelines", "gen.demos"):
        spec = importlib.util.find_spec(package)  # finds without importing the package
        for root in map(Path, spec.submodule_search_locations if spec else ()):
            for file in sorted([*root.rglob("*.py"), *root.rglob("*.json")]):
                digest.update(f"\n{package}/{file.relative_to(root).as_posix()}\n".encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()


def _cached_methods_lines() -> list[str]:
    """:func:`_methods_lines`, from a cache file while gen's sources and versions are the
    ones it was made from: listing the methods imports torch, which takes seconds. A
    missing, stale, unreadable or unwritable cache only means building the list again."""
    import contextlib
    import json

    file = _methods_cache_file()
    try:
        key = _methods_cache_key()
    except OSError:
        return _methods_lines()
    try:
        cached = json.loads(file.read_text(encoding="utf-8"))
        lines = cached["lines"]
        if cached["key"] == key and isinstance(lines, list) and all(isinstance(x, str) for x in lines):
            return lines
    except (OSError, ValueError, TypeError, KeyError):
        pass
    lines = _methods_lines()
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "lines": lines}, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, file)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return lines


@app.command()
def methods() -> None:
    """List the attention methods, their parameters (with defaults) and presets per model."""
    for line in _cached_methods_lines():
        console.print(line)


@app.command()
def masks(
    method: str = typer.Option(..., "--method", help="attention method (see `gen methods`)"),
    model: str = typer.Option("shapes-wan", "--model", "-m", help="model whose geometry and preset to use"),
    height: int = typer.Option(None, help="height in pixels (default: the model's)"),
    width: int = typer.Option(None, help="width in pixels (default: the model's)"),
    frames: int = typer.Option(None, help="frames (default: the model's)"),
    layer: int = typer.Option(None, help="layer index (default: the first layer the method runs sparse)"),
    head: int = typer.Option(0, help="head index"),
    step: int = typer.Option(None, help="denoising step (default: the first step the method runs sparse)"),
    set_: list[str] = typer.Option(None, "--set", help="method parameter override key=value (repeatable)"),
    out: Path = typer.Option(Path("mask.png"), "--out", "-o", help="PNG to write"),
    capture_file: Path = typer.Option(None, "--capture", help="a `gen capture` file: draw the plan a dynamic method (rectified) makes for its --step/--layer call (default: record one from a short run of --model)"),
) -> None:
    """Draw a method's block mask (and token mask for small layouts) at a model's geometry.

    Dynamic methods (rectified) decide per call from q and k: their picture is the plan of a
    real call, from --capture or from a dense run of the model recorded on the fly."""
    from gen.attention.methods import parse_overrides
    from gen.masks import mask_picture

    _setup_logging(False)
    try:
        pic = mask_picture(method, model, out=out, height=height, width=width, frames=frames, layer=layer,
                           head=head, step=step, overrides=parse_overrides(method, set_ or []),
                           capture=capture_file)
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    if pic.dense_reason:
        console.print(f"{pic.layout}: this call runs dense ({pic.dense_reason})")
    else:
        console.print(f"{pic.layout}: video density {pic.video_density:.3f}, call density {pic.density:.3f}")
    console.print(f"wrote {pic.block_png}" + (f" and {pic.token_png}" if pic.token_png else ""))


@bench_app.command("kernels")
def bench_kernels(
    ctx: typer.Context,
    shape: str = typer.Option("wan2.1-1.3b-480p", help="attention shape: one of the names `gen bench kernels --list` prints"),
    quick: bool = typer.Option(False, "--quick", help="tiny shape (B=1, H=2, S=1000, D=64): runs in seconds on a CPU"),
    density: str = typer.Option("1,0.5,0.25,0.1", help="plan densities, comma-separated (1 = dense plan)"),
    dtype: str = typer.Option(None, help="bf16 | fp16 | fp32 (default bf16 on CUDA, fp32 on CPU)"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    backend: str = typer.Option(None, help="gen backends to time, comma-separated: auto (the automatic choice), triton, sdpa, masked, gather, flex, torch (default: triton on CUDA; all of them on the CPU)"),
    block_m: int = typer.Option(128, help="plan query block (tokens)"),
    block_n: int = typer.Option(64, help="plan key block (tokens)"),
    reps: int = typer.Option(5, help="timed repetitions on CPU (CUDA uses triton.testing.do_bench)"),
    seed: int = typer.Option(0, help="seed for inputs and random plans"),
    check: bool = typer.Option(True, help="also report the error against the PyTorch reference"),
    json_out: Path = typer.Option(None, "--json", help="write results as JSON here"),
    markdown: Path = typer.Option(None, help="write a markdown table here"),
    plot: Path = typer.Option(None, help="write a PNG of speedup vs density here"),
    method: str = typer.Option(None, help="also time these methods' preset plans, comma-separated (e.g. radial,gna)"),
    model: str = typer.Option(None, help="model whose native shape and presets --method uses (default wan2.1-t2v-1.3b; tiny-wan with --quick)"),
    list_shapes: bool = typer.Option(False, "--list", help="list the named shapes and exit"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs (backend choice, …)"),
) -> None:
    """Time block-sparse attention against dense torch SDPA at a model's native shape.

    Prints time, TFLOP/s, speedup over the best dense SDPA backend, percent of the ideal
    1/density, and the error against the PyTorch reference.
    """
    import torch

    from gen.bench.kernels import QUICK_SHAPE, SHAPES, run_kernel_bench, save_plot

    _setup_logging(verbose)
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
        raise typer.BadParameter(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)} (or --quick)")
    on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    dtype = dtype or ("bf16" if on_cuda else "fp32")
    backends = [b.strip() for b in backend.split(",") if b.strip()] if backend else None
    if backends:
        from gen.attention import BACKENDS

        if unknown := [b for b in backends if b not in ("auto", *BACKENDS)]:
            raise typer.BadParameter(f"unknown backend {unknown[0]!r}; choose from auto, {', '.join(BACKENDS)}")
    if backends is None and quick and not on_cuda:
        # every CPU backend side by side, and the Triton kernel through the interpreter
        backends = ["auto", "sdpa", "masked", "gather", "flex", "torch", "triton"]
    if backends and "triton" in backends and not on_cuda:
        log.info("no CUDA: the Triton kernel runs through the interpreter (correctness only, timing meaningless)")
    if not on_cuda and not quick:
        log.warning("full-size shape on the CPU: this is slow and says nothing about GPU speed; try --quick")

    command = _command_line(ctx)
    with console.status("benchmarking…") as status:
        try:
            plans = []
            if method:
                the_shape, plans = _method_plans(method, model or ("tiny-wan" if quick else "wan2.1-t2v-1.3b"))
            result = run_kernel_bench(
                the_shape, _parse_floats(density, "--density"), dtype=dtype, device=device,
                backends=backends, block_m=block_m, block_n=block_n, reps=reps, seed=seed,
                check=check, command=command, progress=lambda m: status.update(m), plans=plans,
            )
        except ValueError as err:
            console.print(f"[red]error:[/red] {escape(str(err))}")
            raise typer.Exit(2) from None

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


def _progress_bar():
    """A rich progress bar for ``callable(done, total, what)`` callbacks: ``(bar, update)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console)
    task = bar.add_task("starting", total=None)
    return bar, lambda done, total, what: bar.update(task, completed=done, total=total, description=escape(what))


def _write_outputs(result, json_out: Path | None, markdown: Path | None, plot: Path | None, save_plot) -> None:
    from gen._io import atomic_write_text

    if json_out:
        console.print(f"wrote {atomic_write_text(json_out, result.to_json())}")
    if markdown:
        console.print(f"wrote {atomic_write_text(markdown, result.to_markdown() + chr(10))}")
    if plot:
        console.print(f"wrote {save_plot(result, plot)}")


@bench_app.command("e2e")
def bench_e2e(
    ctx: typer.Context,
    model: str = typer.Option("wan2.1-t2v-1.3b", "--model", "-m", help="model name (see `gen models`); tiny-wan with --quick"),
    attention: str = typer.Option("stock,dense,radial,gna", "--attention", "-a",
                                  help="methods at their presets, comma-separated; 'stock' = the model's own attention"),
    quick: bool = typer.Option(False, "--quick", help="tiny model (tiny-wan unless --model is a tiny one), 2 steps: runs on a CPU"),
    random_weights: bool = typer.Option(False, "--random-weights", help="real architecture from its shipped config with random "
                                        "weights; times the transformer loop only (no checkpoint needed)"),
    steps: int = typer.Option(None, help="denoising steps (default: the model's)"),
    height: int = typer.Option(None, help="height in pixels (default: the model's)"),
    width: int = typer.Option(None, help="width in pixels (default: the model's)"),
    frames: int = typer.Option(None, help="frames (default: the model's)"),
    prompt: str = typer.Option(None, help="prompt (pipeline mode; default: the model's example prompt)"),
    seed: int = typer.Option(0, help="seed, the same for every method"),
    warmup: bool = typer.Option(True, help="one untimed warm-up step per method (compiles the kernels)"),
    plan: Path = typer.Option(None, help="sparse-vdit plan file (`gen calibrate sparse-vdit`); without it sparse-vdit is skipped"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    dtype: str = typer.Option(None, help="bf16 | fp16 | fp32 (default bf16 on CUDA, fp32 on CPU)"),
    model_path: Path = typer.Option(None, help="local folder with the model's diffusers-format weights"),
    json_out: Path = typer.Option(None, "--json", help="write results as JSON here"),
    markdown: Path = typer.Option(None, help="write a markdown table here"),
    plot: Path = typer.Option(None, help="write a PNG of speedup vs density here"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs"),
) -> None:
    """Time whole denoising runs, dense vs each method: latency, peak memory, attention share."""
    from gen.bench.e2e import run_e2e_bench, save_plot
    from gen.pipelines import get_spec

    _setup_logging(verbose)
    try:
        if quick:
            model = model if get_spec(model).is_local else "tiny-wan"
            steps = steps or 2
        prompt = prompt or get_spec(model).prompt
        bar, update = _progress_bar()
        with bar:
            result = run_e2e_bench(
                model, attention, random_weights=random_weights, steps=steps, height=height, width=width,
                frames=frames, prompt=prompt, seed=seed, device=device, dtype=dtype, warmup=warmup, plan=plan,
                model_path=model_path, command=_command_line(ctx), progress=update,
            )
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
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
    model: str = typer.Option("shapes-wan", "--model", "-m", help="model whose presets, grid and pipeline to use"),
    attention: str = typer.Option("dense,radial,gna,rectified,sparse-vdit", "--attention", "-a", help="methods at their presets, comma-separated"),
    quick: bool = typer.Option(False, "--quick", help="a CPU-sized model (shapes-wan unless --model is one), 2 steps"),
    capture: Path = typer.Option(None, help="a `gen capture` file to measure attention error on"),
    synthetic: bool = typer.Option(True, help="measure attention error on the synthetic video-like inputs"),
    e2e: bool = typer.Option(True, help="render with each method and compare to the dense render (PSNR, SSIM)"),
    plan: Path = typer.Option(None, help="sparse-vdit plan file (`gen calibrate sparse-vdit`); without it sparse-vdit is skipped"),
    prompt: str = typer.Option(None, help="prompt of the renders (default: the model's example prompt)"),
    steps: int = typer.Option(None, help="denoising steps of the renders (default: the model's)"),
    height: int = typer.Option(None, help="height in pixels (default: the model's)"),
    width: int = typer.Option(None, help="width in pixels (default: the model's)"),
    frames: int = typer.Option(None, help="frames (default: the model's)"),
    seed: int = typer.Option(0, help="seed of the synthetic inputs and the renders"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    dtype: str = typer.Option(None, help="bf16 | fp16 | fp32: attention inputs (default fp32) and pipeline (default the model's)"),
    model_path: Path = typer.Option(None, help="local folder with the model's diffusers-format weights"),
    json_out: Path = typer.Option(None, "--json", help="write results as JSON here"),
    markdown: Path = typer.Option(None, help="write a markdown table here"),
    plot: Path = typer.Option(None, help="write a PNG of error vs density here"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs"),
) -> None:
    """Error of each method against dense: attention-level (rel. L2, cosine) and end to end (PSNR, SSIM)."""
    from gen.bench.fidelity import run_fidelity_bench, save_plot
    from gen.pipelines import get_spec

    _setup_logging(verbose)
    try:
        if quick:
            model = model if get_spec(model).is_local else "shapes-wan"
            steps = steps or 2
        prompt = prompt or get_spec(model).prompt
        bar, update = _progress_bar()
        with bar:
            result = run_fidelity_bench(
                model, attention, capture=capture, synthetic=synthetic, e2e=e2e, plan=plan, prompt=prompt,
                steps=steps, height=height, width=width, frames=frames, seed=seed, device=device, dtype=dtype,
                model_path=model_path, command=_command_line(ctx), progress=update,
            )
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
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


@app.command("capture")
def capture_cmd(
    model: str = typer.Option(..., "--model", "-m", help="model name (see `gen models`)"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="text prompt of the run"),
    steps: str = typer.Option("0", "--steps", help="denoising steps to record, comma-separated, 0-based"),
    layers: str = typer.Option("0", "--layers", help="attention layers to record, comma-separated, 0-based (forward order)"),
    heads: str = typer.Option(None, "--heads", help="heads to record, comma-separated (default: all)"),
    out: Path = typer.Option(..., "--out", "-o", help="safetensors file to write"),
    num_steps: int = typer.Option(None, "--num-steps", help="length of the run in steps (default: the model's)"),
    height: int = typer.Option(None, help="height in pixels (default: the model's)"),
    width: int = typer.Option(None, help="width in pixels (default: the model's)"),
    frames: int = typer.Option(None, help="frames (default: the model's)"),
    seed: int = typer.Option(0, help="random seed"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    dtype: str = typer.Option(None, help="bf16 | fp16 | fp32 (default: the model's)"),
    model_path: Path = typer.Option(None, help="local folder with the model's diffusers-format weights"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs"),
) -> None:
    """Record q, k, v (after RoPE) and the layout of chosen steps/layers/heads of a dense run."""
    from gen.capture import capture as do_capture

    _setup_logging(verbose)

    def ints(text: str | None, what: str) -> list[int] | None:
        if text is None:
            return None
        try:
            vals = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
        if not vals or min(vals) < 0:
            raise typer.BadParameter(f"{what} must be integers >= 0, got {text!r}")
        return vals

    if dtype is not None and dtype not in ("bf16", "fp16", "fp32"):
        raise typer.BadParameter(f"--dtype must be bf16, fp16 or fp32, got {dtype!r}")
    try:
        with console.status("running the pipeline…"):
            result = do_capture(
                model, prompt, steps=ints(steps, "--steps"), layers=ints(layers, "--layers"),
                heads=ints(heads, "--heads"), out=out, num_steps=num_steps, height=height, width=width,
                frames=frames, seed=seed, device=device, dtype=dtype, model_path=model_path,
            )
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    for c in result.calls:
        console.print(f"step {c.step} layer {c.layer} ({c.branch or 'single call'}): q/k/v {tuple(c.q.shape)} "
                      f"{str(c.q.dtype).removeprefix('torch.')}, {c.layout}")
    console.print(f"wrote {out}")


calibrate_app = typer.Typer(help="Offline searches that write plan files for per-head methods.", no_args_is_help=True)
app.add_typer(calibrate_app, name="calibrate")


@calibrate_app.command("sparse-vdit")
def calibrate_sparse_vdit(
    model: str = typer.Option(..., "--model", "-m", help="model name (see `gen models`); the plan is for it only"),
    prompts: Path = typer.Option(..., "--prompts", help="text file with one prompt per line (# comments skipped)"),
    out: Path = typer.Option(..., "--out", "-o", help="plan file to write (safetensors)"),
    steps: int = typer.Option(None, help="denoising steps (default: the model's); the plan is for exactly these"),
    height: int = typer.Option(None, help="height in pixels (default: the model's)"),
    width: int = typer.Option(None, help="width in pixels (default: the model's)"),
    frames: int = typer.Option(None, help="frames of video (default: the model's)"),
    lam: float = typer.Option(None, help="cost weight: loss = error + lam * (1 - sparsity) (default 0.5)"),
    eps: float = typer.Option(None, help="a head stays full when every loss exceeds eps (default 1; larger is sparser)"),
    seed: int = typer.Option(0, help="random seed of every prompt's run"),
    guidance: float = typer.Option(None, help="guidance scale (default: the model's)"),
    negative_prompt: str = typer.Option(None, help="negative prompt"),
    image: Path = typer.Option(None, help="input image for image-to-video models"),
    set_: list[str] = typer.Option(None, "--set", help="search parameter key=value: block_size, window, diagonal, "
                                   "stripes, dense_steps, dense_layers, backend (repeatable)"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    dtype: str = typer.Option(None, help="bf16 | fp16 | fp32 (default: the model's)"),
    model_path: Path = typer.Option(None, help="local folder with the model's diffusers-format weights"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs"),
) -> None:
    """Search Sparse-vDiT's per-head attention modes on real runs of MODEL; write a plan."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gen.attention.methods import parse_overrides
    from gen.calibrate import calibrate, plan_summary, read_prompts

    _setup_logging(verbose)
    if dtype is not None and dtype not in ("bf16", "fp16", "fp32"):
        raise typer.BadParameter(f"--dtype must be bf16, fp16 or fp32, got {dtype!r}")
    try:
        texts = read_prompts(prompts)
        overrides = parse_overrides("sparse-vdit", set_ or [])
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("loading the model", total=None)
            result = calibrate(
                model, texts, out=out, steps=steps, height=height, width=width, frames=frames, lam=lam,
                eps=eps, seed=seed, guidance=guidance, negative_prompt=negative_prompt, image=image,
                overrides=overrides, device=device, dtype=dtype, model_path=model_path,
                progress=lambda done, total, what: bar.update(task, completed=done, total=total,
                                                              description=escape(what)),
            )
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    meta, summary = result.plan.meta, plan_summary(result.plan)
    table = Table(show_header=False, title=f"wrote {result.path}")
    table.add_row("model", f"{meta.model} at {meta.geometry()}, {meta.steps} steps")
    table.add_row("search", f"{len(texts)} prompt(s), lam {meta.lam}, eps {meta.eps}, {result.seconds:.1f} s")
    table.add_row("mode parameters", f"blocks of {meta.block_size} tokens; window ±{meta.window}, diagonal "
                  f"±{meta.diagonal}, {meta.stripes} stripe(s) (blocks)")
    table.add_row("modes", ", ".join(f"{k} {v:.0%}" for k, v in summary["shares"].items()))
    table.add_row("density", f"video x video {summary['video_density']:.3f}, whole call {summary['call_density']:.3f}")
    console.print(table)
    console.print(escape(f"use it: gen render PROMPT --model {meta.model} --steps {meta.steps} "
                         f"--attention sparse-vdit --set plan={result.path}"))


def _demo_outputs(outputs: Path) -> Path:
    """The checked ``--outputs`` folder of ``gen demo``, or one error line and exit 2."""
    from gen.demos.paths import check_outputs_dir  # no Gradio import: fails fast

    try:
        return check_outputs_dir(outputs)
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1", help="address to bind: 127.0.0.1 is this machine only; 0.0.0.0 opens it to your network"),
    port: int = typer.Option(7860, help="port to serve on"),
    share: bool = typer.Option(False, "--share", help="also open a public gradio.live link (off unless asked)"),
    outputs: Path = typer.Option(Path("outputs/demo"), help="folder for generated files, the only folder the demo serves: "
                                 "a new folder (created), an empty one, or one the demo used before"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, help="largest input image accepted, in MB"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs"),
) -> None:
    """Start the Gradio demo: generate, compare dense vs sparse attention, look at block masks."""
    from gen.values import check_port

    try:
        check_port(port)
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    outputs = _demo_outputs(outputs)
    from gen.demos.app import serve

    _setup_logging(verbose)
    try:
        serve(host=host, port=port, share=share, outputs_dir=outputs, device=device, max_upload_mb=max_upload_mb)
    except ValueError as err:  # the folder changed since the check, or cannot be created
        console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(2) from None


@check_app.command("kernels")
def check_kernels(
    full: bool = typer.Option(False, "--full", help="every config the autotuners may keep (minutes), not the fast subset"),
    arch: str = typer.Option("80,90", help="compute capabilities to compile for, comma-separated (80: A100, 90: H100/H200)"),
    kernel: str = typer.Option(None, help="only these kernel functions, comma-separated (default: all)"),
    jobs: int = typer.Option(None, help="compile processes (default: one per CPU core)"),
    json_out: Path = typer.Option(None, "--json", help="write every row as JSON"),
    markdown: Path = typer.Option(None, help="write the table as markdown"),
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
        raise typer.BadParameter(f"--arch takes compute capabilities such as 80,90; got {arch!r}") from None
    if not archs or any(a not in TARGETS for a in archs):
        raise typer.BadParameter(f"--arch must name some of {', '.join(map(str, TARGETS))}; got {arch!r}")
    kernels = tuple(k.strip() for k in kernel.split(",")) if kernel else None
    if kernels and (unknown := [k for k in kernels if k not in KERNELS]):
        raise typer.BadParameter(f"unknown kernel {unknown[0]!r}; known: {', '.join(KERNELS)}")
    if jobs is not None and jobs < 1:
        raise typer.BadParameter("--jobs must be at least 1")
    bar, update = _progress_bar()
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
    if bad:
        raise typer.Exit(1)


@check_app.command("gpu")
def check_gpu(
    out: Path = typer.Option(Path("gpu-check"), help="folder for the report (gpu_check.md, gpu_check.json) and logs"),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would run, run nothing heavy (any machine)"),
    budget_s: float = typer.Option(480.0, help="time budget for all steps, seconds"),
    quick: bool = typer.Option(False, "--quick", help="tiny sizes, to check the plumbing on a CPU"),
) -> None:
    """The prepared GPU check: GPU correctness tests at real shapes, kernel speed against
    SDPA and flex, the cache kernel, long-video FPS; one markdown report."""
    from gen.check.gpu import NoGPUError, run_gpu_check

    if not budget_s > 0:
        raise typer.BadParameter("--budget-s must be a positive number of seconds")
    try:
        report = run_gpu_check(out, dry_run=dry_run, budget_s=budget_s, quick=quick)
    except NoGPUError as exc:
        console.print(f"[red]{escape(str(exc))}")
        raise typer.Exit(2) from None
    console.print("report:")
    console.print(escape(str(report)), soft_wrap=True)


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



@app.command()
def long(
    prompt: str = typer.Argument(..., help="text prompt"),
    model: str = typer.Option("shapes-wan-causal", "--model", "-m", help="Wan text-to-video model (see `gen models`)"),
    schedule: str = typer.Option(
        "sink", help="chunk (Self-Forcing) | sink (LongLive: sink + window, recache) | rolling (Rolling Forcing)"),
    seconds: float = typer.Option(5.0, help="video length in seconds"),
    switch: list[str] = typer.Option(None, "--switch", help="prompt switch 'SECONDS:new prompt' (repeatable)"),
    seed: int = typer.Option(0, help="random seed"),
    height: int = typer.Option(None, help="height in pixels (default: the model's)"),
    width: int = typer.Option(None, help="width in pixels (default: the model's)"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    out: Path = typer.Option(None, "--out", "-o", help="output .mp4 (written as chunks finish, in place when "
                             "complete); default: a unique name in outputs/"),
    flex: bool = typer.Option(False, "--flex", help="FLEX: modulated temporal RoPE, antiphase noise, inference-only sink"),
    checkpoint: list[Path] = typer.Option(None, "--checkpoint", help="causal checkpoint (Self-Forcing, CausVid, "
                                          "LongLive, Rolling Forcing) loaded into the transformer; repeat for a LoRA"),
    model_path: Path = typer.Option(None, help="local folder with the model's diffusers-format weights"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs"),
) -> None:
    """Long video, chunk by chunk with a KV cache, streamed to an mp4 (see gen.long).

    Nothing reaches the output before the video is complete: Ctrl-C, SIGTERM (exit 143) or an
    error leave no file and no ffmpeg process behind; an existing --out is replaced only
    then, with a warning first."""
    from gen.long import long_video, parse_switch

    _setup_logging(verbose)
    try:
        switches = [parse_switch(s) for s in switch or []]
        result = long_video(prompt, out, model=model, schedule=schedule, seconds=seconds, switches=switches,
                            seed=seed, height=height, width=width, device=device, flex=flex, checkpoint=checkpoint or None,
                            model_path=model_path)
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    console.print(f"wrote {result.path}: {result.frames} frames at {result.fps} fps in {result.seconds:.1f} s")

@app.command("train-tiny")
def train_tiny(
    causal: bool = typer.Option(False, "--causal", help="train shapes-wan-causal from shapes-wan (diffusion forcing)"),
    out: Path = typer.Option(None, "--out", "-o", help="pipeline folder to write (default: the bundled folder, replaced "
                             "atomically when training ends)"),
    base: Path = typer.Option(None, help="--causal: the shapes-wan folder to start from (default: the bundled one)"),
    seed: int = typer.Option(0, help="training seed (the shipped weights use 0)"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs"),
) -> None:
    """Train the built-in shapes-wan model (or its causal variant) from its seed: about an hour on 2 CPU cores."""
    import dataclasses

    from gen.pipelines import bundled_folder
    from gen.pipelines.shapes.build import train_shapes_wan, train_shapes_wan_causal
    from gen.pipelines.shapes.config import TrainConfig

    _setup_logging(verbose)
    cfg = dataclasses.replace(TrainConfig(), seed=seed)
    name = "shapes-wan-causal" if causal else "shapes-wan"
    target = out or bundled_folder(name)
    try:
        if causal:
            path = train_shapes_wan_causal(target, base=base or bundled_folder("shapes-wan"), config=cfg, device=device)
        else:
            path = train_shapes_wan(target, config=cfg, device=device)
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    console.print(f"wrote {path}" + ("" if out is None else f"; use it with --model {name} --model-path {path}"))


@app.command("eval-tiny")
def eval_tiny_cmd(
    model: str = typer.Option("shapes-wan", "--model", "-m", help="shapes model to score"),
    attention: str = typer.Option("dense", "--attention", "-a", help="attention method (see `gen methods`)"),
    set_: list[str] = typer.Option(None, "--set", help="method parameter override key=value (repeatable)"),
    steps: int = typer.Option(None, help="denoising steps (default: the model's)"),
    guidance: float = typer.Option(None, help="guidance scale (default: the model's)"),
    seeds: int = typer.Option(2, help="held-out generator seeds per caption"),
    per_motion: int = typer.Option(4, help="captions per motion (6 motions)"),
    model_path: Path = typer.Option(None, help="score this pipeline folder instead of the bundled weights"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    json_out: Path = typer.Option(None, "--json", help="write every clip's reading and the scores as JSON here"),
    markdown: Path = typer.Option(None, help="write the score table here"),
    strip: Path = typer.Option(None, help="write a PNG strip of the first 12 clips here"),
    long: bool = typer.Option(False, "--long", help="score long videos of shapes-wan-causal per gen long schedule"),
    seconds: float = typer.Option(12.0, help="--long: video length in seconds"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs"),
) -> None:
    """Render held-out seeds of a shapes model and score colour, background, shape and motion."""
    from gen._io import atomic_write_text
    from gen.attention.methods import parse_overrides
    from gen.eval_tiny import eval_long, eval_tiny

    _setup_logging(verbose)
    path = str(model_path) if model_path else None
    try:
        if long:
            name = model if model != "shapes-wan" else "shapes-wan-causal"
            results = eval_long(name, seconds=seconds, seeds=seeds, per_motion=per_motion, device=device,
                                model_path=path)
        else:
            results = {"": eval_tiny(model, attention=attention, overrides=parse_overrides(attention, set_ or []),
                                     steps=steps, guidance=guidance, seeds=seeds, per_motion=per_motion,
                                     device=device, model_path=path, strip=strip)}
    except ValueError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    for key, res in results.items():
        m = res.meta
        title = (f"{m['model']} / gen long --schedule {key}: {m['clips']} videos of {m['seconds']:g} s" if long else
                 f"{m['model']} / {m['attention']}: {m['clips']} clips, {m['steps']} steps, guidance "
                 f"{m['guidance']} ({m['seconds']:.0f} s on {m['device']})")
        table = Table(title=title)
        for col in ("motion", "clips", "colour", "background", "shape", "motion ok", "colour and motion"):
            table.add_column(col, justify="left" if col == "motion" else "right")
        for motion, sc in [*res.by_motion.items(), ("all", res.summary)]:
            n = len(res.rows) if motion == "all" else sum(r["motion_of_caption"] == motion for r in res.rows)
            table.add_row(motion, str(n), *(f"{100 * sc[a]:.0f}%" for a in
                                             ("color", "background", "shape", "motion", "color_and_motion")))
        console.print(table)
    if json_out:
        text = (results[""].to_json() if not long else
                "{" + ",".join(f'"{k}": {r.to_json()}' for k, r in results.items()) + "}")
        atomic_write_text(json_out, text)
    if markdown:
        atomic_write_text(markdown, "\n\n".join((f"**{k}**\n\n" if k else "") + r.markdown()
                                                 for k, r in results.items()) + "\n")


def _choose_triton_mode() -> None:
    """Without CUDA, Triton kernels can only run through the interpreter: set
    ``TRITON_INTERPRET=1`` unless the user chose. The automatic backend is still the
    PyTorch reference on the CPU."""
    if "TRITON_INTERPRET" in os.environ:
        return
    loaded = sys.modules.get("torch")
    if loaded is not None and getattr(getattr(loaded, "__spec__", None), "_initializing", False):
        return  # triton imported from inside torch's own import: no device query possible yet
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


class _BeforeTriton:  # a meta path finder that finds nothing
    """Runs :func:`_choose_triton_mode` just before the first ``import triton``, then steps
    aside: Triton reads ``TRITON_INTERPRET`` when it is first imported, and commands that
    never import it (help pages, ``gen methods`` from its cache) need not import torch to decide."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "triton" or fullname.startswith("triton."):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _choose_triton_mode()
        return None  # the regular finders do the import


def main() -> None:  # console-script entry point
    if "TRITON_INTERPRET" not in os.environ:
        if "triton" in sys.modules:
            _choose_triton_mode()  # imported already: decide now, as late as it is
        elif not any(isinstance(f, _BeforeTriton) for f in sys.meta_path):
            sys.meta_path.insert(0, _BeforeTriton())
    app()


if __name__ == "__main__":
    main()
