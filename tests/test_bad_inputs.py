"""Every bad input a user can type, through the command line, the Python API and the
demo's engine: each is refused with one clear line (no traceback) and, where the input
alone decides it, before any model is loaded (``gen.pipelines.load`` is replaced by a
function that fails the test).

``CASES`` is the table; ``tests/README.md`` lists it (kept in sync by
``test_the_table_in_tests_readme_lists_every_case``). Manifest errors of ``gen batch`` are
in ``test_batch.py``, kernel-level shape/dtype/plan errors in ``test_errors.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gen.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
P = "a red circle moving right on a blue background"

# (surface, input as the user writes it, the message's key words)
CLI = [
    ("render", ["--model", "tiny-wann"], "Unknown model 'tiny-wann'"),
    ("render", ["--frames", "10"], "frames must be 4k+1"),
    ("render", ["--frames", "0"], "frames must be 4k+1"),
    ("render", ["--frames", "100001"], "more than the limit"),
    ("render", ["--height", "100"], "height must be a positive multiple of 16"),
    ("render", ["--width", "0"], "width must be a positive multiple of 16"),
    ("render", ["--height", "16384", "--width", "16384"], "more than the limit"),
    ("render", ["--attention", "radiall"], "unknown attention method 'radiall'"),
    ("render", ["--set", "decay=1"], "has no field 'decay'"),
    ("render", ["--set", "dense_steps=two"], "dense_steps"),
    ("render", ["--set", "nonsense"], "key=value"),
    ("render", ["--attention", "radial", "--set", "decay=-1"], "decay"),
    ("render", ["--out", "x.png"], "writes .mp4 or .gif"),
    ("render", ["--out", "clip.avi"], "writes .mp4 or .gif"),
    ("render", ["--out", "{tmp}"], "is a folder"),
    ("render", ["--out", "{tmp}/file.txt/clip.mp4"], "is a file, not a folder"),
    ("render", ["--model", "tiny-flux", "--out", "x.mp4"], "image model writes .png"),
    ("render", ["--model", "tiny-flux", "--image", "nope.png"], "does not take an input image"),
    ("render", ["--model", "tiny-wan-i2v"], "give an input image (--image PATH)"),
    ("render", ["--model", "tiny-wan-i2v", "--image", "nope.png"], "does not exist"),
    ("render", ["--steps", "0"], "steps must be between 1 and 1000, got 0"),
    ("render", ["--steps", "-1"], "steps must be between 1 and 1000"),
    ("render", ["--steps", "100000000"], "steps must be between 1 and 1000"),
    ("render", ["--guidance", "nan"], "guidance must be a finite number"),
    ("render", ["--guidance", "inf"], "guidance must be a finite number"),
    ("render", ["--guidance", "-2"], "guidance must be a finite number >= 0"),
    ("render", ["--seed", "-1"], "seed must be between 0"),
    ("render", ["--device", "tpu9"], "unknown device 'tpu9'"),
    ("render", ["--device", "cuda"], "no CUDA device"),
    ("render", ["--dtype", "fp64"], "dtype must be bf16, fp16 or fp32"),
    ("render", ["--model", "wan2.1-t2v-1.3b"], "never downloads"),
    ("render", ["--prompt-file"], "No such option"),
    ("render @", ["@{tmp}/two.txt"], "holds 2 prompts; render them all with `gen batch"),
    ("render @", ["@{tmp}/missing.txt"], "cannot read the prompt file"),
    ("render @", ["@{tmp}/empty.txt"], "no prompt in"),
    ("render @", [""], "the prompt is empty"),
    ("render @", ["   "], "the prompt is empty"),
    ("masks", ["--method", "radial", "--layer", "99"], "layer must be between 0 and 3"),
    ("masks", ["--method", "radial", "--step", "1000000"], "step must be between 0 and 24"),
    ("masks", ["--method", "radial", "--head", "9"], "head must be between 0 and 3"),
    ("masks", ["--method", "radial", "--layer", "-1"], "layer must be between 0 and 3"),
    ("masks", ["--method", "radail"], "unknown attention method 'radail'"),
    ("masks", ["--method", "radial", "--model", "nope"], "Unknown model 'nope'"),
    ("masks", ["--method", "radial", "--frames", "6"], "frames must be 4k+1"),
    ("long", ["--seconds", "inf"], "seconds must be a finite number > 0"),
    ("long", ["--seconds", "nan"], "seconds must be a finite number > 0"),
    ("long", ["--seconds", "0"], "seconds must be a finite number > 0"),
    ("long", ["--seconds", "1e12"], "more than the 3600 s limit"),
    ("long", ["--schedule", "rolled"], "schedule"),
    ("long", ["--switch", "no colon"], "must look like 'SECONDS:new prompt'"),
    ("long", ["--switch", "99:a blue square"], "outside the video"),
    ("long", ["--model", "tiny-flux"], "needs a Wan text-to-video model"),
    ("long", ["--checkpoint", "{tmp}/garbage.safetensors"], "not a readable safetensors file"),
    ("demo", ["--port", "-1"], "port must be a whole number from 1 to 65535"),
    ("demo", ["--port", "99999"], "port must be a whole number from 1 to 65535"),
    ("demo", ["--outputs", "/"], "root of the filesystem"),
    ("demo", ["--outputs", "/etc"], "a system folder"),
    ("train-tiny", ["--set", "dit.stepz=1"], "unknown training setting 'dit.stepz'"),
    ("train-tiny", ["--set", "dit.steps=many"], "dit.steps must be a whole number"),
    ("train-tiny", ["--set", "dit.drop_motion=1.5"], "dit.drop_motion is a fraction"),
    ("train-tiny", ["--vae", "{tmp}/missing"], "does not exist"),
    ("train-tiny", ["--causal", "--vae", "{tmp}"], "--vae is for the text-to-video model"),
    ("train-tiny", ["--snapshot", "{tmp}/snap"], "give --out"),
    ("train-tiny", ["--out", "{tmp}/none", "--snapshot", "{tmp}/snap"], "no unfinished gen train-tiny run"),
    ("batch", ["{tmp}/missing.jsonl", "--out-dir", "{tmp}/o"], "cannot read the manifest"),
    ("batch", ["{tmp}/two.txt", "--out-dir", "{tmp}/file.txt"], "is a file, not a folder"),
    ("batch", ["{tmp}/two.txt", "--out-dir", "{tmp}/o", "--naming", "fancy"], "naming must be one of"),
    ("batch", ["{tmp}/two.txt", "--out-dir", "{tmp}/o", "--repeat", "0"], "repeat must be a whole number"),
    ("batch", ["{tmp}/two.txt", "--out-dir", "{tmp}/o", "--set", "decay=1"], "--set needs --attention"),
    ("batch", ["{tmp}/two.txt", "--out-dir", "{tmp}/o", "--model", "tiny-wan", "--frames", "6"], "line 1: "),
]


def _python_cases(tmp: Path):
    """(surface, input, callable, message) of the Python API and the demo engine."""
    import gen
    from gen.attention import BlockPlan
    from gen.demos.engine import Engine, RunRequest
    from gen.render import render
    from gen.session import RenderJob, Session

    engine = Engine(loader=_no_load, outputs_dir=tmp / "demo")
    return [
        ("gen.render", "render(None)", lambda: render(None), "the prompt must be text"),
        ("gen.render", "render(P, dtype='fp64')", lambda: render(P, dtype="fp64"), "dtype must be bf16"),
        ("gen.render", "render(P, steps=2.5)", lambda: render(P, steps=2.5), "steps must be a whole number"),
        ("gen.render", "render(P, seed='7')", lambda: render(P, seed="7"), "seed must be a whole number"),
        ("gen.render", "render(P, out='x.txt')", lambda: render(P, out="x.txt"), "writes .mp4 or .gif"),
        ("gen.render", "render(P, device='cuda:7')", lambda: render(P, device="cuda:7"), "cuda"),
        ("RenderJob", "RenderJob(P, overrides=[1])", lambda: RenderJob(P, overrides=[1]).resolved(),
         "overrides must be a mapping"),
        ("RenderJob", "RenderJob(P, attention='stock', overrides={'decay': 1})",
         lambda: RenderJob(P, attention="stock", overrides={"decay": 1}).resolved(), "stock attention takes no"),
        ("RenderJob", "RenderJob(P, negative_prompt=3)", lambda: RenderJob(P, negative_prompt=3).resolved(),
         "negative_prompt must be text"),
        ("RenderJob", "RenderJob.from_dict({'seed': 1})", lambda: RenderJob.from_dict({"seed": 1}), "needs a prompt"),
        ("Session", "Session(device='tpu')", lambda: Session(device="tpu"), "unknown device"),
        ("Session", "Session(ulysses=0)", lambda: Session(ulysses=0), "ulysses must be an int >= 1"),
        ("Session", "Session(ulysses=True)", lambda: Session(ulysses=True), "ulysses must be an int >= 1"),
        ("gen.batch", "gen.batch([], dir)", lambda: gen.batch([], tmp / "b"), "has no jobs"),
        ("gen.batch", "gen.batch([3], dir)", lambda: gen.batch([3], tmp / "b"), "a job is a RenderJob"),
        ("gen.batch", "gen.batch([P], dir, ulysses=2.0)", lambda: gen.batch([P], tmp / "b", ulysses=2.0),
         "ulysses must be an int >= 1 (processes per job)"),
        ("gen.sparsify", "sparsify(torch.nn.Linear(1, 1))", lambda: gen.sparsify(torch.nn.Linear(1, 1)),
         "Linear is not supported; gen sparsifies"),
        ("gen.get_method", "get_method('radail')", lambda: gen.get_method("radail"), "unknown attention method"),
        ("gen.get_method", "get_method('radial', decay='x')", lambda: gen.get_method("radial", decay="x"), "decay"),
        ("BlockPlan", "BlockPlan.dense(128, block_m=0)", lambda: BlockPlan.dense(128, block_m=0), "block_m"),
        ("BlockPlan", "BlockPlan.dense(-5)", lambda: BlockPlan.dense(-5), "q_len"),
        ("demo", "RunRequest(prompt='')", lambda: engine.run(RunRequest("shapes-wan", "dense", "")), "prompt"),
        ("demo", "RunRequest(frames=6)", lambda: engine.run(RunRequest("shapes-wan", "dense", P, frames=6)),
         "frames must be 4k+1"),
        ("demo", "RunRequest(tiny-wan-i2v, no image)",
         lambda: engine.run(RunRequest("tiny-wan-i2v", "dense", P)), "upload one"),
        ("demo", "RunRequest(image=/etc/hostname)",
         lambda: engine.run(RunRequest("tiny-wan-i2v", "dense", P, image="/etc/hostname")), "a PNG or JPEG"),
        ("demo", "mask(layer=9)", lambda: engine.mask("shapes-wan", "radial", layer=9), "layer must be between"),
        ("demo", "compare(baseline='fast')", lambda: engine.compare(RunRequest("shapes-wan", "dense", P),
                                                                    baseline="fast"), "baseline must be one of"),
    ]


def _no_load(*args, **kwargs):
    raise AssertionError("a model was loaded for an input that alone decides the error")


@pytest.fixture
def no_load(monkeypatch):
    import gen.pipelines
    import gen.pipelines.registry

    monkeypatch.setattr(gen.pipelines.registry, "load", _no_load)
    monkeypatch.setattr(gen.pipelines, "load", _no_load)


def _files(tmp: Path) -> None:
    (tmp / "two.txt").write_text(f"{P}\na blue square\n")
    (tmp / "empty.txt").write_text("\n# only a comment\n")
    (tmp / "file.txt").write_text("")
    (tmp / "garbage.safetensors").write_bytes(b"not a safetensors file")


def _cli_args(surface: str, args: list[str], tmp: Path) -> list[str]:
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    if surface == "render @":
        return ["render", *args]
    if surface in ("render", "long"):
        return [surface, P, *args]
    return [surface, *args]


@pytest.mark.parametrize("surface,args,message", CLI, ids=[f"{s}:{' '.join(a)}" for s, a, _ in CLI])
def test_cli_bad_input(tmp_path, monkeypatch, no_load, surface, args, message):
    if surface == "render" and args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "wan2.1" in " ".join(args):  # a real checkpoint: the loader's own message is the point
        monkeypatch.undo()
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    _files(tmp_path)
    res = runner.invoke(app, _cli_args(surface, args, tmp_path))
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert message.lower() in text.lower(), res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, AssertionError)
    assert not list(tmp_path.glob("outputs/**/*.mp4"))


def test_python_and_demo_bad_input(tmp_path, no_load):
    cases = _python_cases(tmp_path)
    for surface, shown, call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert message.lower() in str(err.value).lower(), (surface, shown, str(err.value))


def test_at_least_sixty_distinct_bad_inputs(tmp_path):
    assert len(CLI) + len(_python_cases(tmp_path)) >= 60


def test_the_table_in_tests_readme_lists_every_case(tmp_path):
    text = (ROOT / "tests" / "README.md").read_text()
    table = text[text.index("## Bad inputs"):]
    missing = [f"{s} {' '.join(a)}" for s, a, _ in CLI if f"`{_shown(s, a)}`" not in table]
    missing += [f"{s} {shown}" for s, shown, _, _ in _python_cases(tmp_path) if f"`{shown}`" not in table]
    assert missing == [], "add these rows to tests/README.md (python tests/test_bad_inputs.py prints the table)"


def _shown(surface: str, args: list[str]) -> str:
    words = [a if a and not re.search(r"\s", a) else repr(a) for a in args]
    if surface == "render @":
        return "gen render " + " ".join(words)
    return f"gen {surface} " + " ".join(words)


if __name__ == "__main__":  # print the table for tests/README.md
    import tempfile

    print("| surface | input | refused with |\n|---|---|---|")
    for s, a, m in CLI:
        print(f"| CLI `{s.split()[0]}` | `{_shown(s, a)}` | {m.replace('|', '/')} |")
    for s, shown, _, m in _python_cases(Path(tempfile.mkdtemp())):
        print(f"| {s} | `{shown}` | {m} |")
