"""The options the ``gen`` commands share, each declared once.

Each function returns a typer option (or argument) for a command's signature; ``help=``
adapts the text where a command means something narrower (``default denoising steps``
for ``gen batch``). Values with a check in ``gen.values`` (steps, seed, guidance, dtype,
device, seconds, port, prompt) are checked there while the command line is parsed, before
any work, and refused with ``gen.values``'s own message through the one error handler
(``gen.cli.errors``). The checks return the value as typed, except ``--dtype``, which
comes back as its short name (``bfloat16`` → ``bf16``). Values only a model can judge
(height, width, frames, the output file's extension) are checked by the run core with
the same functions once the model is known, still before it is loaded.

``gen.values`` imports torch, so the checks import it when they run, never when a help
page is built.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

DEVICE_HELP = "cuda | cpu (default: cuda when available)"
DTYPE_HELP = "bf16 | fp16 | fp32 (default: the model's)"
MODEL_PATH_HELP = "local folder with the model's diffusers-format weights"


def _check(name: str, **kwargs: Any):
    """A click callback that runs ``gen.values.<name>`` on a given value and keeps the value."""

    def callback(value):
        if value is not None:
            from gen import values

            getattr(values, name)(value, **kwargs)
        return value

    return callback


def _check_dtype(value):
    if value is None:
        return None
    import torch

    from gen.values import check_dtype

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[check_dtype(value)]


def read_prompt(prompt: str) -> str:
    """The prompt argument: ``@FILE`` reads it from a file, ``-`` from stdin (one prompt:
    several belong to ``gen batch``); the text is checked by ``gen.values.check_prompt``."""
    from gen.values import check_prompt

    if prompt == "-":
        text, source = sys.stdin.read(), "stdin"
    elif prompt.startswith("@") and len(prompt) > 1:
        path = Path(prompt[1:]).expanduser()
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read the prompt file {path}: {getattr(err, 'strerror', None) or err}.") from None
    else:
        return check_prompt(prompt)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"no prompt in {source}.")
    if len(lines) > 1:
        raise ValueError(f"{source} holds {len(lines)} prompts; render them all with "
                         f"`gen batch {prompt[1:] if prompt != '-' else 'FILE'} --out-dir DIR`.")
    return check_prompt(lines[0])


def prompt_argument(help: str = "text prompt; @FILE reads it from a file, - from stdin") -> Any:
    return typer.Argument(..., help=help, callback=read_prompt)


def model(default: str | None = "shapes-wan", help: str = "model name (see `gen models`)") -> Any:
    return typer.Option(default, "--model", "-m", help=help)


def attention(default: str | None = "dense", help: str = "attention method (see `gen methods`)") -> Any:
    return typer.Option(default, "--attention", "-a", help=help)


def set_(help: str = "method parameter override key=value (repeatable)") -> Any:
    return typer.Option(None, "--set", help=help)


def steps(help: str = "denoising steps (default: the model's)", flag: str = "--steps") -> Any:
    return typer.Option(None, flag, help=help, callback=_check("check_steps", what=flag.lstrip("-")))


def frames(help: str = "frames (default: the model's)") -> Any:
    return typer.Option(None, "--frames", help=help)


def height(help: str = "height in pixels (default: the model's)") -> Any:
    return typer.Option(None, "--height", help=help)


def width(help: str = "width in pixels (default: the model's)") -> Any:
    return typer.Option(None, "--width", help=help)


def seed(default: int | None = 0, help: str = "random seed") -> Any:
    return typer.Option(default, "--seed", help=help, callback=_check("check_seed"))


def guidance(help: str = "guidance scale (default: the model's)") -> Any:
    return typer.Option(None, "--guidance", help=help, callback=_check("check_guidance"))


def negative_prompt(help: str = "negative prompt") -> Any:
    return typer.Option(None, "--negative-prompt", help=help)


def image(help: str = "input image for image-to-video models") -> Any:
    return typer.Option(None, "--image", help=help)


def out(default: Path | None = None, help: str = "output file", required: bool = False) -> Any:
    return typer.Option(... if required else default, "--out", "-o", help=help)


def device(help: str = DEVICE_HELP) -> Any:
    return typer.Option(None, "--device", help=help, callback=_check("check_device"))


def dtype(help: str = DTYPE_HELP, check: bool = True) -> Any:
    """``check=False``: the benchmarks, whose dtype means the inputs' (default by device),
    check it themselves."""
    return typer.Option(None, "--dtype", help=help, callback=_check_dtype if check else None)


def model_path(help: str = MODEL_PATH_HELP) -> Any:
    return typer.Option(None, "--model-path", help=help)


ULYSSES_HELP = ("N processes share each attention call (diffusers' Ulysses context parallelism); launch with "
                "torchrun --nproc_per_node N")


def ulysses(help: str = ULYSSES_HELP) -> Any:
    return typer.Option(1, "--ulysses", min=1, help=help)


def seconds(default: float, help: str = "video length in seconds") -> Any:
    return typer.Option(default, "--seconds", help=help, callback=_check("check_seconds"))


def port(default: int = 7860, help: str = "port to serve on") -> Any:
    return typer.Option(default, "--port", help=help, callback=_check("check_port"))


def verbose(help: str = "debug logs") -> Any:
    return typer.Option(False, "--verbose", "-v", help=help)


def json_out(help: str = "write results as JSON here") -> Any:
    return typer.Option(None, "--json", help=help)


def markdown(help: str = "write a markdown table here") -> Any:
    return typer.Option(None, "--markdown", help=help)


def plot(help: str) -> Any:
    return typer.Option(None, "--plot", help=help)
