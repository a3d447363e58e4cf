"""The gen command line: `gen bench kernels --quick` and `gen info` on the CPU."""

import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gen.cli import app

runner = CliRunner()


def test_bench_kernels_quick(tmp_path):
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    res = runner.invoke(app, ["bench", "kernels", "--quick", "--density", "1,0.25", "--reps", "1",
                              "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png)])
    assert res.exit_code == 0, res.output
    data = json.loads(out_json.read_text())
    for key in ("device", "torch", "triton", "commit", "command", "date", "dtype", "shape"):
        assert key in data["meta"]
    assert data["meta"]["command"].startswith("gen bench kernels --quick")
    rows = data["rows"]
    impls = {(r["impl"], r["plan"]) for r in rows}
    assert {("sdpa", "dense"), ("torch", "dense"), ("triton", "dense"), ("torch", "random"), ("triton", "random")} <= impls
    for r in rows:
        assert math.isfinite(r["time_ms"]) and r["time_ms"] > 0 and math.isfinite(r["tflops"])
        if r["impl"] != "sdpa":
            assert r["rel_err"] < 1e-5  # fp32 against the fp64 reference
            assert r["speedup"] > 0
    sparse = [r for r in rows if r["plan"] == "random"]
    assert all(0.2 < r["density"] < 0.3 for r in sparse)
    assert "| impl | plan | density |" in out_md.read_text()
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_bench_kernels_rejects_bad_input():
    res = runner.invoke(app, ["bench", "kernels", "--shape", "wan-9000"])
    assert res.exit_code != 0 and "unknown shape" in res.output
    res = runner.invoke(app, ["bench", "kernels", "--quick", "--density", "2"])
    assert res.exit_code != 0 and "[0, 1]" in res.output
    res = runner.invoke(app, ["bench", "kernels", "--quick", "--dtype", "fp8", "--backend", "torch"])
    assert res.exit_code == 2 and "dtype must be one of" in res.output


def test_info_and_entry_point():
    res = runner.invoke(app, ["info"])
    assert res.exit_code == 0 and "attention backend" in res.output
    proc = subprocess.run([sys.executable, "-m", "gen", "bench", "kernels", "--list"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "wan2.1-1.3b-480p" in proc.stdout


def test_bench_kernels_method_presets(tmp_path):
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["bench", "kernels", "--quick", "--method", "radial,gna", "--density", "1",
                              "--backend", "torch", "--reps", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["plan"]: r for r in json.loads(out.read_text())["rows"] if r["impl"] == "torch"}
    assert set(rows) == {"dense", "radial", "gna"}
    assert rows["radial"]["density"] == pytest.approx(0.865) and rows["gna"]["density"] == pytest.approx(0.15)
    assert all(r["rel_err"] < 1e-5 for r in rows.values())
    res = runner.invoke(app, ["bench", "kernels", "--quick", "--method", "sparse-vdit"])
    assert res.exit_code == 2 and "plan" in res.output
