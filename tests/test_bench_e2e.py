"""`gen bench e2e` on the CPU with tiny models: the harness runs and its results are
well-formed (no test asserts a speed)."""

import json
import math

import pytest
from typer.testing import CliRunner

from gen.cli import app

runner = CliRunner()

ROW_KEYS = {"method", "config", "density", "run_density", "total_s", "denoise_s", "step_ms", "attention_s",
            "attention_share", "attention_calls", "sparse_calls", "dense_calls", "peak_mem_mb",
            "peak_mem_delta_mb", "speedup", "attn_speedup", "steps_ms", "note"}


def _check_ran(row, steps):
    for key in ("total_s", "denoise_s", "step_ms", "attention_s", "attention_share", "peak_mem_mb", "speedup",
                "density", "run_density"):
        assert row[key] is not None and math.isfinite(row[key]), (row["method"], key)
    assert len(row["steps_ms"]) == steps and all(t > 0 for t in row["steps_ms"])
    assert 0 < row["attention_share"] <= 1
    assert row["attention_calls"] == row["sparse_calls"] + row["dense_calls"] > 0


def test_e2e_random_weights_quick(tmp_path):
    out_json, out_md, out_png = tmp_path / "e.json", tmp_path / "e.md", tmp_path / "e.png"
    res = runner.invoke(app, ["bench", "e2e", "--quick", "--random-weights", "--attention", "stock,dense,gna,mask",
                              "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png)])
    assert res.exit_code == 0, res.output
    data = json.loads(out_json.read_text())
    meta = data["meta"]
    for key in ("device", "torch", "triton", "commit", "command", "date", "model", "steps", "random_weights"):
        assert key in meta
    assert meta["command"].startswith("gen bench e2e --attention stock,dense,gna,mask --quick")
    assert meta["model"] == "tiny-wan" and meta["random_weights"] and meta["steps"] == 2
    assert meta["passes_per_step"] == 2  # Wan with guidance 5: classifier-free guidance
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == ["stock", "dense", "gna", "mask"]
    for r in data["rows"]:
        assert set(r) == ROW_KEYS
    for name in ("stock", "dense", "gna"):
        _check_ran(rows[name], 2)
    # 2 steps x 2 passes x 2 layers, all through gen's processors
    assert rows["gna"]["attention_calls"] == 8 and rows["gna"]["sparse_calls"] == 8
    assert rows["stock"]["dense_calls"] == 8 and rows["stock"]["sparse_calls"] == 0
    assert rows["stock"]["speedup"] == 1.0 and "baseline" in rows["stock"]["note"]
    assert rows["gna"]["density"] < 0.5 and rows["dense"]["density"] == 1.0
    assert rows["mask"]["total_s"] is None and rows["mask"]["note"].startswith("skipped: mask needs a pattern")
    assert "| method | density |" in out_md.read_text()
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_e2e_pipeline_quick():
    """The full tiny pipeline, prompt to frames."""
    from gen.bench.e2e import run_e2e_bench

    res = run_e2e_bench("tiny-wan", "dense,gna", steps=2, warmup=False)
    assert not res.meta["random_weights"]
    rows = {r.method: r for r in res.rows}
    for r in rows.values():
        _check_ran(r.__dict__, 2)
        assert r.total_s >= r.denoise_s  # text encoding and the VAE are in the total
    assert rows["dense"].speedup == 1.0 and "baseline" in rows["dense"].note
    assert 0 < rows["gna"].density < 1


@pytest.mark.parametrize("model", ["tiny-hunyuan", "tiny-flux"])
def test_e2e_random_weights_other_families(model):
    from gen.bench.e2e import run_e2e_bench

    res = run_e2e_bench(model, "stock,dense", random_weights=True, steps=1, warmup=False)
    assert res.meta["passes_per_step"] == 1  # guidance-distilled: one pass per step
    for r in res.rows:
        _check_ran(r.__dict__, 1)


def test_e2e_configs_shipped_and_build():
    """Every shipped config builds the real class; the 1.3B one has the documented shape."""
    from gen.pipelines import get_spec
    from gen.pipelines.architecture import transformer_config

    cfg = transformer_config(get_spec("wan2.1-t2v-1.3b"))
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["ffn_dim"]) == (30, 12, 128, 8960)
    assert transformer_config(get_spec("wan2.1-t2v-14b"))["num_attention_heads"] == 40
    assert transformer_config(get_spec("hunyuanvideo"))["num_single_layers"] == 40
    assert transformer_config(get_spec("flux.1-dev"))["guidance_embeds"] is True
    with pytest.raises(ValueError, match="no transformer config shipped"):
        transformer_config(get_spec("wan2.1-i2v-14b-480p"))


def test_e2e_rejects_bad_input():
    res = runner.invoke(app, ["bench", "e2e", "--quick", "--attention", "radiall"])
    assert res.exit_code == 2 and "unknown attention method" in res.output
    res = runner.invoke(app, ["bench", "e2e", "--quick", "--dtype", "fp8"])
    assert res.exit_code == 2 and "dtype must be one of" in res.output


def test_e2e_says_when_a_method_never_ran_sparse(monkeypatch):
    """A method whose dense steps cover the whole timed run is dense attention under its
    name: its row says so instead of passing for the method (radial's preset keeps 12 of
    Wan's steps dense; a 4-step run on an H200 timed it as the stock path)."""
    import gen.bench.e2e as e2e
    from gen.bench.common import MethodChoice

    monkeypatch.setattr(e2e, "resolve_methods", lambda text, spec, plan=None: [
        MethodChoice("radial", "radial", {"dense_steps": 5}, ""),
        MethodChoice("radial-sparse", "radial", {"dense_steps": 0}, "")])
    res = e2e.run_e2e_bench("tiny-wan", "radial", steps=2, warmup=False, random_weights=True)
    rows = {r.method: r for r in res.rows}
    assert rows["radial"].sparse_calls == 0 and rows["radial"].run_density == 1.0
    assert rows["radial"].note.startswith("never ran sparse")
    assert rows["radial-sparse"].sparse_calls > 0 and "never ran sparse" not in rows["radial-sparse"].note
