"""``gen long``: a long video chunk by chunk with a KV cache, streamed to an mp4 (``gen.long``)."""

from __future__ import annotations

from pathlib import Path

import typer

from gen.cli import options as opt
from gen.cli.app import app
from gen.cli.common import console, print_written, setup_logging


@app.command()
def long(
    prompt: str = typer.Argument(..., help="text prompt"),
    model: str = opt.model("shapes-wan-causal", "Wan text-to-video model (see `gen models`)"),
    schedule: str = typer.Option(
        "sink", help="chunk (Self-Forcing) | sink (LongLive: sink + window, recache) | rolling (Rolling Forcing)"),
    seconds: float = opt.seconds(5.0),
    switch: list[str] = typer.Option(None, "--switch", help="prompt switch 'SECONDS:new prompt' (repeatable)"),
    seed: int = opt.seed(),
    height: int = opt.height(),
    width: int = opt.width(),
    device: str = opt.device(),
    out: Path = opt.out(help="output .mp4 (written as chunks finish, in place when complete); default: a "
                        "unique name in outputs/"),
    flex: bool = typer.Option(False, "--flex", help="FLEX: modulated temporal RoPE, antiphase noise, inference-only sink"),
    checkpoint: list[Path] = typer.Option(None, "--checkpoint", help="causal checkpoint (Self-Forcing, CausVid, "
                                          "LongLive, Rolling Forcing) loaded into the transformer; repeat for a LoRA"),
    model_path: Path = opt.model_path(),
    verbose: bool = opt.verbose(),
) -> None:
    """Long video, chunk by chunk with a KV cache, streamed to an mp4 (see gen.long).

    Nothing reaches the output before the video is complete: Ctrl-C, SIGTERM (exit 143) or an
    error leave no file and no ffmpeg process behind; an existing --out is replaced only
    then, with a warning first."""
    from gen.long import long_video, parse_switch

    setup_logging(verbose)
    switches = [parse_switch(s) for s in switch or []]
    # long_video checks --out and warns that an existing file will be replaced
    # (gen._io.note_replacing, as gen render does) before loading the model
    result = long_video(prompt, out, model=model, schedule=schedule, seconds=seconds, switches=switches, seed=seed,
                        height=height, width=width, device=device, flex=flex, checkpoint=checkpoint or None,
                        model_path=model_path)
    console.print(f"{result.frames} frames at {result.fps} fps in {result.seconds:.1f} s", highlight=False)
    print_written(result.path)
