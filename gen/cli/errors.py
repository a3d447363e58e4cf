"""The one error handler of the ``gen`` command line.

gen's functions refuse a bad input by raising ``ValueError`` (or a subclass: unknown
model, bad manifest, bad caption, ...) with one line that says what to do; a few user
errors of other kinds are named in ``USER_ERRORS``. Every command is built with
:class:`GenCommand` (``gen.cli.app.GenTyper`` makes it the default), which catches them
while the options are parsed (the checks of ``gen.cli.options``) and while the command
runs, prints ``error: <message>`` as one red line on stderr and exits with code 2. No
command catches them itself (``tests/test_cli_errors.py`` holds the CLI to that), so a
new command cannot forget it. ``--verbose`` adds the traceback above the line, for bugs
that surface as a ``ValueError``.

Click's own usage errors (an unknown option, ``--steps abc``) keep typer's usage panel;
they exit with 2 too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from typer.core import TyperCommand

USER_ERRORS = ("gen.check.gpu.NoGPUError",)
"""User errors that are not ``ValueError``s, by dotted name (matching by name keeps
``gen --help`` from importing the modules that define them)."""


def is_user_error(err: BaseException) -> bool:
    """A ``ValueError`` (subclasses included) or one of ``USER_ERRORS``."""
    if isinstance(err, ValueError):
        return True
    return any(f"{c.__module__}.{c.__qualname__}" in USER_ERRORS for c in type(err).__mro__)


def report(err: BaseException, *, traceback: bool = False) -> None:
    """``error: <message>`` on stderr, one line that a narrow terminal does not break
    (the message may hold a path); the traceback first if asked (``--verbose``)."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False)
    if traceback:
        console.print_exception()
    message = " ".join(str(err).split("\n")).strip() or type(err).__name__
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


@contextlib.contextmanager
def user_errors(verbose: bool = False) -> Iterator[None]:
    """Turn a user error raised inside into :func:`report` (with the traceback when
    ``verbose``) and exit code 2."""
    try:
        yield
    except Exception as err:
        if not is_user_error(err):
            raise
        report(err, traceback=verbose)
        raise typer.Exit(2) from None


class GenCommand(TyperCommand):
    """A typer command whose option checks and body run under :func:`user_errors`.

    Parsing is covered as well as the call: the shared options of ``gen.cli.options``
    check their values (``gen.values``) in click callbacks, which run in ``make_context``.
    """

    def make_context(self, info_name, args, parent=None, **extra):
        # the options are not parsed yet: --verbose is read from the words themselves
        with user_errors(verbose=any(a in ("-v", "--verbose") for a in args)):
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with user_errors(verbose=bool(ctx.params.get("verbose"))):
            return super().invoke(ctx)
