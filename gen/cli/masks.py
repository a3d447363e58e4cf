"""``gen masks``: a picture of a method's mask at a model's geometry (``gen.masks``)."""

from __future__ import annotations

from pathlib import Path

import typer

from gen.cli import options as opt
from gen.cli.app import app
from gen.cli.common import console, overrides, print_written, setup_logging


@app.command()
def masks(
    method: str = typer.Option(..., "--method", help="attention method (see `gen methods`)"),
    model: str = opt.model(help="model whose geometry and preset to use"),
    height: int = opt.height(),
    width: int = opt.width(),
    frames: int = opt.frames(),
    layer: int = typer.Option(None, help="layer index (default: the first layer the method runs sparse)"),
    head: int = typer.Option(0, help="head index"),
    step: int = typer.Option(None, help="denoising step (default: the first step the method runs sparse)"),
    set_: list[str] = opt.set_(),
    out: Path = opt.out(Path("mask.png"), "PNG to write"),
    capture_file: Path = typer.Option(None, "--capture", help="a `gen capture` file: draw the plan a dynamic method (rectified) makes for its --step/--layer call (default: record one from a short run of --model)"),
) -> None:
    """Draw a method's block mask (and token mask for small layouts) at a model's geometry.

    Dynamic methods (rectified) decide per call from q and k: their picture is the plan of a
    real call, from --capture or from a dense run of the model recorded on the fly."""
    from gen.masks import mask_picture

    setup_logging(False)
    pic = mask_picture(method, model, out=out, height=height, width=width, frames=frames, layer=layer,
                       head=head, step=step, overrides=overrides(method, set_), capture=capture_file)
    if pic.dense_reason:
        console.print(f"{pic.layout}: this call runs dense ({pic.dense_reason})")
    else:
        console.print(f"{pic.layout}: video density {pic.video_density:.3f}, call density {pic.density:.3f}")
    print_written(pic.block_png, pic.token_png, pic.heads_png)
