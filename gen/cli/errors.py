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

A file the system will not read or write (disk full, no permission, read-only file
system, a folder where a file should be: an ``OSError`` that names its file) is not the
command line's fault: it gets the same one line, ``error: cannot write <file>: <reason>``
with what to do, and exit code 1.
"""

from __future__ import annotations

import contextlib
import errno
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


#: errno values of a file the system refuses, with what the user can do about it
FILE_ERRORS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EACCES: "check the permissions or write elsewhere",
    errno.EPERM: "check the permissions or write elsewhere",
    errno.EROFS: "write elsewhere",
    errno.EISDIR: "name a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "check the path",
}


def file_error_message(err: BaseException) -> str | None:
    """One line for an ``OSError`` of :data:`FILE_ERRORS` that names its file, else None."""
    if not isinstance(err, OSError) or err.errno not in FILE_ERRORS or not err.filename:
        return None
    return f"cannot use {err.filename}: {err.strerror or err}; {FILE_ERRORS[err.errno]}."


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
    ``verbose``) and exit code 2, a refused file into one line and exit code 1."""
    try:
        yield
    except Exception as err:
        message = file_error_message(err)
        if message is not None:
            report(ValueError(message), traceback=verbose)
            raise typer.Exit(1) from None
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
