"""What the commands share besides options: the consoles, logging, printing written paths,
a progress bar, the command line as typed (for result files), the ``--set`` overrides.

Imports typer and rich only; everything heavier is imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Iterable
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console()


def setup_logging(verbose: bool) -> None:
    """gen's log lines on stderr through rich; ``--verbose`` shows debug lines (and the
    traceback of a user error, ``gen.cli.errors``)."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
        force=True,
    )
    logging.getLogger("gen").setLevel(logging.DEBUG if verbose else logging.INFO)


def print_path(path: str | os.PathLike) -> None:
    """``path`` alone on its line, whole: never wrapped, cropped or coloured by rich, so a
    narrow terminal shows it intact and a script can take the line as it is."""
    console.print(str(path), soft_wrap=True, highlight=False, markup=False)


def print_written(*paths: str | os.PathLike | None, label: str = "wrote:") -> None:
    """``wrote:`` then each written path (None skipped) on a line of its own."""
    paths = [p for p in paths if p is not None]
    if paths:
        console.print(label, highlight=False)
        for path in paths:
            print_path(path)


def note_replacing(out: str | os.PathLike | None) -> None:
    """Warn that an explicit ``--out`` names a file that exists and will be replaced (the
    same warning as ``gen long``'s, ``gen._io.note_replacing``)."""
    if out is not None:
        from gen._io import note_replacing as _note

        _note(Path(out).expanduser())


def overrides(method: str | None, settings: Iterable[str] | None) -> dict:
    """``--set key=value`` overrides, typed and checked against ``method``'s config; naming
    a method also checks that it exists. ``--set`` without a method is refused."""
    settings = list(settings or [])
    if method is None:
        if settings:
            raise ValueError("--set needs --attention: the parameters belong to a method.")
        return {}
    from gen.attention.methods import parse_overrides

    return parse_overrides(method, settings)


def command_line(ctx: typer.Context) -> str:
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


def progress_bar(enabled: bool = True):
    """A rich progress bar for ``callable(done, total, what)`` callbacks: ``(bar, update)``;
    ``enabled=False`` (processes other than rank 0) draws nothing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not enabled)
    task = bar.add_task("starting", total=None)
    return bar, lambda done, total, what: bar.update(task, completed=done, total=total, description=escape(what))
