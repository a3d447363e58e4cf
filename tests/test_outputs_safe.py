"""Outputs survive interruption: partial files, the ffmpeg child, stale partials, output names.

* the sweeper removes partial files of dead runs only (a live pid's, a locked one's and
  every other file stay);
* SIGTERM at every moment of a write (``write_output``, ``Mp4Stream``) leaves nothing but a
  complete target, and only when it came after the rename; SIGTERM while ffmpeg is being
  started (the moment a signal mask does not cover once other threads exist) leaves no file
  that an orphaned ffmpeg makes again;
* SIGKILL at each moment: ffmpeg dies with its writer without finishing the partial file,
  and the sweeper removes it;
* ``gen long`` picks a new name each time unless ``out`` is given, and says when it replaces;
* end to end: ``gen render`` and ``gen long`` get SIGTERM/SIGKILL at moments the child
  announces (it stops itself there), plus one at a seeded random delay; no file at the
  target unless complete, no ffmpeg left, no partial file of a SIGTERMed run, and the next
  run in the folder sweeps every stale partial file.

Children report their own pid in their trace: signals go to the writing process, whatever
started it. Nothing waits for a fixed time: the children say where they are.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

import gen._io as gio
from gen._io import PartialFile, atomic_path, is_partial_name, sweep_stale_partials

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc, prctl)")

ROOT = Path(__file__).resolve().parents[1]
PATIENCE = 600.0  # seconds: only a hung child takes this long


# -- /proc helpers ---------------------------------------------------------------------------------

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


def _ffmpeg_writing_in(pid: int, folder: Path) -> bool:
    """Whether ``pid`` is (still) an ffmpeg process writing into ``folder`` (not a reused pid)."""
    argv = _argv(pid)
    return (_alive(pid) and bool(argv) and "ffmpeg" in os.path.basename(argv[0])
            and any(str(folder) in a for a in argv))


def _wait_until(cond, what: str, timeout: float = PATIENCE) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


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


# -- the sweeper -----------------------------------------------------------------------------------

def test_sweeper_removes_dead_runs_partials_only(tmp_path):
    dead = _dead_pid()
    live = subprocess.Popen(["sleep", "600"])
    zombie = subprocess.Popen(["sleep", "600"])
    zombie.kill()
    _wait_until(lambda: _state(zombie.pid) == "Z", "a zombie")  # killed, not reaped: counts as dead
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
        assert not stale.exists()  # swept when this process first makes a partial file there
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert os.listdir(target.parent) == []
    part = PartialFile(target)
    assert sweep_stale_partials(target.parent) == [] and part.tmp.exists()  # our own pid: alive
    part.tmp.write_bytes(b"done")
    assert part.publish() == target and target.read_bytes() == b"done"
    assert os.listdir(target.parent) == ["out.mp4"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # the usual mode, not mkstemp's


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


# -- SIGTERM at every moment of a write, in this process ----------------------------------------------

def _write_video(kind: str, target: Path, frames: np.ndarray) -> None:
    from gen._io import exit_on_sigterm
    from gen.pipelines.ar.stream import Mp4Stream
    from gen.render import write_output

    if kind == "render":
        write_output(frames, target, 8)
    else:  # as gen.long writes: a stream opened on the first batch, appended chunk by chunk
        with exit_on_sigterm(), Mp4Stream(target, 8) as stream:
            stream.append(frames[:3])
            stream.append(frames[3:])


@pytest.mark.parametrize("kind", ["render", "long"])
def test_sigterm_at_every_moment_of_a_write_leaves_nothing_partial(tmp_path, monkeypatch, kind):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM has a handler in this test process")
    frames = np.random.default_rng(1).integers(0, 255, (7, 32, 48, 3), dtype=np.uint8)
    moments: list[tuple[str, object]] = []
    monkeypatch.setattr(gio, "_point", lambda name, detail="": moments.append((name, detail)))
    _write_video(kind, tmp_path / "plain.mp4", frames)
    names = [m[0] for m in moments]
    assert names[:2] == ["partial-made", "ffmpeg-started"] and names[-4:] == ["finishing", "finished", "renaming",
                                                                                "renamed"]
    assert names.count("frame") == 7 and _playable_frames(tmp_path / "plain.mp4") == 7

    for at in range(len(moments)):
        target = tmp_path / f"t{at}.mp4"
        seen: list[tuple[str, object]] = []

        def point(name, detail="", at=at, seen=seen):
            seen.append((name, detail))
            if len(seen) == at + 1:
                assert signal.getsignal(signal.SIGTERM) is gio._on_signal  # never kill pytest itself
                signal.raise_signal(signal.SIGTERM)  # to this thread, now

        monkeypatch.setattr(gio, "_point", point)
        with pytest.raises(SystemExit) as stop:
            _write_video(kind, target, frames)
        assert stop.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
        where = f"SIGTERM at {seen[at]}: {sorted(os.listdir(tmp_path))}"
        renamed = [m[0] for m in seen].count("renamed") > 0
        if renamed:  # it came after the rename: the target is complete
            assert _playable_frames(target) == 7, where
            target.unlink()
        else:
            assert not target.exists(), where
        assert _partials(tmp_path) == [], where
        for name, detail in seen:
            if name == "ffmpeg-started":
                assert not _alive(int(detail)), where
    assert sorted(os.listdir(tmp_path)) == ["plain.mp4"]


# -- light children: SIGTERM while ffmpeg starts, SIGKILL at each moment -----------------------------

_WRITER_CHILD = textwrap.dedent("""
    import os, signal, subprocess, sys, threading, time
    import numpy as np
    import gen._io as gio
    target, trace, stop_at, mode = sys.argv[1:5]
    counts = {}

    def point(name, detail=""):
        counts[name] = counts.get(name, 0) + 1
        with open(trace, "a") as f:
            f.write(f"{os.getpid()} {name} {counts[name]} {detail}\\n")
        if f"{name}:{counts[name]}" == stop_at:
            os.kill(os.getpid(), signal.SIGSTOP)

    gio._point = point
    if mode == "term-in-popen":
        # another thread that can take signals (as torch's do), and a SIGTERM that arrives while
        # subprocess.Popen is still running for ffmpeg: before its handle is kept anywhere
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        execute = subprocess.Popen._execute_child

        def execute_then_signal(self, args, *rest):
            execute(self, args, *rest)
            if "-i" in args:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # lets the thread switch run the handler here, inside Popen
        subprocess.Popen._execute_child = execute_then_signal
    with gio.exit_on_sigterm(), gio.atomic_path(target) as tmp, gio.Mp4Writer(tmp, 8) as w:
        for i in range(6):
            w.append(np.full((64, 48, 3), 40 * i, np.uint8))
""")


def _trace(path: Path) -> list[list[str]]:
    """A child's trace lines, split into pid, moment, count, detail (complete lines only)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line.split(" ", 3) for line in text.split("\n")[:-1]]


def _ffmpeg_pids(trace: list[list[str]]) -> list[int]:
    return [int(t[3]) for t in trace if t[1] == "ffmpeg-started"]


def test_sigterm_while_ffmpeg_starts_leaves_no_file(tmp_path):
    """The moment the first version of this missed: the handler ran inside ``Popen`` (the
    signal mask of the main thread does not stop another thread from taking the signal),
    Popen closed ffmpeg's stdin and dropped its handle, and the orphaned ffmpeg made the
    partial file again after it had been removed."""
    folder = tmp_path / "out"
    folder.mkdir()
    trace = tmp_path / "trace"
    proc = subprocess.run([sys.executable, "-c", _WRITER_CHILD, str(folder / "v.mp4"), str(trace), "", "term-in-popen"],
                          capture_output=True, text=True, timeout=PATIENCE)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "stopped by SIGTERM" in proc.stderr
    ffmpegs = _ffmpeg_pids(_trace(trace))
    assert len(ffmpegs) == 1
    _wait_until(lambda: not _ffmpeg_writing_in(ffmpegs[0], folder), "ffmpeg to stop")
    assert os.listdir(folder) == []


_MOMENTS = ["partial-made:1", "ffmpeg-started:1", "frame:3", "finishing:1", "finished:1", "renaming:1", "renamed:1"]


@pytest.mark.parametrize("moment", _MOMENTS)
def test_sigkill_at_each_moment_ffmpeg_dies_and_the_partial_is_swept(tmp_path, moment):
    folder = tmp_path / "out"
    folder.mkdir()
    target, trace = folder / "v.mp4", tmp_path / "trace"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER_CHILD, str(target), str(trace), moment, "kill"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until(lambda: proc.poll() is not None or (any(f"{t[1]}:{t[2]}" == moment for t in _trace(trace))
                                                        and _state(int(_trace(trace)[0][0])) == "T"),
                    f"the writer to stop at {moment}")
        assert proc.poll() is None, proc.stderr.read()
        lines = _trace(trace)
        writer = int(lines[0][0])
        ffmpegs = [p for p in _ffmpeg_pids(lines) if _ffmpeg_writing_in(p, folder)]
        for p in ffmpegs:  # held still: it cannot finish the file on end-of-input, only be killed
            os.kill(p, signal.SIGSTOP)
        left = [n for n in _partials(folder) if is_partial_name(n) == writer]
        os.kill(writer, signal.SIGKILL)
        proc.wait(PATIENCE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for p in ffmpegs:
        _wait_until(lambda p=p: not _ffmpeg_writing_in(p, folder), f"ffmpeg {p} to die with its writer", 60)
    renamed = moment == "renamed:1"
    assert target.exists() == renamed
    if renamed:
        assert _playable_frames(target) == 6
    assert len(left) == (moment not in ("renamed:1",))
    if moment in ("partial-made:1", "ffmpeg-started:1", "frame:3", "finishing:1"):
        assert _playable_frames(folder / left[0]) is None  # never finished into a playable video
    assert [p.name for p in sweep_stale_partials(folder)] == left
    assert os.listdir(folder) == (["v.mp4"] if renamed else [])


# -- output names ----------------------------------------------------------------------------------

def test_long_default_names_are_unique_and_replacing_is_said(tmp_path, monkeypatch, caplog):
    from gen.long import default_long_path, long_video

    a = default_long_path("a red ball!", model="tiny-wan", schedule="chunk", seed=3)
    b = default_long_path("a red ball!", model="tiny-wan", schedule="chunk", seed=3)
    assert a != b and a.parent == b.parent == Path("outputs")
    assert a.name.startswith("tiny-wan-long-chunk-a-red-ball-s3-") and a.suffix == ".mp4"

    monkeypatch.chdir(tmp_path)
    stale = tmp_path / "outputs" / f".x.partial-{_dead_pid()}-abcd1234.mp4"
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    kw = dict(model="tiny-wan", schedule="chunk", seconds=1.0, height=32, width=32, device="cpu", progress=False)
    first, second = long_video("a red ball", **kw), long_video("a red ball", **kw)
    assert first.path != second.path
    assert sorted(os.listdir(tmp_path / "outputs")) == sorted([first.path.name, second.path.name])  # stale one swept
    assert all(_playable_frames(tmp_path / "outputs" / n) == first.frames for n in os.listdir(tmp_path / "outputs"))

    out = tmp_path / "mine.mp4"
    out.write_bytes(b"old")
    with caplog.at_level(logging.WARNING, logger="gen"):
        res = long_video("a red ball", out, **kw)
    assert res.path == out and _playable_frames(out) == res.frames
    assert "exists: it will be replaced" in caplog.text
    with pytest.raises(ValueError, match=".mp4"):
        long_video("a red ball", tmp_path / "x.gif", **kw)
    # gen.render.render (the Python API) announces a file it replaces too; not a default name
    from gen.render import render

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gen"):
        done = render("a red ball", model="tiny-wan", steps=1, frames=5, height=32, width=32, device="cpu", out=out)
    assert done.path == out and caplog.text.count("exists: it will be replaced") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gen"):
        render("a red ball", model="tiny-wan", steps=1, frames=5, height=32, width=32, device="cpu")
    assert "it will be replaced" not in caplog.text


def test_cli_long_default_name(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gen.cli import app

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["long", "a cat", "--model", "tiny-wan", "--schedule", "chunk", "--seconds", "1",
                                 "--height", "32", "--width", "32", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    files = os.listdir(tmp_path / "outputs")
    assert len(files) == 1 and files[0].startswith("tiny-wan-long-chunk-a-cat-s0-") and not (tmp_path / "long.mp4").exists()


def test_render_default_names_do_not_collide():
    from gen.pipelines import get_spec
    from gen.render import default_output_path

    spec = get_spec("tiny-wan")
    names = {default_output_path(spec, "a ball", "dense", 0) for _ in range(3)}
    assert len(names) == 3


# -- end to end: killing gen render and gen long ------------------------------------------------------

# ``python -c`` runs gen's CLI in this very process, with gen._io._point writing a trace and
# stopping the process (SIGSTOP) at the chosen moment; the test then sends its signal there.
_GEN_CHILD = textwrap.dedent("""
    import os, signal, sys
    trace, stop_at = sys.argv[1], sys.argv[2]

    def log(*words):
        with open(trace, "a") as f:
            f.write(" ".join(str(w) for w in words) + "\\n")

    log(os.getpid(), "start", 1)
    import gen._io as gio
    counts = {}

    def point(name, detail=""):
        counts[name] = counts.get(name, 0) + 1
        log(os.getpid(), name, counts[name], detail)
        if f"{name}:{counts[name]}" == stop_at:
            log(os.getpid(), "stopping", 1)
            os.kill(os.getpid(), signal.SIGSTOP)

    gio._point = point
    from gen.cli import main
    sys.argv = ["gen", *sys.argv[3:]]
    main()
""")

_RENDER = ["render", "a red ball", "--model", "tiny-wan", "--steps", "2", "--height", "32", "--width", "32",
           "--frames", "9", "--device", "cpu"]
_LONG = ["long", "a red ball", "--model", "tiny-wan", "--schedule", "chunk", "--seconds", "2", "--height", "32",
         "--width", "32", "--device", "cpu"]
_FRAMES = {"render": 9, "long": 21}  # long: 6 latent frames (2 chunks) -> 1 + 4 * 5


def _moments(frames: int) -> list[str]:
    return ["partial-made:1", "ffmpeg-started:1", *(f"frame:{i}" for i in range(1, frames + 1)), "finishing:1",
            "finished:1", "renaming:1", "renamed:1"]


class _Run:
    """One ``gen`` command in a child, stopped at ``moment`` (``"name:n"``) and sent ``sig``
    there, or sent ``sig`` ``delay`` seconds after it started (or never, for ``sig`` None)."""

    def __init__(self, command: str, folder: Path, name: str, sig=None, moment: str = "", delay: float = 0.0):
        self.command, self.sig, self.moment, self.delay = command, sig, moment, delay
        self.target = folder / name
        self.trace_path = folder.parent / f"{name}.trace"
        self.log = folder.parent / f"{name}.log"
        args = _RENDER if command == "render" else _LONG
        env = dict(os.environ, OMP_NUM_THREADS="1")  # several children share few cores
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", _GEN_CHILD, str(self.trace_path), moment, *args,
                                          "--out", str(self.target)], cwd=folder.parent, stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        self.started: float | None = None
        self.sent = False
        self.left_behind: list[str] = []  # its partial files just before a SIGKILL
        self.rc: int | None = None

    def trace(self) -> list[list[str]]:
        return _trace(self.trace_path)

    @property
    def pid(self) -> int | None:  # the writer's own pid, from its trace
        t = self.trace()
        return int(t[0][0]) if t else None

    def has(self, name: str) -> bool:
        return any(t[1] == name for t in self.trace())

    def step(self) -> bool:
        """Send the signal when its moment has come; True once the child has exited."""
        if self.rc is None and self.proc.poll() is not None:
            self.rc = self.proc.returncode
        if self.rc is not None or self.sig is None or self.sent or self.pid is None:
            return self.rc is not None
        if self.moment:
            if not (self.has("stopping") and _state(self.pid) == "T"):
                return False
        else:
            self.started = self.started or time.monotonic()
            if time.monotonic() - self.started < self.delay:
                return False
        self.sent = True
        if self.sig == signal.SIGKILL:
            for p in _ffmpeg_pids(self.trace()):  # held still: it could only be killed, not finish the file
                if self.moment and not self.has("finished") and _ffmpeg_writing_in(p, self.target.parent):
                    os.kill(p, signal.SIGSTOP)
            self.left_behind = [n for n in _partials(self.target.parent) if is_partial_name(n) == self.pid]
        os.kill(self.pid, self.sig)
        if self.moment:
            os.kill(self.pid, signal.SIGCONT)
        return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _run_all(runs: list[_Run]) -> None:
    end = time.monotonic() + PATIENCE
    try:
        while not all([r.step() for r in runs]):
            if time.monotonic() > end:
                raise AssertionError("a gen child did not finish: " + "; ".join(r.output() for r in runs))
            time.sleep(0.02)
    finally:
        for r in runs:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()


@pytest.fixture(scope="module")
def _tiny_wan_built():
    from gen.pipelines import load

    load("tiny-wan", device="cpu")  # built once into GEN_CACHE_DIR, which the children share


@pytest.mark.slow  # six gen processes: about a minute on two cores, more under load
def test_killed_gen_render_and_long_leave_no_output_no_ffmpeg_and_no_stale_partials(tmp_path, seed, _tiny_wan_built):
    rng = random.Random(seed)
    folder = tmp_path / "out"
    folder.mkdir()
    term, kill = signal.SIGTERM, signal.SIGKILL
    runs = [_Run(cmd, folder, f"{cmd}-{sig.name}.mp4", sig, rng.choice(_moments(_FRAMES[cmd])))
            for cmd in ("render", "long") for sig in (term, kill)]
    cmd = rng.choice(["render", "long"])
    runs.append(_Run(cmd, folder, f"{cmd}-random.mp4", rng.choice([term, kill]), delay=rng.uniform(0.0, 20.0)))
    _run_all(runs)

    ffmpegs = [(p, r) for r in runs for p in _ffmpeg_pids(r.trace())]
    for p, r in ffmpegs:
        _wait_until(lambda p=p: not _ffmpeg_writing_in(p, folder), f"ffmpeg {p} of {r.target.name} to stop", 60)
    for r in runs:
        ctx = (f"{r.target.name}: rc {r.rc}, {r.sig.name} at {r.moment or f'{r.delay:.2f} s'}, "
               f"trace {[t[1:3] for t in r.trace()]}\n{r.output()}")
        assert r.sent or (r.rc == 0 and not r.moment), ctx  # every chosen moment comes
        # a file at the target only if complete: the signal came after the rename (SIGKILL may
        # also land between the rename and its trace line)
        if r.target.exists():
            assert _playable_frames(r.target) == _FRAMES[r.command] and r.has("renaming"), ctx
        assert r.target.exists() or not r.has("renamed"), ctx
        if r.moment or r.sig == term:  # no SIGKILL between the rename and its trace line
            assert r.target.exists() == r.has("renamed"), ctx
        if not r.sent:
            continue
        if r.sig == kill:
            assert r.rc in (-kill, 128 + kill), ctx
        elif r.moment:  # a stop handled while writing
            assert r.rc == 128 + term and "stopped by SIGTERM" in r.output(), ctx
        else:  # anywhere: before the handler is set (default action), while writing, or after
            assert r.rc in (-term, 128 + term, 0), ctx
        if r.sig == term:  # cleaned up at once
            assert not [n for n in _partials(folder) if is_partial_name(n) == r.pid], ctx
        if r.sig == kill and r.moment:
            made, renamed = r.has("partial-made"), r.has("renamed")
            assert len(r.left_behind) == (made and not renamed), ctx
            if r.left_behind and not r.has("finishing"):
                assert _playable_frames(folder / r.left_behind[0]) is None, ctx  # ffmpeg never finished it
    killed = {r.pid for r in runs if r.sig == kill}
    assert all(is_partial_name(n) in killed for n in _partials(folder)), _partials(folder)

    # the next run in the folder sweeps them (and one planted for certain), leaving none of its own
    planted = folder / f".planted.partial-{_dead_pid()}-abcd1234.mp4"
    planted.write_bytes(b"partial")
    cmd = rng.choice(["render", "long"])
    again = _Run(cmd, folder, f"{cmd}-next.mp4")
    _run_all([again])
    assert again.rc == 0, again.output()
    assert _partials(folder) == []
    assert _playable_frames(again.target) == _FRAMES[cmd]
    assert not [p for p in _ffmpeg_pids(again.trace()) if _ffmpeg_writing_in(p, folder)]
