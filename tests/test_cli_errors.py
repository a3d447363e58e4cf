"""The seams of the ``gen/cli`` package: one error handler for every command, written paths
whole on their own line, a warning before an explicit ``--out`` is replaced.

- No module of ``gen/cli`` catches an error to exit by itself, and every registered command
  is built with ``GenCommand`` (``gen.cli.errors``): a new command gets the handler without
  asking for it.
- Every command that takes a value is driven with a bad one: exit code 2, exactly one line
  ``error: ...``, no traceback, nothing loaded. ``BAD`` must name every such command.
- At ``COLUMNS=40`` a written path and every model name come out whole on one line.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gen.cli import app
from gen.cli.app import GenTyper
from gen.cli.errors import GenCommand

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "gen" / "cli"
P = "a red circle moving right on a blue background"


def _commands(command=None, path=()) -> dict[str, object]:
    """``{"bench kernels": <click command>, ...}``: every leaf command of ``app``."""
    command = command or typer.main.get_command(app)
    if not hasattr(command, "commands"):
        return {" ".join(path): command}
    out = {}
    for name, sub in command.commands.items():
        out.update(_commands(sub, (*path, name)))
    return out


def test_no_command_module_handles_errors_itself():
    """The one handler lives in errors.py: elsewhere no ``except`` ends in an exit, and no
    ``typer.BadParameter`` (a panel over several lines) is raised for gen's own checks."""
    problems = []
    for file in sorted(CLI.glob("*.py")):
        if file.name == "errors.py":
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Raise) and "Exit" in ast.unparse(inner.exc or inner):
                        problems.append(f"{file.name}:{inner.lineno}: except ... raise {ast.unparse(inner.exc)}")
                    if isinstance(inner, ast.Call) and ast.unparse(inner.func).endswith(("sys.exit", "exit")):
                        problems.append(f"{file.name}:{inner.lineno}: except ... {ast.unparse(inner)}")
            if isinstance(node, ast.Attribute) and node.attr == "BadParameter":
                problems.append(f"{file.name}:{node.lineno}: typer.BadParameter (raise ValueError: one line)")
    assert not problems, "errors are handled by gen.cli.errors only:\n" + "\n".join(problems)


def test_every_command_is_built_with_the_one_handler():
    commands = _commands()
    assert {"render", "long", "calibrate sparse-vdit", "bench kernels", "check gpu"} <= set(commands)
    assert not [name for name, c in commands.items() if not isinstance(c, GenCommand)]
    with pytest.raises(TypeError, match="GenCommand"):
        GenTyper().command(cls=typer.core.TyperCommand)


def test_the_handler_prints_one_line_and_exits_2():
    demo = GenTyper()

    @demo.command()
    def refuse(kind: str = "value", verbose: bool = False) -> None:
        if kind == "value":
            raise ValueError("no such thing /a/very/long/path/" + "x" * 120 + ".mp4; try another.")
        raise RuntimeError("a bug")

    @demo.command()
    def other() -> None:  # a second command, so that typer keeps subcommand names
        pass

    runner = CliRunner()
    res = runner.invoke(demo, ["refuse"])
    assert res.exit_code == 2 and res.output.splitlines() == [
        "error: no such thing /a/very/long/path/" + "x" * 120 + ".mp4; try another."]
    res = runner.invoke(demo, ["refuse", "--kind", "bug"])  # not a user error: not hidden
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)
    res = runner.invoke(demo, ["refuse", "--verbose"])  # --verbose: the traceback, then the line
    assert res.exit_code == 2 and "Traceback" in res.output
    assert res.output.strip().splitlines()[-1].startswith("error: no such thing")
    res = runner.invoke(app, ["render", P, "--steps", "0", "-v"])  # raised while parsing: the same
    assert res.exit_code == 2 and "Traceback" in res.output and "check_steps" in res.output


def test_a_refused_file_is_one_line_and_exit_1(tmp_path, monkeypatch):
    """Disk full while writing the video (a real render, the write refused by the system):
    one line naming the file and what to do, exit 1 (not a usage error), nothing left."""
    import errno

    import gen.render

    def full_disk(frames, path, fps):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(gen.render, "write_output", full_disk)
    out = tmp_path / "clip.mp4"
    res = CliRunner().invoke(app, ["render", P, "--steps", "1", "--frames", "5", "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1] == (
        f"error: cannot use {out}: No space left on device; free some space or write elsewhere.")
    assert not out.exists()
    # a folder given where the file should be: the same, with its own advice
    from gen.cli.errors import file_error_message

    err = IsADirectoryError(errno.EISDIR, "Is a directory", str(tmp_path))
    assert file_error_message(err) == f"cannot use {tmp_path}: Is a directory; name a file, not a folder."
    assert file_error_message(OSError("no errno")) is None  # not a refused file: a bug, left to surface


# one bad value per command that takes values; {tmp} is the test's folder
BAD = {
    "render": [P, "--steps", "0"],
    "batch": ["{tmp}/jobs.txt", "--out-dir", "{tmp}/o", "--seed", "-1"],
    "masks": ["--method", "radail"],
    "capture": ["--model", "tiny-wan", "--prompt", P, "--out", "{tmp}/c.safetensors", "--num-steps", "0"],
    "demo": ["--port", "0"],
    "long": [P, "--seconds", "-1"],
    "train-tiny": ["--device", "tpu9"],
    "eval-tiny": ["--guidance", "nan"],
    "bench kernels": ["--shape", "wan-9000"],
    "bench e2e": ["--quick", "--seed", "-1"],
    "bench fidelity": ["--quick", "--steps", "0"],
    "check kernels": ["--arch", "75"],
    "check gpu": ["--budget-s", "0"],
    "calibrate sparse-vdit": ["--model", "tiny-wan", "--prompts", "{tmp}/jobs.txt", "--out", "{tmp}/p.safetensors",
                              "--dtype", "fp64"],
    "calibrate paro": ["--model", "shapes-wan", "--prompts", "{tmp}/jobs.txt", "--out", "{tmp}/p.safetensors",
                       "--device", "tpu9"],
}


def _no_load(*args, **kwargs):
    raise AssertionError("a model was loaded for an input that alone decides the error")


def test_bad_covers_every_command_that_takes_values():
    takes_values = {name for name, c in _commands().items() if [p for p in c.params if p.name != "help"]}
    assert takes_values == set(BAD), "give every new command a bad value in BAD"


@pytest.mark.parametrize("command", sorted(BAD))
def test_every_command_refuses_a_bad_value_in_one_line(command, tmp_path, monkeypatch):
    import gen.pipelines
    import gen.pipelines.registry

    monkeypatch.setattr(gen.pipelines.registry, "load", _no_load)
    monkeypatch.setattr(gen.pipelines, "load", _no_load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.txt").write_text(P + "\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in BAD[command]]
    res = CliRunner().invoke(app, [*command.split(), *args])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, AssertionError)


def _gen(*args: str, cwd: Path, columns: int = 40, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "gen", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def test_module_entry_of_the_demo_goes_through_the_handler(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gen.demos", "--port", "99999"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: port must be a whole number from 1 to 65535, got 99999."]


def test_written_path_is_whole_on_its_own_line_and_a_replaced_file_is_announced(tmp_path):
    folder = tmp_path / "a folder with a long name to overflow a narrow terminal"
    folder.mkdir()
    out = folder / "the-clip-with-a-long-name.mp4"
    out.write_bytes(b"old")
    proc = _gen("render", "a red ball", "--model", "tiny-wan", "--steps", "1", "--frames", "5", "--height", "32",
                "--width", "32", "--device", "cpu", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(out) in proc.stdout.splitlines(), proc.stdout
    assert " ".join(proc.stderr.split()).count("exists: it will be replaced") == 1  # once, from render()
    assert out.stat().st_size > 3  # the new video, not b"old"
    png = folder / "the-block-mask-with-a-long-name.png"
    proc = _gen("masks", "--method", "radial", "--model", "tiny-wan", "--out", str(png), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(png) in proc.stdout.splitlines(), proc.stdout


def test_model_and_preset_names_are_whole_at_40_columns(tmp_path):
    from gen.attention.methods import PRESETS
    from gen.pipelines import MODELS

    proc = _gen("models", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    missing = [name for name in MODELS if name not in lines]
    assert not missing, proc.stdout
    proc = _gen("methods", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    words = set(proc.stdout.replace(":", " ").split())
    assert not [key for table in PRESETS.values() for key in table if key not in words], proc.stdout
