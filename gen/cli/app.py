"""The typer application every ``gen`` command registers on, and the console-script entry.

``GenTyper`` builds every command with ``GenCommand`` (``gen.cli.errors``), so a command
added with ``@app.command()`` or ``@<group>.command()`` is covered by the one error
handler without doing anything. This module imports typer and rich only: help pages
must not pay for torch (``tests/test_cli_speed.py``).
"""

from __future__ import annotations

import os
import sys

import typer

from gen.cli.errors import GenCommand


class GenTyper(typer.Typer):
    """A ``typer.Typer`` whose commands default to :class:`GenCommand` (the one error handler)."""

    def command(self, name: str | None = None, *, cls: type[GenCommand] | None = None, **kwargs):
        if cls is not None and not issubclass(cls, GenCommand):
            raise TypeError(f"gen commands must be built with GenCommand (the one error handler), got {cls!r}")
        return super().command(name, cls=cls or GenCommand, **kwargs)


def group(help: str) -> GenTyper:
    """A command group (``gen bench``, ``gen check``, ``gen calibrate``) with gen's settings."""
    return GenTyper(help=help, no_args_is_help=True, add_completion=False)


app = GenTyper(
    help="gen: fast and long video/image diffusion for diffusers pipelines.",
    no_args_is_help=True,
    add_completion=False,
)


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


def main() -> None:
    """Console-script entry point (``gen``, ``python -m gen``)."""
    if "TRITON_INTERPRET" not in os.environ:
        if "triton" in sys.modules:
            _choose_triton_mode()  # imported already: decide now, as late as it is
        elif not any(isinstance(f, _BeforeTriton) for f in sys.meta_path):
            sys.meta_path.insert(0, _BeforeTriton())
    app()
