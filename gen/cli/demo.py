"""``gen demo``: the Gradio app (``gen.demos.app``); ``python -m gen.demos`` runs this command."""

from __future__ import annotations

from pathlib import Path

import typer

from gen.cli import options as opt
from gen.cli.app import app
from gen.cli.common import setup_logging


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1", help="address to bind: 127.0.0.1 is this machine only; 0.0.0.0 opens it to your network"),
    port: int = opt.port(),
    share: bool = typer.Option(False, "--share", help="also open a public gradio.live link (off unless asked)"),
    outputs: Path = typer.Option(Path("outputs/demo"), help="folder for generated files, the only folder the demo serves: "
                                 "a new folder (created), an empty one, or one the demo used before"),
    device: str = opt.device(),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, help="largest input image accepted, in MB"),
    verbose: bool = opt.verbose(),
) -> None:
    """Start the Gradio demo: generate, compare dense vs sparse attention, look at block masks."""
    from gen.demos.paths import check_outputs_dir  # no Gradio import: a bad folder fails fast

    outputs = check_outputs_dir(outputs)
    from gen.demos.app import serve

    setup_logging(verbose)
    # serve() checks the folder again: it may have changed since, or be impossible to create
    serve(host=host, port=port, share=share, outputs_dir=outputs, device=device, max_upload_mb=max_upload_mb)
