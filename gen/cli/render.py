"""``gen render``: one prompt to a video or image through the run core (``gen.render``)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from gen.cli import options as opt
from gen.cli.app import app
from gen.cli.common import console, note_replacing, overrides, print_written, setup_logging


@app.command()
def render(
    prompt: str = opt.prompt_argument(),
    model: str = opt.model(),
    attention: str = opt.attention(),
    set_: list[str] = opt.set_(),
    steps: int = opt.steps(),
    frames: int = opt.frames("frames of video (default: the model's)"),
    height: int = opt.height(),
    width: int = opt.width(),
    seed: int = opt.seed(),
    random_seed: bool = typer.Option(False, "--random-seed", help="draw a random seed (printed)"),
    guidance: float = opt.guidance(),
    negative_prompt: str = opt.negative_prompt(),
    image: Path = opt.image(),
    out: Path = opt.out(help="output file (.mp4 or .gif for video; .png, .jpg or .webp for images); "
                        "default: a unique name in outputs/"),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    model_path: Path = opt.model_path(),
    ulysses: int = opt.ulysses(),
    verbose: bool = opt.verbose(),
) -> None:
    """Render PROMPT to a video (mp4) or image (png) with a sparse attention method."""
    import secrets

    from gen.render import render as do_render

    setup_logging(verbose)
    if random_seed:
        seed = secrets.randbelow(2**31)
    job = dict(model=model, attention=attention, overrides=overrides(attention, set_), steps=steps, frames=frames,
               height=height, width=width, seed=seed, guidance=guidance, negative_prompt=negative_prompt,
               image=image, out=out, device=device, dtype=dtype, model_path=model_path)
    if out is not None and ulysses > 1 and os.environ.get("RANK", "0") == "0":
        # render() announces a file it replaces; under torchrun rank 0 alone does (once)
        from gen.pipelines import get_spec
        from gen.values import check_output_path

        check_output_path(out, video=get_spec(model).is_video)  # only a file that will be written
        note_replacing(out)
    if ulysses > 1:
        result = _render_ulysses(ulysses, prompt, **job)
        if result is None:  # not rank 0: rank 0 wrote the file and reports
            return
    else:
        result = do_render(prompt, **job)
    table = Table(show_header=False)
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
    print_written(result.path)


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
