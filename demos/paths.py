"""Which folder the demo may write to and serve.

The demo serves every file in its outputs folder to anyone who can reach the page
(``/gradio_api/file=...``), so that folder must hold nothing but the demo's own outputs.
``check_outputs_dir`` refuses the filesystem root, system folders, the home folder, a
repository root, the temporary folder and any existing folder that holds files the demo
did not write; ``prepare_outputs_dir`` also creates the folder and marks it as the demo's
(``MARKER``), so that the next run accepts it again. Both ``gen demo`` and
``create_app`` go through them.

No Gradio here: ``gen demo`` checks its ``--outputs`` before importing it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["MARKER", "check_outputs_dir", "prepare_outputs_dir", "sensitive_paths"]

MARKER = ".gen-demo"
"""Name of the small file the demo writes into its outputs folder: a folder holding it
was made (or emptied and taken) by the demo, so its other files are the demo's outputs."""

_MARKER_TEXT = (
    "This folder holds the outputs of `gen demo`, which serves every file in it.\n"
    "Keep other files out of it.\n"
)

# Folders that are never an outputs folder themselves. Subfolders follow the general
# rule (a new folder, an empty one, or one the demo marked), except in the pseudo
# filesystems below, where nothing may be served at all.
_SYSTEM = (
    "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt",
    "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp", "/usr", "/usr/local",
    "/var", "/var/tmp", "/var/lib", "/var/log",
    # macOS
    "/Applications", "/Library", "/System", "/Users", "/Volumes", "/private", "/private/etc",
    "/private/tmp", "/private/var",
)
_PSEUDO = ("/proc", "/sys", "/dev")
# Never served, whatever else the server allows (Gradio's ``blocked_paths``): the system
# folders that hold configuration and secrets, and the usual credential folders at home.
_SECRETS = ("/etc", "/root", "/proc", "/sys", "/dev", "/boot", "/var/lib", "/var/log", "/private/etc")
_HOME_SECRETS = (".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".netrc", ".config",
                 ".cache/huggingface", ".git-credentials", ".pypirc")


def _resolve(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _homes() -> set[Path]:
    """The home folder: ``$HOME``, and the account's entry when that differs."""
    homes = set()
    try:
        homes.add(_resolve(Path.home()))
    except (RuntimeError, KeyError, OSError):  # no home directory known
        pass
    try:
        import pwd

        homes.add(_resolve(pwd.getpwuid(os.getuid()).pw_dir))
    except (ImportError, KeyError, OSError, AttributeError):  # Windows, or no such account
        pass
    return homes


def _repository_roots() -> set[Path]:
    """gen's own source checkout, and the repository the working directory is in."""
    roots: set[Path] = set()
    source = Path(__file__).resolve().parents[1]  # demos/ sits at the root of a checkout
    if (source / "pyproject.toml").is_file():
        roots.add(source)
    try:
        cwd = _resolve(Path.cwd())
    except OSError:  # the working directory was removed
        return roots
    for folder in (cwd, *cwd.parents):
        if (folder / ".git").exists():
            roots.add(folder)
            break
    return roots


def _refused(path: Path) -> str | None:
    """Why ``path`` (resolved) can never be an outputs folder, or ``None``."""
    if path == path.parent:
        return "the root of the filesystem"
    if path in _homes():
        return "your home folder"
    for pseudo in _PSEUDO:
        if _inside(path, Path(pseudo)):
            return f"inside {pseudo}, a system folder"
    system = {_resolve(p) for p in _SYSTEM} | {_resolve(tempfile.gettempdir())}
    if path in system:
        return "the system's temporary folder" if path == _resolve(tempfile.gettempdir()) else "a system folder"
    if path in _repository_roots():
        return "the root of a repository"
    return None


def _foreign(path: Path) -> list[str]:
    """Names in ``path`` (an existing folder) that the demo did not write: all of them
    unless the folder carries the demo's marker."""
    names = sorted(p.name for p in path.iterdir())
    if MARKER in names:
        return []
    return names


def check_outputs_dir(path: str | Path) -> Path:
    """The resolved outputs folder, after checking that serving it exposes nothing else.

    Accepted: a folder that does not exist yet (the demo creates it), an existing empty
    folder, or a folder the demo used before (it holds ``MARKER``). Symbolic links are
    resolved first. Nothing is created or written.

    Raises:
        ValueError: the folder is the filesystem root, a system folder (or inside /proc,
            /sys, /dev), the home folder, a repository root, the temporary folder, a file,
            unreadable, or holds files the demo did not write; the message says what to do.
    """
    given = str(path)
    try:
        resolved = _resolve(path)
    except (OSError, RuntimeError) as err:  # a symlink loop, an unreadable parent
        raise ValueError(f"cannot use {given} as the demo's outputs folder: {err}.") from None
    where = given if str(resolved) == given else f"{given} ({resolved})"
    advice = ("The demo serves every file in its outputs folder; give it a new folder, which it creates "
              "(the default is outputs/demo), or an empty one.")
    reason = _refused(resolved)
    if reason is not None:
        raise ValueError(f"refusing {where} as the demo's outputs folder: it is {reason}. {advice}")
    if resolved.exists() and not resolved.is_dir():
        raise ValueError(f"refusing {where} as the demo's outputs folder: it is a file. {advice}")
    if resolved.is_dir():
        try:
            foreign = _foreign(resolved)
        except OSError as err:
            raise ValueError(f"cannot read the outputs folder {where}: {err.strerror or err}.") from None
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ValueError(
                f"refusing {where} as the demo's outputs folder: it already holds files the demo did not "
                f"write ({shown}). {advice} If they are all outputs of an earlier `gen demo`, create an empty "
                f"file named {MARKER} in it."
            )
    return resolved


def prepare_outputs_dir(path: str | Path) -> Path:
    """``check_outputs_dir``, then create the folder and write the demo's marker in it.

    Raises:
        ValueError: as ``check_outputs_dir``, or the folder cannot be created or written.
    """
    resolved = check_outputs_dir(path)
    try:
        resolved.mkdir(parents=True, exist_ok=True)
        marker = resolved / MARKER
        if not marker.exists():
            marker.write_text(_MARKER_TEXT)
    except OSError as err:
        raise ValueError(f"cannot create the outputs folder {resolved}: {err.strerror or err}.") from None
    return resolved


def sensitive_paths(keep: list[str | Path] = ()) -> list[str]:
    """Folders the demo's server must never serve (Gradio's ``blocked_paths``): system
    folders holding configuration or secrets and the credential folders in the home
    folder, except any that contains a folder in ``keep`` (the outputs and upload folders:
    Gradio checks ``blocked_paths`` before everything else)."""
    kept = [_resolve(p) for p in keep]
    candidates = [Path(p) for p in _SECRETS] + [home / name for home in _homes() for name in _HOME_SECRETS]
    out = []
    for folder in candidates:
        resolved = _resolve(folder)
        if not resolved.exists() or any(_inside(k, resolved) for k in kept):
            continue
        out.append(str(resolved))
    return sorted(set(out))
