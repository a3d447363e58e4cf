"""File helpers: every output is written atomically, and nothing half-written is left behind.

* ``atomic_path``/``PartialFile``: an output is written to a hidden partial file next to its
  target, ``.<stem>.partial-<pid>-<random><suffix>``, renamed onto the target when complete
  and removed on any error (Ctrl-C and, under ``exit_on_sigterm``, SIGTERM/SIGHUP included).
  The owner's pid in the name and a ``flock`` held on the file while it is written let
  ``sweep_stale_partials`` remove the partial files of runs that died without cleaning up
  (SIGKILL, power loss), never those of a live run. Each process sweeps a folder the first
  time it makes a partial file there.
* ``Mp4Writer``: an H.264 mp4 from raw frames piped to an ffmpeg child process that, on
  Linux, the kernel kills when this process dies, so it cannot turn a partial file into a
  playable video after its writer is gone.
* ``exit_on_sigterm``: SIGTERM and SIGHUP unwind like Ctrl-C (partial files removed, ffmpeg
  stopped, exit status 128 + the signal number: 143 for SIGTERM).

Signals and the moments that matter. A signal taken over by ``exit_on_sigterm`` raises in
the main thread wherever Python happens to be, so the steps that must not be cut in two run
as *critical sections* (``_critical``), during which such a signal is held and raised when the
section ends: creating a partial file and handing it to its owner, starting ffmpeg and
keeping its handle, the final rename (a stop request that is already there cancels it: the
target is left as it was), and the cleanups themselves. A ``pthread_sigmask`` would not do:
in a process with other threads (torch's) the kernel hands the signal to one of those and
Python still runs the handler in the main thread. On top of that, whatever this thread
created inside an ``exit_on_sigterm`` block and still holds when the block is left by an
exception is stopped and removed there.
"""

from __future__ import annotations

import contextlib
import itertools
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


def _point(name: str, detail: object = "") -> None:
    """A named moment of writing an output: ``partial-made`` (inside the critical section that
    creates a partial file), ``ffmpeg-started`` (inside the one that starts ffmpeg; detail: its
    pid), ``frame`` (one more frame piped), ``finishing``/``finished`` (ffmpeg told to finish,
    and done), ``renaming``/``renamed`` (inside the critical section of the final rename),
    ``discarded``. Does nothing; tests replace it to trace a run and stop it at a chosen moment."""


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# -- signals --------------------------------------------------------------------------------------

class Terminated(SystemExit):
    """Raised by :func:`exit_on_sigterm`'s handler; its code is 128 + the signal number."""


_EXIT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class _SignalState(threading.local):
    depth = 0  # critical sections open in this thread
    pending: int | None = None  # a signal held until they end (only ever set in the main thread)


_state = _SignalState()


class _Critical:
    """``with _critical:``: signals taken over by ``exit_on_sigterm`` arriving inside are
    raised when the outermost section ends, not in the middle. Does nothing to signals
    whose handler is someone else's."""

    def __enter__(self) -> None:
        _state.depth += 1

    def __exit__(self, *exc) -> None:
        _state.depth -= 1
        if _state.depth == 0 and _state.pending is not None:
            signum, _state.pending = _state.pending, None
            _raise_for(signum)


_critical = _Critical()


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(128 + signum)


def _on_signal(signum, frame) -> None:
    if _state.depth > 0:
        if _state.pending is None:
            _state.pending = signum
        return
    _state.pending = None
    _raise_for(signum)


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (a ``SystemExit``) in
    the main thread, as Ctrl-C raises ``KeyboardInterrupt``: ``finally`` blocks run, partial
    files are removed and ffmpeg is stopped, and an uncaught one exits with status 143
    (SIGTERM) or 129 (SIGHUP). Ctrl-C is handled here too, so that it also waits for the
    end of a critical section (see the module's notes). Every signal is acted on; none is
    ignored.

    Only signals with their default handler are taken over (an application's own handler,
    or an ignored signal, stays as it is). Outside the main thread, or inside another such
    block, this does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or any(
            signal.getsignal(s) is _on_signal for s in (signal.SIGINT, *_EXIT_SIGNALS)):
        yield
        return
    taken: list[tuple[int, object]] = []
    mark = next(_serials)
    _state.depth, _state.pending = 0, None  # nothing left over from code that ran without this handler
    try:
        for sig, default in ((signal.SIGINT, signal.default_int_handler), *((s, signal.SIG_DFL) for s in _EXIT_SIGNALS)):
            old = signal.getsignal(sig)
            if old is default:
                taken.append((sig, old))
                signal.signal(sig, _on_signal)
        yield
    except BaseException as exc:
        _clean_up_after(mark)
        if isinstance(exc, Terminated) and isinstance(exc.code, int):
            with contextlib.suppress(ValueError):
                logger.warning("stopped by %s: no partial output left", signal.Signals(exc.code - 128).name)
        raise
    finally:
        with _critical:  # every handler goes back; a signal that comes meanwhile is raised after
            for sig, old in reversed(taken):
                signal.signal(sig, old)


# -- what this process has open -------------------------------------------------------------------

_serials = itertools.count(1)
_open_lock = threading.Lock()
_open: dict[int, tuple[int, object]] = {}  # serial -> (thread id, PartialFile or Mp4Writer)


def _hold(obj) -> int:
    with _open_lock:
        serial = next(_serials)
        _open[serial] = (threading.get_ident(), obj)
    return serial


def _let_go(serial: int | None) -> None:
    if serial is not None:
        with _open_lock:
            _open.pop(serial, None)


def _clean_up_after(mark: int) -> None:
    """Stop the ffmpeg processes and remove the partial files this thread created after
    ``mark`` and still holds (whatever an exception left between two lines)."""
    me = threading.get_ident()
    with _critical:
        with _open_lock:
            mine = [obj for serial, (tid, obj) in sorted(_open.items()) if serial > mark and tid == me]
        for obj in mine:  # writers first: ffmpeg must be gone before its file is removed
            if isinstance(obj, Mp4Writer):
                obj.abort()
        for obj in mine:
            if isinstance(obj, PartialFile):
                obj.discard()


# -- partial files ---------------------------------------------------------------------------------

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
    _swept.add(_folder_key(folder))
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


_swept: set[str] = set()  # folders this process has swept


def _folder_key(folder: str | os.PathLike) -> str:
    return os.path.abspath(folder)


class PartialFile:
    """A hidden partial file next to ``path`` (same suffix), to be published onto ``path``
    (``publish``: renamed, atomic on one filesystem) or discarded (``discard``).

    The folder's stale partial files are swept first (once per process and folder). The file
    is locked (``flock``) until it is published or discarded. Create it inside a critical
    section when the caller keeps it in a variable (``with _critical: part = PartialFile(p)``),
    so that a signal cannot land between its creation and the assignment.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp: Path | None = None
        self.published = False
        self._fd: int | None = None
        self._serial: int | None = None
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        if _folder_key(folder) not in _swept:
            sweep_stale_partials(folder)
        try:
            with _critical:
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.stem}.partial-{os.getpid()}-",
                                           suffix=self.path.suffix)
                self.tmp, self._fd = Path(tmp), fd
                self._serial = _hold(self)
                _lock(fd)
                _point("partial-made", self.tmp)
        except BaseException:
            self.discard()
            raise

    def _release(self) -> None:
        _let_go(self._serial)
        self._serial = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def publish(self) -> Path:
        """Rename the partial file onto ``path``. A stop request (signal) already waiting
        cancels it: the file is removed and the target left as it was."""
        try:
            with _critical:
                _point("renaming", self.path)
                if _state.pending is None:
                    os.chmod(self.tmp, _default_mode())  # mkstemp makes 0600; outputs get the usual mode
                    os.replace(self.tmp, self.path)
                    self.published = True
                    self._release()
                    _point("renamed", self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        """Remove the partial file (nothing once it is published)."""
        with _critical:
            try:
                if self.tmp is not None and not self.published:
                    try:
                        os.unlink(self.tmp)
                        _point("discarded", self.tmp)
                    except FileNotFoundError:
                        pass
                    except OSError as err:
                        logger.warning("could not remove the partial file %s: %s", self.tmp, err)
            finally:
                self._release()


class atomic_path:  # noqa: N801 (used as a function: ``with atomic_path(p) as tmp``)
    """``with atomic_path(path) as tmp``: a partial file next to ``path`` (same suffix) to write
    to; when the block ends it is renamed onto ``path`` (atomic on one filesystem), on any
    error or interruption it is removed. Readers see the old file or the new one, never a
    partial one (see :class:`PartialFile`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.part: PartialFile | None = None

    def __enter__(self) -> Path:
        try:
            with _critical:
                self.part = PartialFile(self.path)
            return self.part.tmp
        except BaseException:
            if self.part is not None:
                self.part.discard()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        part = self.part
        if exc_type is not None:
            part.discard()
            return
        try:
            part.publish()
        except BaseException:
            part.discard()
            raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# -- ffmpeg ---------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def _signals_blocked() -> Iterator[object]:
    """Block SIGINT/SIGTERM/SIGHUP in this thread while ffmpeg is forked (yields the previous
    mask, or None where masks do not exist), so that the child cannot take one between fork
    and exec; ``_child_setup`` gives it the caller's mask back. (The parent relies on a
    critical section, not on this mask: other threads may still take the signal.)"""
    if not hasattr(signal, "pthread_sigmask"):
        yield None
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *_EXIT_SIGNALS})
    try:
        yield old
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _child_setup(old_mask) -> object | None:
    """The ``preexec_fn`` for ffmpeg (POSIX): its own process group, so that Ctrl-C in a
    terminal reaches Python only (imageio-ffmpeg does the same; Python then stops ffmpeg),
    on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (the kernel kills ffmpeg when the thread
    that started it dies, even by SIGKILL), and the caller's signal mask back. Everything
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
    ``preexec_fn`` and offers no hook. Started here, ffmpeg gets ``PR_SET_PDEATHSIG`` on
    Linux (see ``_child_setup``): if this process dies without cleaning up, ffmpeg is killed
    rather than reading end-of-input and turning the partial file into a playable, truncated
    video. The death signal follows the *thread* that started ffmpeg (the one calling the
    first ``append``), so append and close from one thread. ffmpeg is started on the first
    ``append``, once the frame size is known.
    """

    def __init__(self, path: str | os.PathLike, fps: float, *, quality: float = 8):
        self.path = Path(path)
        self.fps = fps
        self.quality = quality
        self.frames = 0
        self._size: tuple[int, int] | None = None
        self._proc: subprocess.Popen | None = None
        self._serial: int | None = None
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
        log = tempfile.TemporaryFile()
        kwargs: dict = {}
        if sys.platform.startswith("win"):
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        try:
            with _critical, _signals_blocked() as old_mask:
                setup = _child_setup(old_mask)
                if setup is not None:
                    kwargs["preexec_fn"] = setup
                self._log = log
                self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                              stderr=log, **kwargs)
                self._serial = _hold(self)
                _point("ffmpeg-started", self._proc.pid)
        except BaseException:
            self.abort()
            raise

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
        _point("frame", self.frames)

    def close(self) -> Path:
        """Finish the file (waits for ffmpeg); OSError if ffmpeg failed."""
        if self._proc is None:
            raise ValueError(f"{self.path.name}: no frames were written.")
        try:
            _point("finishing")
            try:
                self._proc.stdin.close()
            except OSError:
                pass  # it already exited: its status says why
            rc = self._proc.wait()
            text = self._stderr() if rc != 0 else ""
            self._finish()
        except BaseException:
            self.abort()
            raise
        if rc != 0:
            raise OSError(f"ffmpeg failed writing {self.path.name} (exit status {rc}): {text}")
        _point("finished")
        return self.path

    def _finish(self) -> None:
        _let_go(self._serial)
        self._serial = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def abort(self) -> None:
        """Kill ffmpeg and wait for it (the file it was writing is left for the caller to
        remove: ffmpeg is gone first, so it cannot make the file again)."""
        with _critical:
            proc = self._proc
            try:
                if proc is not None:
                    if proc.poll() is None:
                        with contextlib.suppress(OSError):
                            proc.kill()
                    proc.wait()
                    if proc.stdin is not None:
                        with contextlib.suppress(OSError):
                            proc.stdin.close()
            finally:
                self._finish()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
