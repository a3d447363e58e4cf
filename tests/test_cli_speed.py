"""The ``gen`` command starts light: help pages import no heavy library; ``gen methods``
prints recorded preset densities, which must equal freshly built plans, and reprints its
cached listing, which must equal a fresh one. No timings here."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gen.attention.methods import PRESETS, get_method
from gen.attention.methods.presets import PRESET_DENSITIES
from gen.cli import app
from gen.cli.catalog import (
    _cached_methods_lines,
    _methods_cache_file,
    _methods_lines,
    _preset_grid_density,
)
from gen.pipelines import MODELS

HEAVY = ("torch", "triton", "diffusers", "transformers", "gradio", "matplotlib")


def _env_without_interpret() -> dict:
    """The environment of a user's shell: no TRITON_INTERPRET, so ``main`` decides."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _imported(importtime_stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


@pytest.mark.parametrize("args", [["--help"], ["methods", "--help"], ["bench", "kernels", "--help"]])
def test_help_imports_no_heavy_library(args):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gen", *args], capture_output=True,
                          text=True, timeout=120, env=_env_without_interpret())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Usage" in proc.stdout
    imported = _imported(proc.stderr)
    assert imported and "gen.cli" in imported  # the parse saw the real import list
    heavy = sorted(n for n in imported if n.split(".")[0] in HEAVY)
    assert not heavy, f"{' '.join(args)} imported {heavy[:10]}"


def test_triton_mode_is_still_decided_before_triton_is_imported():
    """``main`` no longer imports torch up front; without CUDA, TRITON_INTERPRET=1 must still
    be set before the first ``import triton`` (Triton reads it then)."""
    script = (
        "import os, sys\n"
        "from gen.cli import main\n"
        "assert 'triton' not in sys.modules and 'torch' not in sys.modules\n"
        "sys.argv = ['gen', 'info']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert 'triton' in sys.modules\n"
        "import torch\n"
        "from gen.kernels._common import interpreter_ready\n"
        "print('RESULT', torch.cuda.is_available(), os.environ.get('TRITON_INTERPRET'), interpreter_ready())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=_env_without_interpret())
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = proc.stdout.strip().splitlines()[-1].split()
    assert result[0] == "RESULT"
    cuda, interpret, ready = result[1:]
    if cuda == "True":
        assert interpret == "None" and ready == "False"
    else:
        assert interpret == "1" and ready == "True"


def test_recorded_preset_densities_equal_fresh_plans():
    """Every entry of ``PRESET_DENSITIES`` equals the density of a plan built now, and every
    model preset with a static plan has an entry (none is stale, none is missing)."""
    fresh_by_config: dict[tuple, tuple[str, float] | None] = {}
    problems = []
    for method, table in PRESETS.items():
        for key in table:
            spec = MODELS.get(key)
            memo = None
            if spec is not None:
                try:  # the same config, grid and heads give the same plan: build it once
                    config = get_method(method, model=key, family=spec.family).config
                    memo = (method, repr(config), spec.token_grid(spec.height, spec.width, spec.frames),
                            spec.heads)
                except ValueError:
                    memo = None
            if memo is not None and memo in fresh_by_config:
                fresh = fresh_by_config[memo]
            else:
                fresh = _preset_grid_density(method, key, precomputed=False)
                if memo is not None:
                    fresh_by_config[memo] = fresh
            recorded = PRESET_DENSITIES.get(method, {}).get(key)
            if fresh is None:
                if recorded is not None:
                    problems.append(f"{method}/{key}: recorded {recorded}, but no static density now")
                continue
            if recorded is None:
                problems.append(f"{method}/{key}: not recorded; fresh {fresh!r}")
            elif (recorded[0] != fresh[0] or recorded[1] != pytest.approx(fresh[1], rel=1e-9, abs=1e-12)
                  or f"{recorded[1]:.3f}" != f"{fresh[1]:.3f}"):
                problems.append(f"{method}/{key}: recorded {recorded!r}, fresh {fresh!r}")
            elif _preset_grid_density(method, key) != recorded:
                problems.append(f"{method}/{key}: `gen methods` does not use the recorded {recorded!r}")
    for method, table in PRESET_DENSITIES.items():
        for key in table:
            if key not in PRESETS.get(method, {}):
                problems.append(f"{method}/{key}: recorded, but there is no such preset")
    assert not problems, "PRESET_DENSITIES (attention/methods/presets.py) is out of date:\n" + "\n".join(problems)


def test_methods_listing_prints_the_densities():
    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # the console may wrap long lines
    for line in (
        "preset wan2.1-t2v-1.3b: {'decay': 0.2, 'dense_steps': 12, 'dense_layers': 1, 'sink': True} "
        "density 0.339 at 21x30x52",
        "preset hunyuanvideo: {'decay': 0.95, 'dense_steps': 12, 'dense_layers': 0, 'sink': False} "
        "density 0.270 at 33x45x80",
        "preset wan2.1-t2v-14b: {'window': (7, -1, 24), 'stride': (1, 1, 8), 'tile': (1, 16, 8)} "
        "density 0.114 at 21x45x80",
        "preset tiny-flux: {'window': (12, 12), 'stride': (4, 4), 'tile': (4, 4)} density 0.562 at 1x16x16",
        "preset wan: {'decay': 0.2, 'dense_steps': 12, 'dense_layers': 1, 'sink': True} preset hunyuan:",
    ):
        assert line in text, line


def test_methods_cache_reprints_the_fresh_listing_without_torch(tmp_path):
    env = {**_env_without_interpret(), "GEN_CACHE_DIR": str(tmp_path), "COLUMNS": "200"}
    first = subprocess.run([sys.executable, "-m", "gen", "methods"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    cached = json.loads((tmp_path / "methods.json").read_text(encoding="utf-8"))
    assert cached["lines"] == _methods_lines()  # what was stored is what a fresh build prints
    again = subprocess.run([sys.executable, "-X", "importtime", "-m", "gen", "methods"], capture_output=True,
                           text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == first.stdout
    heavy = sorted(n for n in _imported(again.stderr) if n.split(".")[0] in HEAVY)
    assert not heavy, f"gen methods with a current cache imported {heavy[:10]}"


def test_methods_cache_that_is_stale_broken_or_unwritable_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_CACHE_DIR", str(tmp_path / "cache"))
    fresh = _methods_lines()
    file = _methods_cache_file()
    assert file.parent == tmp_path / "cache"
    assert _cached_methods_lines() == fresh and file.is_file()  # no folder yet: made
    key = json.loads(file.read_text(encoding="utf-8"))["key"]
    for content in ("{not json", json.dumps({"key": "0" * 64, "lines": ["stale"]}),
                    json.dumps({"key": key, "lines": "not a list"}), json.dumps(["key", "lines"]), "\udcff"):
        file.write_text(content, encoding="utf-8", errors="surrogateescape")
        assert _cached_methods_lines() == fresh, content
        assert json.loads(file.read_text(encoding="utf-8")) == {"key": key, "lines": fresh}
    file.write_text(json.dumps({"key": key, "lines": ["from the cache"]}), encoding="utf-8")
    assert _cached_methods_lines() == ["from the cache"]  # a current key is trusted
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("GEN_CACHE_DIR", str(blocker))  # no folder can be made there
    assert _cached_methods_lines() == fresh
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file", "cache"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["methods.json"]  # no temporary file left
