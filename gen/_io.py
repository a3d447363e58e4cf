"""File helpers: every output is written atomically, so nothing half-written is left.

* ``atomic_path``/``PartialFile``: outputs are written to a hidden partial file next to the
  target, ``.<stem>.partial-<pid>-<random><suffix>``, renamed onto the target when complete
  and removed on any error (Ctrl-C and, under ``exit_on_sigterm``, SIGTERM included). The
  owner's pid in the name and a ``flock`` held on the file while it is written let
  ``sweep_stale_partials`` remove the partial files of runs that died without cleaning up
  (SIGKILL, power loss) and never those of a live run.
* ``Mp4Writer``: an H.264 mp4 from raw frames piped to an ffmpeg child process that, on
  Linux, the kernel kills when this process dies, so it cannot turn a partial file into a
  playable video after its writer is gone.
* ``exit_on_sigterm``: SIGTERM (and SIGHUP) unwind like Ctrl-C: partial files are removed,
  ffmpeg is stopped, and the process exits with 128 + the signal number (143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

logger = logging.getLogger("gen.io")

__all__ = [
    "Mp4Writer", "PartialFile", "Terminated", "atomic_path", "atomic_write_text", "exit_on_sigterm",
    "is_partial_name", "note_replacing", "sweep_stale_partials",
]

# ``.<stem>.partial-<pid>-<mkstemp's random letters><suffix>``
_PARTIAL_NAME = re.compile(r"\..*\.partial-(?P<pid>[0-9]+)-[a-z0-9_]+(?:\.[^.]*)?", re.DOTALL)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def is_partial_name(name: str) -> int | None:
    """The owner's pid if ``name`` is one of gen's partial files, else None."""
    m = _PARTIAL_NAME.fullmatch(name)
    return int(m["pid"]) if m else None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a live process here (a zombie counts as dead). Anything that
    cannot be decided counts as alive, so that its files are left alone."""
    if os.name != "posix" or pid <= 0:
        return True  # os.kill(pid, 0) would terminate the process on Windows
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists and belongs to someone else
        return True
    try:  # killed but not yet reaped by its parent
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _lock(fd: int) -> None:
    """Hold an exclusive ``flock`` on ``fd`` (released when the process dies, however)."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):  # no flock here (Windows, some network filesystems)
        pass


def _locked_by_someone(path: str) -> bool:
    """Whether a live process holds the ``flock`` of ``path`` (a writer in another pid
    namespace, e.g. a container sharing the folder, has a pid that looks dead from here)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return True  # cannot check: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no flock on this filesystem: the pid decides
    finally:
        os.close(fd)
    return False


def note_replacing(path: str | os.PathLike) -> None:
    """Warn that an output named explicitly exists already and will be replaced."""
    if Path(path).exists():
        logger.warning("%s exists: it will be replaced when the new file is complete", path)


def sweep_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove the partial files in ``folder`` left by runs that died (their pid is not a live
    process and nobody holds their lock); return the removed paths. Files of live runs and
    every other file are left untouched."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        pid = is_partial_name(entry.name)
        if pid is None or _pid_alive(pid):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or _locked_by_someone(entry.path):
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # another run swept it first
        except OSError as err:
            logger.debug("could not remove stale partial file %s: %s", entry.path, err)
            continue
        removed.append(Path(entry.path))
    if removed:
        logger.info("removed %d partial file(s) of stopped runs in %s", len(removed), folder)
    return removed


class PartialFile:
    """A hidden partial file next to ``path`` (same suffix), to be published onto ``path``
    (``publish``: renamed, atomic on one filesystem) or discarded (``discard``).

    Stale partial files of dead runs in the folder are swept first. The file is locked
    (``flock``) until it is published or discarded.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_partials(self.path.parent)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.partial-{os.getpid()}-",
                                   suffix=self.path.suffix)
        self.tmp = Path(tmp)
        self._fd: int | None = fd
        _lock(fd)

    def _release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def publish(self) -> Path:
        try:
            os.chmod(self.tmp, _default_mode())  # mkstemp makes 0600; outputs get the usual mode
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self._release()
        return self.path

    def discard(self) -> None:
        try:
            self.tmp.unlink(missing_ok=True)
        finally:
            self._release()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix) to write to; on success it
    is renamed onto ``path`` (atomic on one filesystem), on error it is removed. Readers
    see the old file or the new one, never a partial one (see :class:`PartialFile`)."""
    part = PartialFile(path)
    try:
        yield part.tmp
    except BaseException:
        part.discard()
        raise
    part.publish()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# -- signals --------------------------------------------------------------------------------

class Terminated(SystemExit):
    """Raised by :func:`exit_on_sigterm`'s handler; its code is 128 + the signal number."""


_EXIT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (a ``SystemExit``) in
    the main thread, as Ctrl-C raises ``KeyboardInterrupt``: ``finally`` blocks and
    ``atomic_path``/``Mp4Writer`` clean up, and an uncaught one exits with status 143
    (SIGTERM) or 129 (SIGHUP). A second signal during that cleanup is ignored.

    Only signals whose handler is the default one are taken over (an application's own
    handler, or an ignored signal, stays as it is); outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum, frame):
        nonlocal fired
        if fired:
            return
        fired = True
        raise Terminated(128 + signum)

    taken = []
    try:
        for sig in _EXIT_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, handler)
                taken.append(sig)
        yield
    except Terminated as stop:
        if fired:
            logger.warning("stopped by %s: partial output removed", signal.Signals(int(stop.code) - 128).name)
        raise
    finally:
        for sig in taken:
            signal.signal(sig, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[object]:
    """Block SIGINT/SIGTERM/SIGHUP in this thread (yields the previous mask, or None where
    masks do not exist): a signal handler cannot then interrupt ``Popen`` half way, leaving a
    child nobody owns. Pending signals arrive when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield None
        return
    sigs = {signal.SIGINT, *_EXIT_SIGNALS}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield old
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -- ffmpeg ---------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _child_setup(old_mask) -> object | None:
    """The ``preexec_fn`` for ffmpeg (POSIX): its own process group, so that Ctrl-C in a
    terminal reaches Python only (imageio-ffmpeg does the same; Python then stops ffmpeg),
    the caller's signal mask back, and on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the
    kernel kills ffmpeg when the thread that started it dies, even by SIGKILL. Everything
    the child calls is resolved here, in the parent."""
    if os.name != "posix":
        return None
    prctl, args = None, ()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            prctl = ctypes.CDLL(None, use_errno=True).prctl
            args = (ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(int(signal.SIGKILL)),
                    ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
        except (OSError, AttributeError, ImportError):
            prctl = None
    parent = os.getpid()
    setmask = getattr(signal, "pthread_sigmask", None)

    def setup() -> None:
        os.setpgrp()
        if prctl is not None:
            prctl(*args)
            if os.getppid() != parent:  # the parent died before the prctl: do not outlive it
                os._exit(1)
        if setmask is not None and old_mask is not None:
            setmask(signal.SIG_SETMASK, old_mask)

    return setup


class Mp4Writer:
    """An H.264 (yuv420p) mp4 written frame by frame through an ffmpeg child process.

    ``append`` takes ``(H, W, 3)`` uint8 frames (odd sizes are cropped to even ones, as
    yuv420p needs); ``close`` finishes the file and raises ``OSError`` if ffmpeg failed;
    ``abort`` kills ffmpeg. As a context manager: ``close`` on success, ``abort`` on any
    exception (Ctrl-C and ``Terminated`` included).

    The ffmpeg binary and its command line are imageio-ffmpeg's (``get_ffmpeg_exe``, the
    arguments ``imageio``'s FFMPEG writer gives for ``codec="libx264"``, ``quality=8``), but
    the process is started here: ``imageio_ffmpeg.write_frames`` starts it with a fixed
    ``preexec_fn`` and offers no hook, and patching its private helpers would change every
    other imageio user in the process too. Started here, ffmpeg gets
    ``PR_SET_PDEATHSIG`` on Linux (see ``_child_setup``): if this process dies without
    cleaning up, ffmpeg is killed rather than reading end-of-input and turning the partial
    file into a playable, truncated video. The death signal follows the *thread* that
    started ffmpeg (the one calling the first ``append``), so append and close from one
    thread. ffmpeg is started on the first ``append``, once the frame size is known.
    """

    def __init__(self, path: str | os.PathLike, fps: float, *, quality: float = 8):
        self.path = Path(path)
        self.fps = fps
        self.quality = quality
        self.frames = 0
        self._size: tuple[int, int] | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int | None:
        """ffmpeg's pid once started."""
        return None if self._proc is None else self._proc.pid

    def _command(self, width: int, height: int) -> list[str]:
        import imageio_ffmpeg

        fps = self.fps if isinstance(self.fps, Fraction) else Fraction(self.fps).limit_denominator()
        crf = int((1 - self.quality / 10.0) * 51)
        return [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
                "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-", "-an",
                "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-v", "warning",
                str(self.path)]

    def _start(self, width: int, height: int) -> None:
        cmd = self._command(width, height)
        self._log = tempfile.TemporaryFile()
        kwargs: dict = {}
        if sys.platform.startswith("win"):
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        with _signals_blocked() as old_mask:
            setup = _child_setup(old_mask)
            if setup is not None:
                kwargs["preexec_fn"] = setup
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=self._log, **kwargs)

    def _stderr(self) -> str:
        if self._log is None:
            return ""
        try:
            self._log.seek(0)
            return self._log.read().decode("utf-8", "replace").strip()[-2000:]
        except (OSError, ValueError):
            return ""

    def append(self, frame) -> None:
        import numpy as np

        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frames must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}.")
        h, w = frame.shape[0] - frame.shape[0] % 2, frame.shape[1] - frame.shape[1] % 2
        if self._size is None:
            if h == 0 or w == 0:
                raise ValueError(f"frames of {frame.shape[1]}x{frame.shape[0]} pixels are too small for an mp4.")
            self._size = (w, h)
            self._start(w, h)
        elif (w, h) != self._size:
            raise ValueError(f"all frames of a video must have one size: {self._size}, then {(w, h)}.")
        data = np.ascontiguousarray(frame[:h, :w])
        try:
            self._proc.stdin.write(data.tobytes())
        except OSError as err:  # ffmpeg exited (bad arguments, disk full, ...)
            raise OSError(f"ffmpeg stopped while writing {self.path.name}: {err}. {self._stderr()}") from None
        self.frames += 1

    def close(self) -> Path:
        """Finish the file (waits for ffmpeg); OSError if ffmpeg failed."""
        if self._proc is None:
            raise ValueError(f"{self.path.name}: no frames were written.")
        try:
            try:
                self._proc.stdin.close()
            except OSError:
                pass  # it already exited: its status says why
            rc = self._proc.wait()
        except BaseException:
            self.abort()
            raise
        self._close_log_after(rc)
        return self.path

    def _close_log_after(self, rc: int) -> None:
        text = self._stderr() if rc != 0 else ""
        if self._log is not None:
            self._log.close()
            self._log = None
        if rc != 0:
            raise OSError(f"ffmpeg failed writing {self.path.name} (exit status {rc}): {text}")

    def abort(self) -> None:
        """Kill ffmpeg (the file it was writing is left for the caller to remove)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
