"""Outputs survive interruption: partial files, the ffmpeg child, stale partials, output names.

* the sweeper removes partial files of dead runs only (a live pid's, a locked one's and
  every other file stay);
* ``Mp4Writer``'s ffmpeg dies with a SIGKILLed parent without finalising the partial file,
  and SIGTERM under ``exit_on_sigterm`` cleans up and exits 143;
* ``gen long`` picks a new name each time unless ``out`` is given, and says when it replaces;
* end to end (slow): ``gen render`` and ``gen long`` subprocesses get SIGTERM/SIGKILL at
  seeded random moments, several while writing; no target file unless complete, no ffmpeg
  left, and the next runs in the folder sweep every stale partial file.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from gen._io import PartialFile, atomic_path, is_partial_name, sweep_stale_partials

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc, prctl)")


# -- /proc helpers ---------------------------------------------------------------------------

def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    s = _state(pid)
    return s is not None and s not in ("Z", "X")


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _ffmpeg_child(pid: int) -> int | None:
    """pid of an ffmpeg child of ``pid`` (its main thread starts it), or None."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    for kid in map(int, kids):
        if "ffmpeg" in os.path.basename(_argv(kid)[0] if _argv(kid) else ""):
            return kid
    return None


def _ffmpegs_writing_in(folder: Path) -> list[int]:
    """Live ffmpeg processes whose command line names a file in ``folder``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        argv = _argv(int(entry.name))
        if argv and "ffmpeg" in os.path.basename(argv[0]) and any(str(folder) in a for a in argv):
            if _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _wait_gone(pids, timeout: float = 10.0) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return []
        time.sleep(0.05)
    return pids


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _partials(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if is_partial_name(n) is not None)


def _playable_frames(path: Path) -> int | None:
    try:
        return iio.imread(path).shape[0]
    except Exception:  # noqa: BLE001 - any reader error means "not a playable video"
        return None


# -- the sweeper -----------------------------------------------------------------------------

def test_sweeper_removes_dead_runs_partials_only(tmp_path):
    dead = _dead_pid()
    live = subprocess.Popen(["sleep", "60"])
    zombie = subprocess.Popen(["sleep", "60"])
    zombie.kill()
    for _ in range(200):  # killed, not reaped yet: a zombie, which counts as dead
        if _state(zombie.pid) == "Z":
            break
        time.sleep(0.01)
    try:
        files = {
            "dead": f".clip.partial-{dead}-abc123_x.mp4",
            "dead_no_suffix": f".notes.partial-{dead}-zz9",
            "zombie": f".z.partial-{zombie.pid}-q1w2e3r4.mp4",
            "live": f".clip.partial-{live.pid}-abc123_y.mp4",
            "mine": f".clip.partial-{os.getpid()}-abc123_z.mp4",
            "locked": f".held.partial-{dead}-lock0001.mp4",
            "video": "clip.mp4",
            "hidden": ".clip.mp4",
            "old_style_temp": ".clip.k2j3h4g5.mp4",
            "not_a_pid": ".clip.partial-12ab-abc.mp4",
            "no_dot": f"clip.partial-{dead}-abc.mp4",
        }
        for name in files.values():
            (tmp_path / name).write_bytes(b"x")
        folder_like = tmp_path / f".dir.partial-{dead}-abcdef.mp4"
        folder_like.mkdir()
        import fcntl

        with open(tmp_path / files["locked"], "rb") as held:  # a writer elsewhere (other pid namespace)
            fcntl.flock(held, fcntl.LOCK_EX)
            removed = sweep_stale_partials(tmp_path)
        assert sorted(p.name for p in removed) == sorted([files["dead"], files["dead_no_suffix"], files["zombie"]])
        left = set(os.listdir(tmp_path))
        assert left == {n for k, n in files.items() if k not in ("dead", "dead_no_suffix", "zombie")} | {folder_like.name}
        # the lock released (its holder gone), the dead pid decides
        assert [p.name for p in sweep_stale_partials(tmp_path)] == [files["locked"]]
    finally:
        live.kill()
        live.wait()
        zombie.wait()

    assert sweep_stale_partials(tmp_path / "missing") == []


def test_partial_files_carry_the_pid_and_go_on_error(tmp_path):
    target = tmp_path / "sub" / "out.mp4"
    stale = tmp_path / "sub" / f".out.partial-{_dead_pid()}-old00000.mp4"
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert is_partial_name(tmp.name) == os.getpid() and tmp.suffix == ".mp4"
        assert not stale.exists()  # swept when the next partial file is made
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert os.listdir(target.parent) == []
    part = PartialFile(target)
    assert sweep_stale_partials(target.parent) == [] and part.tmp.exists()  # our own pid: alive
    part.tmp.write_bytes(b"done")
    assert part.publish() == target and target.read_bytes() == b"done"
    assert os.listdir(target.parent) == ["out.mp4"]


# -- ffmpeg and signals, in a small child process -------------------------------------------------

_WRITER_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from gen._io import Mp4Writer, atomic_path, exit_on_sigterm
    with exit_on_sigterm(), atomic_path(sys.argv[1]) as tmp, Mp4Writer(tmp, 8) as w:
        for i in range(6):
            w.append(np.full((64, 48, 3), 40 * i, np.uint8))
        w._proc.stdin.flush()
        print(w.pid, tmp, flush=True)
        time.sleep(120)
""")


def _writer_child(target: Path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER_CHILD, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline().split()
    assert line, proc.stderr.read()
    time.sleep(0.5)  # ffmpeg has the frames
    return proc, int(line[0]), Path(line[1])


def test_ffmpeg_dies_with_a_killed_parent_and_its_partial_is_swept(tmp_path):
    target = tmp_path / "v.mp4"
    proc, ffmpeg, tmp = _writer_child(target)
    assert _alive(ffmpeg) and tmp.exists()
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL
    assert _wait_gone([ffmpeg]) == [], "ffmpeg outlived its parent"
    # killed, not given end-of-input: it never finalised the partial file into a playable video
    assert tmp.exists() and _playable_frames(tmp) is None
    assert not target.exists()
    assert sweep_stale_partials(tmp_path) == [tmp] and os.listdir(tmp_path) == []


def test_sigterm_removes_the_partial_file_and_stops_ffmpeg(tmp_path):
    target = tmp_path / "v.mp4"
    proc, ffmpeg, tmp = _writer_child(target)
    proc.terminate()
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in proc.stderr.read()
    assert _wait_gone([ffmpeg], 2) == []
    assert os.listdir(tmp_path) == []


def test_mp4_writer_writes_a_playable_video(tmp_path):
    from gen._io import Mp4Writer

    frames = np.random.default_rng(0).integers(0, 255, (5, 33, 47, 3), dtype=np.uint8)  # odd: cropped
    with Mp4Writer(tmp_path / "a.mp4", 8) as w:
        for f in frames:
            w.append(f)
    assert iio.imread(tmp_path / "a.mp4").shape == (5, 32, 46, 3)
    assert not _alive(w.pid)
    with pytest.raises(ValueError, match="one size"), Mp4Writer(tmp_path / "b.mp4", 8) as w:
        w.append(frames[0])
        w.append(frames[0, :20])
    assert not _alive(w.pid)


# -- output names ------------------------------------------------------------------------------

def test_long_default_names_are_unique(tmp_path, monkeypatch, caplog):
    from gen.long import default_long_path, long_video

    a = default_long_path("a red ball!", model="tiny-wan", schedule="chunk", seed=3)
    b = default_long_path("a red ball!", model="tiny-wan", schedule="chunk", seed=3)
    assert a != b and a.parent == b.parent == Path("outputs")
    assert a.name.startswith("tiny-wan-long-chunk-a-red-ball-s3-") and a.suffix == ".mp4"

    monkeypatch.chdir(tmp_path)
    kw = dict(model="tiny-wan", schedule="chunk", seconds=1.0, height=64, width=64, device="cpu", progress=False)
    first, second = long_video("a red ball", **kw), long_video("a red ball", **kw)
    assert first.path != second.path
    files = sorted((tmp_path / "outputs").iterdir())
    assert [f.name for f in files] == sorted([first.path.name, second.path.name])
    assert all(_playable_frames(f) == first.frames for f in files)

    out = tmp_path / "mine.mp4"
    out.write_bytes(b"old")
    with caplog.at_level(logging.WARNING, logger="gen"):
        res = long_video("a red ball", out, **kw)
    assert res.path == out and _playable_frames(out) == res.frames
    assert "exists: it will be replaced" in caplog.text
    with pytest.raises(ValueError, match=".mp4"):
        long_video("a red ball", tmp_path / "x.gif", **kw)


def test_render_default_names_do_not_collide():
    from gen.pipelines import get_spec
    from gen.render import default_output_path

    spec = get_spec("tiny-wan")
    names = {default_output_path(spec, "a ball", "dense", 0) for _ in range(3)}
    assert len(names) == 3


# -- end to end: killing the commands --------------------------------------------------------------

_RENDER = ["render", "a red ball", "--model", "tiny-wan", "--steps", "2", "--height", "64", "--width", "64",
           "--frames", "9", "--device", "cpu"]
_LONG = ["long", "a red ball", "--model", "tiny-wan", "--schedule", "chunk", "--seconds", "4", "--height", "64",
         "--width", "64", "--device", "cpu"]


class _Run:
    """``python -m gen ARGS --out folder/NAME``; a watcher thread sends ``sig`` at ``moment``:
    ``("after", s)`` s seconds after the start, ``("writing", s)`` s after its ffmpeg child
    appears, ``("frozen", 0)`` the instant it appears, with the process stopped (SIGSTOP)
    so the signal lands mid-write for certain."""

    def __init__(self, args, folder: Path, name: str, sig=None, moment=("after", 0.0)):
        self.target = folder / name
        self.sig, self.moment = sig, moment
        self.saw_ffmpeg: int | None = None
        self.left_behind: list[str] = []  # its partial files just after a SIGKILL
        self.log = folder.parent / f"{name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gen", *args, "--out", str(self.target)],
                                         cwd=folder.parent, stdout=log, stderr=subprocess.STDOUT)
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        if self.sig is None:
            return
        kind, delay = self.moment
        pid = self.proc.pid
        if kind == "after":
            time.sleep(delay)
        else:
            while self.proc.poll() is None:
                self.saw_ffmpeg = _ffmpeg_child(pid)
                if self.saw_ffmpeg:
                    break
                time.sleep(0.001)
            if kind == "frozen" and self.saw_ffmpeg:
                os.kill(pid, signal.SIGSTOP)
            time.sleep(delay)
        if self.proc.poll() is not None:
            return
        os.kill(pid, self.sig)
        if self.sig == signal.SIGKILL:
            self.left_behind = [n for n in _partials(self.target.parent) if is_partial_name(n) == pid]
        elif kind == "frozen":
            os.kill(pid, signal.SIGCONT)

    def finish(self, timeout: float = 120.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self.thread.join()
        return rc

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def _tiny_wan_built():
    from gen.pipelines import load

    load("tiny-wan", device="cpu")  # built once into GEN_CACHE_DIR, which the subprocesses share


@pytest.mark.slow
def test_killed_commands_leave_no_output_no_ffmpeg_and_no_stale_partials(tmp_path, seed, _tiny_wan_built):
    rng = random.Random(seed)
    folder = tmp_path / "out"
    folder.mkdir()
    term, kill = signal.SIGTERM, signal.SIGKILL
    runs = [
        _Run(_RENDER, folder, "r-term-writing.mp4", term, ("frozen", 0.0)),
        _Run(_RENDER, folder, "r-kill-writing.mp4", kill, ("frozen", 0.0)),
        _Run(_LONG, folder, "l-term-writing.mp4", term, ("writing", rng.uniform(0.0, 1.0))),
        _Run(_LONG, folder, "l-kill-writing.mp4", kill, ("writing", rng.uniform(0.0, 1.0))),
        # anywhere: loading, denoising, writing or done
        _Run(rng.choice([_RENDER, _LONG]), folder, "any-random.mp4", rng.choice([term, kill]),
             ("after", rng.uniform(0.5, 15.0))),
    ]
    codes = {r.target.name: r.finish() for r in runs}
    print({r.target.name: (codes[r.target.name], r.moment, r.saw_ffmpeg, r.left_behind) for r in runs})
    for r in runs:
        rc, name = codes[r.target.name], r.target.name
        ctx = f"{name}: rc {rc}, moment {r.moment}, ffmpeg seen {r.saw_ffmpeg}\n{r.output()[-3000:]}"
        # nothing at the target unless the run got as far as publishing a complete video
        if r.target.exists():
            assert _playable_frames(r.target) in (9, 33), ctx
        if rc == 0:
            assert r.target.exists(), ctx
        if r.moment[0] != "after":  # killed while writing (for certain when frozen)
            if r.moment[0] == "frozen":
                assert r.saw_ffmpeg, ctx
            if r.saw_ffmpeg and rc != 0:
                assert rc == (128 + term if r.sig == term else -kill), ctx
                assert not r.target.exists(), ctx
        if r.sig == term and rc != 0:
            assert rc in (128 + term, -term), ctx
            if rc == 128 + term:
                assert "stopped by SIGTERM" in r.output(), ctx
    assert _wait_gone(_ffmpegs_writing_in(folder)) == [], "an ffmpeg process outlived its run"
    # runs that took SIGTERM cleaned up; SIGKILLed ones may have left a partial file (which a
    # run still going in the folder may have swept already)
    left = _partials(folder)
    assert all(is_partial_name(n) in {r.proc.pid for r in runs if r.sig == kill} for n in left), left
    assert runs[1].left_behind, "the render SIGKILLed while writing left no partial file to sweep"

    # the next run in the folder sweeps them (and one planted for certain), leaving none of its own
    planted = folder / f".planted.partial-{_dead_pid()}-abcd1234.mp4"
    planted.write_bytes(b"partial")
    again = _Run(_LONG, folder, "l-next.mp4")
    assert again.finish() == 0, again.output()[-3000:]
    assert _partials(folder) == []
    assert _playable_frames(folder / "l-next.mp4") == 33
    assert _ffmpegs_writing_in(folder) == []
