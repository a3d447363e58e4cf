"""The prepared GPU check (`gen.check.gpu`) on the CPU: dry run, refusal, quick run, failures.

The quick run executes every step at tiny sizes in subprocesses (about 40 s on 2 cores):
the commands, the results files and their reading back are the same code a GPU run uses.
"""

import json
import math
import os
import sys

import pytest
import torch

from gen.bench.long import run_long_bench
from gen.check import gpu
from gen.check.gpu import STEPS, NoGPUError, Step, StepResult, plan_steps, run_gpu_check


def _steps_json(out_dir):
    return {s["name"]: s for s in json.loads((out_dir / "gpu_check.json").read_text())["steps"]}


def test_dry_run_lists_every_step(tmp_path):
    report = run_gpu_check(tmp_path, dry_run=True)
    assert report == tmp_path / "gpu_check.md"
    text = report.read_text()
    steps = _steps_json(tmp_path)
    assert list(steps) == [s.name for s in STEPS]
    plan = {p["name"]: p for p in plan_steps(tmp_path)}
    for s in STEPS:
        assert f"### {STEPS.index(s) + 1}. {s.name}" in text
        assert plan[s.name]["command"] in text  # the exact command, shown before anything runs
        assert steps[s.name]["status"] == "would run (dry run)"
        assert steps[s.name]["wall_s"] is None and steps[s.name]["data"] is None
    assert text.count("would run (dry run)") >= len(STEPS)
    assert gpu.BUDGET_S == 540.0 and sum(p["timeout_s"] for p in plan.values()) <= 540.0 + 1e-6
    for p in plan.values():  # a step may run 1.5x its measured estimate, never more
        assert p["timeout_s"] <= gpu.STRETCH * p["estimate_s"] + 1e-6
    # what each step runs
    assert "-m pytest -q -m gpu" in plan["tests"]["command"] and "tests/test_kernel_gpu.py" in plan["tests"]["command"]
    assert plan["tests"]["command"].startswith("TRITON_INTERPRET=0 ")
    assert "--shape wan2.1-1.3b-480p" in plan["bench-wan"]["command"]
    assert "--shape hunyuan-720p-129f" in plan["bench-hunyuan"]["command"]
    assert "--density 1,0.5,0.25,0.1" in plan["bench-wan"]["command"]
    assert "--density 1,0.25,0.1" in plan["bench-hunyuan"]["command"]
    for name in ("bench-wan", "bench-hunyuan", "bench-rectified"):
        assert "--baselines none" in plan[name]["command"] and "--json" in plan[name]["command"]
    assert "--baselines flex,int8" in plan["bench-baselines"]["command"]
    assert '-k "not fp16"' in plan["tests"]["command"] or "-k 'not fp16'" in plan["tests"]["command"]
    assert "-m gen.bench.cache_attention" in plan["cache-attention"]["command"]
    for sched in ("sink", "rolling"):
        cmd = plan[f"long-{sched}"]["command"]
        assert f"--schedule {sched}" in cmd and "--model wan2.1-t2v-1.3b" in cmd and "--width 832" in cmd
    # nothing ran: no logs, no results files
    assert not (tmp_path / "logs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert "not measured: dry run" in text and "| met |" not in text


def test_refuses_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    with pytest.raises(NoGPUError, match="dry_run=True") as err:
        run_gpu_check(out)
    assert isinstance(err.value, RuntimeError)
    assert "--dry-run" in str(err.value) and "no CUDA device" in str(err.value)
    assert not out.exists()
    with pytest.raises(ValueError, match="budget_s"):
        run_gpu_check(out, dry_run=True, budget_s=0)


def test_long_bench_tiny_on_cpu():
    res = run_long_bench("tiny-wan", "sink", height=64, width=64, chunks=1, warmup_chunks=1, device="cpu")
    (row,) = res.rows
    assert row.chunks == 1 and row.latent_frames == 3 and row.video_frames == 12  # 4 per latent frame
    assert row.fps > 0 and row.fps_denoise >= row.fps and row.peak_mem_mb > 0
    assert row.decode_s > 0 and len(row.denoise_ms) == 1
    meta = json.loads(res.to_json())["meta"]
    assert meta["model"] == "tiny-wan" and meta["random_weights"] is True
    assert "| sink | 1 (1) |" in res.to_markdown()
    with pytest.raises(ValueError, match="Wan text-to-video"):
        run_long_bench("tiny-flux", "sink", device="cpu")


def test_long_bench_bf16_denoise_only():
    """A bf16 model whose first parameter diffusers keeps in float32 (scale_shift_table), as
    the GPU run builds it; without decode there is no decoded-FPS figure."""
    res = run_long_bench("tiny-wan", "rolling", height=64, width=64, chunks=1, warmup_chunks=1, device="cpu",
                         dtype="bf16", decode=False)
    (row,) = res.rows
    assert row.fps_denoise > 0 and row.fps is None and row.decode_s is None
    assert res.meta["dtype"] == "bf16" and res.meta["vae_dtype"] is None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-quick")
    return out, run_gpu_check(out, quick=True, budget_s=300)


def test_quick_run_end_to_end(quick_run):
    out, report = quick_run
    text = report.read_text()
    steps = _steps_json(out)
    for s in STEPS:
        assert steps[s.name]["status"] == "ok", (s.name, steps[s.name]["reason"], steps[s.name]["output_tail"])
        assert (out / "logs" / f"{s.name}.log").is_file()
    assert "mode: quick (CPU, tiny sizes)" in text
    # the long-video FPS in the report is the one its results file holds
    for sched in ("sink", "rolling"):
        data = json.loads((out / f"long_{sched}.json").read_text())
        fps = data["rows"][0]["fps"]
        assert math.isfinite(fps) and fps > 0
        assert f"{fps:.1f}" in text
        assert steps[f"long-{sched}"]["figures"]["fps"] == fps
    # kernels: one row per asked density, read back from `gen bench kernels --json`
    dens = steps["bench-wan"]["figures"]["densities"]
    assert sorted(float(d) for d in dens) == [0.1, 0.25, 0.5, 1.0]
    assert all(d["gen_ms"] > 0 and d["best_sdpa_ms"] > 0 for d in dens.values())
    assert steps["cache-attention"]["figures"]["cases"]["sink-quick"]["err"] < 1e-5  # fp32, interpreter
    assert steps["tests"]["figures"].get("skipped", 0) > 0  # gpu tests skip on the CPU
    # speed goals are never judged from a CPU run
    goals = json.loads((out / "gpu_check.json").read_text())["goals"]
    for g in goals:
        if g["source"] == "issue goal":
            assert g["status"].startswith("not assessed"), g


def _py(code):
    return ("{python}", "-c", code)


def test_failing_and_hanging_steps_are_recorded(tmp_path, monkeypatch):
    pidfile = tmp_path / "hang.pid"
    steps = [
        Step("boom", "exits 1", _py("import sys; print('boom here'); sys.exit(1)"),
             _py("import sys; print('boom here'); sys.exit(1)"), 3, 3),
        Step("hang", "sleeps past its timeout",
             _py(f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); print('sleeping', flush=True); "
                 "time.sleep(120)"),
             _py(f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); print('sleeping', flush=True); "
                 "time.sleep(120)"), 2, 2),
        Step("no-file", "exits 0 without its results file", _py("print('done')"), _py("print('done')"), 3, 3,
             output="missing.json"),
        Step("after", "runs after the others", _py("print('still ran')"), _py("print('still ran')"), 3, 3),
    ]
    monkeypatch.setattr(gpu, "STEPS", steps)
    report = run_gpu_check(tmp_path, quick=True, budget_s=12)
    res = _steps_json(tmp_path)
    assert res["boom"]["status"] == "failed" and res["boom"]["reason"] == "exit code 1"
    assert "boom here" in res["boom"]["output_tail"]
    assert res["hang"]["status"] == "timed out" and res["hang"]["reason"].startswith("killed after")
    assert "sleeping" in res["hang"]["output_tail"]
    assert res["hang"]["wall_s"] < 10
    with pytest.raises(ProcessLookupError):  # the hung process is gone
        os.kill(int(pidfile.read_text()), 0)
    assert res["no-file"]["status"] == "failed" and "missing.json" in res["no-file"]["reason"]
    assert res["after"]["status"] == "ok" and "still ran" in res["after"]["output_tail"]
    text = report.read_text()
    assert "**failed** (exit code 1" in text and "**timed out** (killed after" in text and "**ok**" in text
    # goals of steps that did not run are not measured, never given a figure
    goals = json.loads((tmp_path / "gpu_check.json").read_text())["goals"]
    assert goals and all(g["status"].startswith("not measured") and g["measured"] == "–" for g in goals)


def test_a_step_killed_after_writing_its_results_keeps_them(tmp_path, monkeypatch):
    # on the H200 the sink schedule's bench wrote its results and then did not exit in time
    code = ("import json, sys, time; json.dump({'rows': [1, 2]}, open(sys.argv[1], 'w')); "
            "print('wrote', flush=True); time.sleep(120)")
    argv = ("{python}", "-c", code, "{out}/late.json")
    monkeypatch.setattr(gpu, "STEPS", [Step("late", "writes, then hangs", argv, argv, 2, 2, output="late.json")])
    run_gpu_check(tmp_path, quick=True, budget_s=20)
    res = _steps_json(tmp_path)["late"]
    assert res["status"] == "timed out" and res["reason"].endswith("after writing its results")
    assert res["data"] == {"rows": [1, 2]} and res["wall_s"] < 10


def test_budget_spent_skips_the_rest(tmp_path, monkeypatch):
    steps = [Step("slow", "uses its whole share", _py("import time; time.sleep(30)"), _py("import time; time.sleep(30)"), 1, 1),
             Step("next", "no time left", _py("print(1)"), _py("print(1)"), 0.001, 0.001)]
    monkeypatch.setattr(gpu, "STEPS", steps)
    run_gpu_check(tmp_path, quick=True, budget_s=2)
    res = _steps_json(tmp_path)
    assert res["slow"]["status"] == "timed out"
    assert res["next"]["status"] == "skipped" and "budget" in res["next"]["reason"]


def _kernel_step(device, rows):
    res = StepResult("bench-wan", "", "", "ok")
    res.data = {"meta": {"device": device, "shape": {"name": "wan2.1-1.3b-480p"}, "dtype": "bf16", "skipped": []},
                "rows": rows}
    gpu._read_kernels(res)
    return res


def _row(impl, plan, density, ms):
    return {"impl": impl, "plan": plan, "density": density, "time_ms": ms}


def test_goals_from_gpu_figures():
    """Goal logic on figures as a GPU run writes them (no GPU needed to check the arithmetic)."""
    rows = [_row("sdpa-flash", "dense", 1.0, 10.0), _row("sdpa-cudnn", "dense", 1.0, 9.0),
            _row("sdpa-efficient", "dense", 1.0, float("nan")),
            _row("triton", "dense", 1.0, 9.5), _row("flex", "dense", 1.0, 12.0),
            _row("triton", "random", 0.508, 5.0), _row("flex", "random", 0.508, 6.0),
            _row("triton", "random", 0.251, 2.5), _row("flex", "random", 0.251, 3.0),
            _row("triton", "random", 0.126, 1.5)]
    res = _kernel_step("NVIDIA H100 80GB HBM3", rows)
    d = res.figures["densities"]
    assert d[1.0]["best_sdpa"] == "sdpa-cudnn" and d[1.0]["speedup"] == pytest.approx(9 / 9.5)
    assert d[0.25]["flex_speedup"] == pytest.approx(3.0) and d[0.1]["flex_ms"] is None
    assert (d[1.0]["met"], d[0.25]["met"], d[0.1]["met"], d[0.5]["met"]) == (True, True, False, None)
    long = StepResult("long-sink", "", "", "ok", figures={"fps": 25.0, "fps_denoise": 30.0, "peak_mem_mb": 9000.0})
    goals = gpu._goals({"bench-wan": res, "long-sink": long}, quick=False, dry_run=False, device="NVIDIA H100 80GB HBM3")
    by = {g.name: g for g in goals}
    assert by["wan2.1-1.3b-480p: dense plan ≥ 0.9x best SDPA"].status == "met"
    assert by["wan2.1-1.3b-480p: density 0.25 ≥ 3.4x faster than dense SDPA"].status == "met"
    assert by["wan2.1-1.3b-480p: density 0.1 ≥ 8x faster than dense SDPA"].status == "not met"
    assert by["hunyuan-720p-129f: dense plan ≥ 0.9x best SDPA"].status.startswith("not measured")
    fps = [g for g in goals if g.name.startswith("gen long sink")][0]
    assert fps.status == "met" and "25.0 FPS" in fps.measured
    rolling = [g for g in goals if g.name.startswith("gen long rolling")][0]
    assert rolling.status.startswith("not measured") and rolling.measured == "–"
    h200 = gpu._goals({"long-sink": long}, quick=False, dry_run=False, device="NVIDIA H200")
    assert [g for g in h200 if g.name.startswith("gen long sink")][0].status.startswith("met (goal stated for an H100")
    # the same figures from a CPU run are never judged
    cpu = _kernel_step("cpu (2 cores)", rows)
    assert all(v["met"] is None for v in cpu.figures["densities"].values())


def test_full_size_commands_parse(tmp_path, capsys):
    """The GPU run's command lines are accepted by today's CLIs (stopped before any work)."""
    from typer.testing import CliRunner

    from gen.bench import cache_attention, long
    from gen.cli import app

    for s in STEPS:
        argv = s.command(out_dir=tmp_path)
        if argv[1:3] == ["-m", "gen"]:
            res = CliRunner().invoke(app, [*argv[3:], "--list"])  # parses every option, then lists shapes
            assert res.exit_code == 0, (s.name, res.output)
        elif argv[1:3] == ["-m", "gen.bench.long"]:
            assert long.main([*argv[3:], "--chunks", "0"]) == 2
            assert "chunks must be >= 1" in capsys.readouterr().err
        elif argv[1:3] == ["-m", "gen.bench.cache_attention"]:
            assert cache_attention.main([*argv[3:], "--device", "cpu", "--dtype", "fp8"]) == 2
            assert "dtype must be one of" in capsys.readouterr().err
        else:
            assert argv[1:3] == ["-m", "pytest"], s.name


def test_module_entry_point_dry_run(tmp_path, capsys):
    assert gpu.main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(f"{s.name} (~" in out for s in STEPS) and sys.executable in out
    assert (tmp_path / "gpu_check.md").is_file()
