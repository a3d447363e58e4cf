"""``gen capture``: q, k, v of chosen steps/layers/heads of a dense run (``gen.capture``)."""

from __future__ import annotations

from pathlib import Path

import typer

from gen.cli import options as opt
from gen.cli.app import app
from gen.cli.common import console, print_written, setup_logging


def comma_ints(text: str | None, what: str) -> list[int] | None:
    """``"0,2"`` → ``[0, 2]`` (None stays None): whole numbers >= 0, at least one."""
    if text is None:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}.") from None
    if not vals or min(vals) < 0:
        raise ValueError(f"{what} must be integers >= 0, got {text!r}.")
    return vals


@app.command("capture")
def capture_cmd(
    model: str = opt.model(..., "model name (see `gen models`)"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="text prompt of the run"),
    steps: str = typer.Option("0", "--steps", help="denoising steps to record, comma-separated, 0-based"),
    layers: str = typer.Option("0", "--layers", help="attention layers to record, comma-separated, 0-based (forward order)"),
    heads: str = typer.Option(None, "--heads", help="heads to record, comma-separated (default: all)"),
    out: Path = opt.out(help="safetensors file to write", required=True),
    num_steps: int = opt.steps("length of the run in steps (default: the model's)", flag="--num-steps"),
    height: int = opt.height(),
    width: int = opt.width(),
    frames: int = opt.frames(),
    seed: int = opt.seed(),
    device: str = opt.device(),
    dtype: str = opt.dtype(),
    model_path: Path = opt.model_path(),
    verbose: bool = opt.verbose(),
) -> None:
    """Record q, k, v (after RoPE) and the layout of chosen steps/layers/heads of a dense run."""
    from gen.capture import capture as do_capture

    setup_logging(verbose)
    steps_, layers_, heads_ = comma_ints(steps, "--steps"), comma_ints(layers, "--layers"), comma_ints(heads, "--heads")
    with console.status("running the pipeline…"):
        result = do_capture(
            model, prompt, steps=steps_, layers=layers_, heads=heads_, out=out, num_steps=num_steps, height=height,
            width=width, frames=frames, seed=seed, device=device, dtype=dtype, model_path=model_path,
        )
    for c in result.calls:
        console.print(f"step {c.step} layer {c.layer} ({c.branch or 'single call'}): q/k/v {tuple(c.q.shape)} "
                      f"{str(c.q.dtype).removeprefix('torch.')}, {c.layout}")
    print_written(out)
