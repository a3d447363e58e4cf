"""``gen batch`` / ``gen.batch``: manifests, sidecars, resume after a kill, failures that
do not stop the batch, several processes, and one render loop (the run core's).

The end-to-end tests render ``shapes-wan`` at 64x64x5 with 2 steps in subprocesses with
one thread each (``OMP_NUM_THREADS=1``, what ``torchrun`` gives its workers), so frames
of different runs and process counts can be compared bit for bit through the sidecars'
``frames_sha256``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gen
from gen.batches import ManifestError, plan_batch, read_manifest
from gen.session import RenderJob, Session

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "2", "--height", "64", "--width", "64", "--frames", "5"]
PROMPTS = [
    "a red circle moving right on a blue background",
    "a green square moving left on a black background",
    "a yellow triangle moving up on a gray background",
    "a white circle moving down on a green background",
    "a purple square bouncing on a white background",
    "a blue triangle standing still on a black background",
]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _gen(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "gen", *map(str, args)], capture_output=True, text=True,
                         env=_env(), timeout=timeout, cwd=ROOT)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def _manifest(path: Path, n: int) -> Path:
    lines = [json.dumps({"prompt": p, "seed": i, **({"id": f"job{i}"} if i % 2 else {})})
             for i, p in enumerate(PROMPTS[:n])]
    path.write_text("# a comment line\n" + "\n".join(lines) + "\n")
    return path


def _sidecars(folder: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(folder.glob("*.json")):
        out[p.name] = json.loads(p.read_text())
    return out


def _summary(folder: Path) -> dict[str, tuple]:
    return {name: (s["status"], s["job_hash"], s["file"], s["frames_sha256"]) for name, s in _sidecars(folder).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run of the 6-job manifest."""
    tmp = tmp_path_factory.mktemp("batch-ref")
    manifest = _manifest(tmp / "jobs.jsonl", 6)
    out = tmp / "out"
    res = _gen("batch", manifest, "--out-dir", out, *SMALL)
    assert "rendered 6, skipped 0" in res.stdout, res.stdout + res.stderr
    return manifest, out


# -- manifests -------------------------------------------------------------------------------


def test_manifest_formats_defaults_and_repeat(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "a red circle", "seed": 4, "steps": 3}\n\n# skip me\n'
                                      '{"prompt": "a blue square", "id": "sq"}\n')
    (tmp_path / "b.csv").write_text('prompt,seed,overrides\n"a red circle, big",7,"{""block_size"": 64}"\n')
    (tmp_path / "c.txt").write_text("a red circle\n\n  a blue square  \n")
    items = plan_batch(tmp_path / "a.jsonl", defaults={"steps": 2, "seed": 1}, repeat=2)
    assert [(i.line, i.job.seed, i.job.steps) for i in items] == [(1, 4, 3), (1, 5, 3), (4, 1, 2), (4, 2, 2)]
    assert [i.name for i in items] == ["0001-a-red-circle-s4.mp4", "0001-a-red-circle-s5.mp4",
                                       "sq-a-blue-square-s1.mp4", "sq-a-blue-square-s2.mp4"]
    assert len({i.key for i in items}) == 4
    csv_items = plan_batch(tmp_path / "b.csv", defaults={"attention": "radial"})
    assert csv_items[0].job.prompt == "a red circle, big" and csv_items[0].job.overrides == {"block_size": 64}
    assert [i.job.prompt for i in plan_batch(tmp_path / "c.txt")] == ["a red circle", "a blue square"]
    vb = plan_batch(tmp_path / "c.txt", naming="vbench", repeat=2)
    assert [i.name for i in vb] == ["a red circle-0.mp4", "a red circle-1.mp4", "a blue square-0.mp4",
                                    "a blue square-1.mp4"]
    # jobs given in Python: RenderJobs, dicts and prompts; the key ignores the file name
    py = plan_batch([RenderJob("a red circle", seed=3, out="x.mp4"), {"prompt": "a blue square"}, "a green circle"])
    assert [i.name for i in py] == ["x.mp4", "0002-a-blue-square-s0.mp4", "0003-a-green-circle-s0.mp4"]
    assert py[0].key == RenderJob("a red circle", seed=3).key() != RenderJob("a red circle", seed=4).key()


@pytest.mark.parametrize("text,suffix,message", [
    ('{"prompt": "a"}\n{"prompt": "b", }\n', ".jsonl", "line 2: invalid JSON"),
    ('{"prompt": "a"}\n\n{"prompt": "b", "colour": "red"}\n', ".jsonl", "line 3: unknown job field(s) 'colour'"),
    ('{"prompt": "a", "model": "wan9"}\n', ".jsonl", "line 1: Unknown model 'wan9'"),
    ('{"prompt": "a"}\n{"prompt": "b", "attention": "radail"}\n', ".jsonl", "line 2: unknown attention method 'radail'"),
    ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', ".jsonl", "line 2: id 'x' was already used on"),
    ('{"prompt": "a"}\n["b"]\n', ".jsonl", "line 2: a job is a JSON object"),
    ('{"prompt": "a", "steps": 0}\n', ".jsonl", "line 1: steps must be between 1"),
    ('{"prompt": "a", "frames": 6}\n', ".jsonl", "frames must be 4k+1"),
    ('{"prompt": "   "}\n', ".jsonl", "line 1: the prompt is empty"),
    ('{"prompt": "a", "guidance": NaN}\n', ".jsonl", "guidance must be a finite number"),
    ('{"prompt": "a", "id": "../x"}\n', ".jsonl", "id '../x' must be letters"),
    ('{"prompt": "a", "out": "/etc/x.mp4"}\n', ".jsonl", "must be a file name inside the output folder"),
    ('{"prompt": "a"}\n{"prompt": "a"}\n', ".txt_vbench", "would overwrite the output of"),
    ("seed,steps\n1,2\n", ".csv", "needs a header with a 'prompt' column"),
    ("prompt,seed\na,one\n", ".csv", "line 2: column 'seed' has 'one'"),
    ("\n# nothing\n", ".txt", "has no jobs"),
])
def test_bad_manifests_are_refused_before_loading(tmp_path, text, suffix, message):
    naming = "default"
    if suffix == ".txt_vbench":
        suffix, naming, text = ".txt", "vbench", "a red circle\na red circle\n"
    path = tmp_path / f"jobs{suffix}"
    path.write_text(text)
    loads = []
    session = Session(loader=lambda name: loads.append(name))
    with pytest.raises(ManifestError) as err:
        gen.batch(path, tmp_path / "out", naming=naming, session=session)
    assert message in str(err.value)
    assert loads == [] and not (tmp_path / "out").exists()


def test_bad_manifest_on_the_command_line_is_one_line(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "seed": "x"}\n')
    res = _gen("batch", path, "--out-dir", tmp_path / "out", check=False)
    assert res.returncode == 2 and "jobs.jsonl, line 2: seed must be a whole number" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    res = _gen("batch", tmp_path / "missing.jsonl", "--out-dir", tmp_path / "out", check=False)
    assert res.returncode == 2 and "cannot read the manifest" in res.stderr


def test_unwritable_out_dir_is_refused_before_loading(tmp_path):
    (tmp_path / "jobs.txt").write_text("a red circle\n")
    (tmp_path / "file").write_text("")
    loads = []
    session = Session(loader=lambda name: loads.append(name))
    with pytest.raises(ValueError, match="is a file, not a folder"):
        gen.batch(tmp_path / "jobs.txt", tmp_path / "file" / "out", session=session)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="permission denied"):
            gen.batch(tmp_path / "jobs.txt", ro / "out", session=session)
    assert loads == []


def test_read_manifest_reports_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('\n{"prompt": "a"}\n# c\n{"prompt": "b"}\n')
    assert [n for n, _ in read_manifest(path)] == [2, 4]


# -- running, resume, failures (in process) -------------------------------------------------------


def test_resume_force_changed_and_failed_jobs(tmp_path):
    session = Session(progress=False)
    small = dict(steps=2, height=64, width=64, frames=5)
    not_an_image = tmp_path / "photo.png"
    not_an_image.write_text("nonsense")
    # valid as a job, fails when it runs: the input image cannot be decoded
    jobs = [{"prompt": PROMPTS[0], "seed": 1}, {"prompt": PROMPTS[1], "id": "second"},
            {"prompt": PROMPTS[2], "model": "tiny-wan-i2v", "image": str(not_an_image)}]
    out = tmp_path / "out"
    seen = []
    res = gen.batch(jobs[:2], out, defaults=small, session=session, on_job=lambda i, s: seen.append((i.name, s)))
    assert sorted(res.rendered) == sorted(i.name for i in res.items) and res.exit_code == 0
    assert [s for _, s in seen] == ["done", "done"]
    first = _sidecars(out)
    assert all(s["status"] == "done" and s["frames"] == 5 for s in first.values())
    side = first["0001-a-red-circle-moving-right-on-s1.json"]
    assert side["job"]["seed"] == 1 and side["attention"]["method"] == "dense"
    assert side["attention"]["density"] and set(side["versions"]) == {"gen", "diffusers", "torch"}
    assert len(side["timings"]["steps_s"]) == 2 and side["device"] == "cpu"
    assert (out / "thumbs" / "second-a-green-square-moving-left-on-s0.png").is_file()

    again = gen.batch(jobs[:2], out, defaults=small, session=session)
    assert again.rendered == [] and len(again.skipped) == 2 and _sidecars(out) == first
    # a changed job renders again; a file that is no longer readable too
    (out / "second-a-green-square-moving-left-on-s0.mp4").write_bytes(b"not a video")
    changed = gen.batch([{**jobs[0], "guidance": 3.0}, jobs[1]], out, defaults=small, session=session)
    assert sorted(changed.rendered) == sorted(i.name for i in changed.items)
    assert gen.batch(jobs[:2], out, defaults=small, session=session, force=True).rendered
    # a failing job is recorded and the batch goes on; the exit code counts failures
    res = gen.batch(jobs, out, defaults=small, session=session)
    assert res.exit_code == 1 and len(res.failed) == 1
    failed = _sidecars(out)["0003-a-yellow-triangle-moving-up-on-s0.json"]
    assert failed["status"] == "failed" and "cannot read the input image" in failed["error"]
    index = (out / "index.md").read_text()
    assert "2 of 3 done, 1 failed" in index and "thumbs/second-a-green-square-moving-left-on-s0.png" in index
    assert "<img src=\"thumbs/" in (out / "index.html").read_text()
    # a failed job is tried again on the next run
    assert gen.batch(jobs, out, defaults=small, session=session).failed


# -- a kill in the middle, and several processes ---------------------------------------------------


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    manifest, ref_out = reference
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gen", "batch", str(manifest), "--out-dir", str(out), *SMALL],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {n: s for n, s in _sidecars(out).items() if s["status"] == "done"}
    assert 2 <= len(done_before) < 6, "the batch must be killed in the middle"
    res = _gen("batch", manifest, "--out-dir", out, *SMALL)
    assert f"rendered {6 - len(done_before)}, skipped {len(done_before)}" in res.stdout, res.stdout
    after = _sidecars(out)
    for name, side in done_before.items():  # not rendered again
        assert after[name]["started"] == side["started"]
    assert _summary(out) == _summary(ref_out)
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and "index" not in p.name)  # noqa: E731
    assert files(out) == files(ref_out)
    assert not [p for p in out.rglob(".*")], "no temporary file survives the rerun"


def test_two_processes_render_each_job_once(tmp_path, reference):
    manifest, ref_out = reference
    five = tmp_path / "five.jsonl"
    five.write_text("\n".join(manifest.read_text().splitlines()[:6]) + "\n")  # comment + 5 jobs
    out = tmp_path / "out"
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "gen", "batch", str(five), "--out-dir", str(out), *SMALL]
    # its own process group: a hung rendezvous is killed with both workers, not just the launcher
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 300 s:\n{stdout}\n{stderr}")
    res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert res.returncode == 0, res.stdout + res.stderr
    counts = [int(m) for m in re.findall(r"rendered (\d+), skipped", res.stdout)]
    assert len(counts) == 2 and sum(counts) == 5 and min(counts) >= 2, res.stdout
    sides = _sidecars(out)
    assert len(sides) == 5 and {s["process"] for s in sides.values()} == {0, 1}
    assert {s["processes"] for s in sides.values()} == {2}
    ref = _summary(ref_out)
    assert _summary(out) == {k: ref[k] for k in _summary(out)}
    assert "5 of 5 done" in (out / "index.md").read_text()
    # resume works across a different number of processes
    assert "rendered 0, skipped 5" in _gen("batch", five, "--out-dir", out, *SMALL).stdout


# -- one render loop ----------------------------------------------------------------------------------


def test_one_render_loop():
    """No module outside the run core calls a pipeline with sampling arguments or runs a
    denoising loop of its own (the autoregressive runner, which renders chunk by chunk
    with a KV cache, aside)."""
    sampling = {"num_inference_steps", "callback_on_step_end", "guidance_scale"}
    offenders = []
    for folder in ("gen", "demos", "attention", "pipelines", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "gen/session.py" or rel.startswith("pipelines/ar/"):
                continue
            text = path.read_text()
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Call) and sampling & {k.arg for k in node.keywords}:
                    offenders.append(f"{rel}:{node.lineno} calls a pipeline")
            if re.search(r"torch\.linspace\(1\.0, 0\.0", text):
                offenders.append(f"{rel}: a sigma schedule of its own")
    assert offenders == []
