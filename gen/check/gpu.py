"""A prepared GPU check: minutes on a lent H100/H200 spent measuring, not setting up.

Usage::

    gen check gpu                              # CUDA machine: every step, report in the output folder
    gen check gpu --dry-run                    # any machine: the steps and exact commands, nothing run
    gen check gpu --quick                      # CPU: the same steps at tiny sizes (checks the plumbing)
    gen check gpu --out DIR --budget-s 420     # where to write, total time allowed

    python -m gen.check.gpu [--dry-run] [--quick] [--out DIR] [--budget-s S]   # the same, without the CLI

    from gen.check.gpu import STEPS, run_gpu_check
    report = run_gpu_check(Path("gpu-check"))  # -> gpu-check/gpu_check.md (and gpu_check.json)

Steps, in order, each in its own subprocess with its own timeout (a crash or a hang is
recorded and the next step still runs; stdout/stderr go to ``logs/<step>.log`` in the
output folder and their tails into the report). The order is what settles the most
first, since a bare machine autotunes every kernel from scratch and the whole check
rarely fits one call (the first H200 run, 2026-12-04, is in BENCHMARKS.md):

1. ``bench-wan``: ``gen bench kernels`` at Wan 2.1 1.3B 480p, plans dense, 0.5, 0.25
   and 0.1, against every torch SDPA backend (``--json``, read back). Goals: dense plan
   >= 0.9x the best dense SDPA; density 0.25 >= 3.4x faster than it; density 0.1 >= 8x.
2. ``long-sink``: ``gen long``'s sink schedule (LongLive) at 832x480 on a random-weight
   Wan 2.1 1.3B transformer and VAE (``python -m gen.bench.long``): steady-state frames
   per second, denoising only and with VAE decode, and peak GPU memory. Goal: >= 24 FPS
   with decode on an H100 (LongLive reports 20.7).
3. ``cache-attention``: the long-video runner's cache-attention kernel at Wan 1.3B 480p
   (``python -m gen.bench.cache_attention``): Triton (RoPE at read) vs SDPA on the same
   gathered keys, error against the fp32 PyTorch reference.
4. ``tests``: the GPU-marked tests (``pytest.mark.gpu``) in bf16, compiled kernels at
   real shapes against the fp64 reference: ``TRITON_INTERPRET=0 python -m pytest -q -m
   gpu -k "not fp16" tests/<files>`` (``--timeout`` a test when pytest-timeout is
   installed). The tests folder is looked up beside the ``gen`` package (an editable
   install or a checkout); without one the step is skipped and says so.
5. ``long-rolling``: the same as 2 with the rolling schedule (Rolling Forcing).
6. ``bench-hunyuan``: as 1 at HunyuanVideo 720p (129 frames), plans dense, 0.25, 0.1.
7. ``bench-rectified``: rectified at Wan 2.1 1.3B 480p: the plan of the method's
   estimation on the bench's inputs, its attention time, and the estimation time apart
   (``plan_ms``; goal: <= 5 % of the attention it plans).
8. ``bench-baselines``: compiled ``flex_attention`` on the same block masks and PARO's
   INT8 kernel beside gen's at Wan 480p (flex compiles first: tens of seconds).

Then one markdown report: device, versions, date, commit, each step's command, status
(ok / failed / timed out / skipped, with the reason), its table, and the goals met or
not. A figure comes only from a step's own output; a step that did not run says so.

Timeouts: each step may run 1.5x its estimate (:data:`STRETCH`; the estimates are the
H200's measured times) within what is left of the budget (:data:`BUDGET_S`, 540 s: one
call of the lent machine's 10 minutes, with time to set up); time a step does not use
passes to the steps after it, and a step that finds too little left is skipped and says
so. A step killed at its timeout after writing its results file keeps its figures.
Without CUDA, ``run_gpu_check`` refuses
(:class:`NoGPUError`) unless asked for a dry run or the quick CPU run. ``quick``
forces the CPU (``CUDA_VISIBLE_DEVICES=""``, ``TRITON_INTERPRET=1``): tiny shapes,
``gen bench kernels --quick`` with the PyTorch backend, the tiny-wan model at 64x64 for
the long-video steps; its figures show that the plumbing works, nothing about speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["NoGPUError", "STEPS", "Step", "StepResult", "plan_steps", "run_gpu_check", "main"]

logger = logging.getLogger("gen.check")

#: densities timed by ``gen bench kernels`` and the speed goals (x faster than the best
#: dense SDPA) of those that have one
DENSITIES = (1.0, 0.5, 0.25, 0.1)
KERNEL_GOALS = {1.0: 0.9, 0.25: 3.4, 0.1: 8.0}
#: frames per second ``gen long`` should reach at 832x480 on an H100 (LongLive: 20.7)
FPS_GOAL = 24.0
#: cache attention's error may be at most this many times plain SDPA's at the same precision
CACHE_ERR_FACTOR = 3.0

_DENS = ",".join(f"{d:g}" for d in DENSITIES)


class NoGPUError(RuntimeError):
    """No CUDA device here: pass ``dry_run=True`` (``--dry-run``) or ``quick=True`` (``--quick``)."""


@dataclass(frozen=True)
class Step:
    """One step of the check.

    ``argv`` / ``quick_argv`` are command templates: ``{python}`` is the running
    interpreter, ``{out}`` the output folder, and an argument ``{gpu_tests}`` expands to
    the GPU-marked test files. ``output``: the results file (under the output folder) the
    step writes and the report reads back; None when it writes none (the tests).
    """

    name: str
    title: str
    argv: tuple[str, ...]
    quick_argv: tuple[str, ...]
    estimate_s: float
    quick_estimate_s: float
    output: str | None = None

    def command(self, *, out_dir: Path, quick: bool = False, gpu_tests: list[str] | None = None) -> list[str]:
        """The exact argument list this step runs."""
        args: list[str] = []
        for a in self.quick_argv if quick else self.argv:
            if a == "{gpu_tests}":
                args.extend(gpu_tests or [])
            elif a == "{pytest_timeout}":
                if importlib.util.find_spec("pytest_timeout") is not None:
                    args.extend(["--timeout", str(TEST_TIMEOUT_S)])
            else:
                args.append(a.replace("{python}", sys.executable).replace("{out}", str(out_dir)))
        return args

    def estimate(self, quick: bool = False) -> float:
        return self.quick_estimate_s if quick else self.estimate_s


def _bench_kernels(shape: str, *, densities: str = _DENS, baselines: str = "none",
                   name: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    out = f"{{out}}/bench_kernels_{name or shape}.json"
    common = ("--density", densities, "--no-check", "--baselines", baselines, "--json", out)
    full = ("{python}", "-m", "gen", "bench", "kernels", "--shape", shape, *common)
    quick = ("{python}", "-m", "gen", "bench", "kernels", "--quick", "--device", "cpu", "--backend", "torch",
             "--reps", "1", *common)
    return full, quick


def _long(schedule: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    out = f"{{out}}/long_{schedule}.json"
    full = ("{python}", "-m", "gen.bench.long", "--model", "wan2.1-t2v-1.3b", "--schedule", schedule,
            "--height", "480", "--width", "832", "--chunks", "6", "--json", out)
    quick = ("{python}", "-m", "gen.bench.long", "--model", "tiny-wan", "--schedule", schedule,
             "--height", "64", "--width", "64", "--chunks", "1", "--warmup-chunks", "1", "--device", "cpu",
             "--json", out)
    return full, quick


# bf16 only: fp16 runs the same code with another IO type (the sweep of both is
# `pytest -m gpu` by hand); "{pytest_timeout}" becomes --timeout when pytest-timeout is there
_TESTS = ("{python}", "-m", "pytest", "-q", "-m", "gpu", "-k", "not fp16", "-p", "no:cacheprovider", "-rf",
          "--durations=10", "{pytest_timeout}", "{gpu_tests}")
_WAN, _HUN = "wan2.1-1.3b-480p", "hunyuan-720p-129f"
#: seconds one GPU test may take (each autotunes its kernel from scratch on a bare machine
#: and computes an fp64 reference at full length: about 6 s each on an H200, 2026-12-04)
TEST_TIMEOUT_S = 120

# Estimates are what each step took on an H200 with torch 2.11 and Triton 3.6 on a bare
# machine (every kernel autotuned from scratch), 2026-12-04, where it finished, plus margin;
# a step may run 1.5x its estimate. Order: what settles the most first.
STEPS: list[Step] = [
    Step("bench-wan", f"gen bench kernels at {_WAN} vs every SDPA backend",
         *_bench_kernels(_WAN), 60, 6, output=f"bench_kernels_{_WAN}.json"),  # 56 s
    Step("long-sink", "gen long FPS and peak memory, sink schedule (LongLive), random-weight Wan 1.3B 832x480",
         *_long("sink"), 70, 12, output="long_sink.json"),  # wrote its results, then did not exit in 65 s
    Step("cache-attention", "cache attention (Triton, RoPE at read) vs SDPA at Wan 1.3B 480p",
         ("{python}", "-m", "gen.bench.cache_attention", "--json", "{out}/cache_attention.json"),
         ("{python}", "-m", "gen.bench.cache_attention", "--quick", "--device", "cpu", "--json",
          "{out}/cache_attention.json"),
         60, 8, output="cache_attention.json"),  # not finished in 40 s
    Step("tests", "GPU-marked correctness tests, bf16 (compiled kernels, real shapes, fp64 reference)",
         _TESTS, _TESTS, 200, 6),  # about 6 s a test; 21 of 58 (both dtypes) passed in two calls
    Step("long-rolling", "gen long FPS and peak memory, rolling schedule (Rolling Forcing), random-weight Wan 1.3B 832x480",
         *_long("rolling"), 50, 12, output="long_rolling.json"),  # 44 s
    Step("bench-hunyuan", f"gen bench kernels at {_HUN} vs every SDPA backend",
         *_bench_kernels(_HUN, densities="1,0.25,0.1"), 120, 6,
         output=f"bench_kernels_{_HUN}.json"),  # SDPA rows 17 s, first autotune > 32 s
    Step("bench-rectified", "rectified at Wan 2.1 1.3B 480p: estimation time apart from attention",
         ("{python}", "-m", "gen", "bench", "kernels", "--shape", _WAN, "--method", "rectified", "--model",
          "wan2.1-t2v-1.3b", "--density", "1", "--no-check", "--baselines", "none", "--json",
          "{out}/bench_kernels_rectified.json"),
         ("{python}", "-m", "gen", "bench", "kernels", "--quick", "--device", "cpu", "--backend", "torch",
          "--method", "rectified", "--density", "1", "--reps", "1", "--no-check", "--baselines", "none", "--json",
          "{out}/bench_kernels_rectified.json"),
         60, 6, output="bench_kernels_rectified.json"),
    Step("bench-baselines", f"flex_attention and PARO's INT8 kernel beside gen's at {_WAN}",
         *_bench_kernels(_WAN, densities="1,0.25,0.1", baselines="flex,int8", name="baselines"), 120, 6,
         output="bench_kernels_baselines.json"),  # flex compiles first (tens of seconds)
]
"""The steps, in the order they run (see the module docstring)."""


@dataclass
class StepResult:
    """What one step did. ``status``: ``"ok"``, ``"failed"``, ``"timed out"``, ``"skipped"``
    or ``"would run (dry run)"``; ``reason`` says why when not ok."""

    name: str
    title: str
    command: str
    status: str
    reason: str = ""
    estimate_s: float = 0.0
    timeout_s: float | None = None
    wall_s: float | None = None
    returncode: int | None = None
    log: str | None = None
    output_tail: str = ""
    data: dict | None = None  # the step's results file, read back
    table: str = ""  # markdown made from ``data``
    figures: dict = field(default_factory=dict)


@dataclass
class Goal:
    """One line of the report's goal table; ``source``: "issue goal" or "correctness check"."""

    name: str
    target: str
    measured: str
    status: str  # "met", "not met", "not measured: ...", "not assessed: ..."
    source: str = "issue goal"


# -- where things are ------------------------------------------------------------------------


def _repo_root() -> Path:
    """The folder above the ``gen`` package (a checkout, or the source of an editable install)."""
    import gen

    return Path(gen.__file__).resolve().parent.parent


def _find_gpu_tests(root: Path) -> tuple[list[str], str]:
    """``(relative paths of test files that use pytest.mark.gpu, reason when none)``."""
    tests = root / "tests"
    if not (tests / "conftest.py").is_file():
        return [], f"no tests folder (looked for {tests}/conftest.py; an installed wheel has none)"
    found = []
    for path in sorted(tests.rglob("test_*.py")):
        try:
            if "pytest.mark.gpu" in path.read_text(encoding="utf-8", errors="replace"):
                found.append(path.relative_to(root).as_posix())
        except OSError:
            continue
    return found, "" if found else f"no test file in {tests} uses pytest.mark.gpu"


def _git(root: Path, *args: str) -> str:
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _environment(root: Path, *, cuda: bool) -> dict:
    import torch

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda or "none (CPU build of torch)",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    try:
        import gen

        env["gen"] = gen.__version__
    except Exception:  # a report field, never a reason to stop
        env["gen"] = "unknown"
    if cuda:
        env["device"] = torch.cuda.get_device_name(0)
        env["device_count"] = torch.cuda.device_count()
        cap = torch.cuda.get_device_capability(0)
        env["compute_capability"] = f"sm_{cap[0]}{cap[1]}"
        try:
            env["cudnn"] = str(torch.backends.cudnn.version())
        except Exception:
            env["cudnn"] = "unknown"
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)
            env["driver"] = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "unknown"
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown (no nvidia-smi)"
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores), no CUDA device"
    commit = _git(root, "rev-parse", "--short", "HEAD")
    if commit:
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
        env["commit"] = commit + (" (with uncommitted changes)" if dirty else "")
    else:
        env["commit"] = "unknown (not a git checkout)"
    return env


# -- running ---------------------------------------------------------------------------------


def _step_env(quick: bool) -> dict:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", COLUMNS="160", HF_HUB_OFFLINE="1", TERM="dumb")
    env["TRITON_INTERPRET"] = "1" if quick else "0"
    if quick:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the quick run is a CPU run, even on a GPU machine
    return env


def _tail(text: str, limit: int = 4000) -> str:
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    return "[…]" + cut[cut.find("\n"):] if "\n" in cut else "[…]" + cut


def _stop(proc: subprocess.Popen) -> None:
    """End the step's process group (it may have started compile workers): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):  # KILL too: workers may outlive a leader that took TERM
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _run(argv: list[str], *, cwd: Path, env: dict, timeout: float, log: Path) -> tuple[str, int | None, float, str]:
    """Run ``argv``; ``(status, returncode, wall seconds, output tail)``; status ok/failed/timed out."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8", errors="replace") as fh:
        fh.write(f"$ {shlex.join(argv)}\n")
        fh.flush()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:
            return "failed", None, time.perf_counter() - t0, f"could not start: {err}"
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc, status = proc.returncode, "timed out"
        except BaseException:  # Ctrl-C: do not leave the step running
            _stop(proc)
            raise
    wall = time.perf_counter() - t0
    text = log.read_text(encoding="utf-8", errors="replace")
    return status, rc, wall, _tail(text)


#: a step may run this many times its estimate (first autotunes vary), within the budget left
STRETCH = 1.5
#: default seconds for all steps: one 10-minute call of a lent machine, with time to set up
BUDGET_S = 540.0


def _timeout(step: Step, remaining: float, quick: bool) -> float:
    return max(0.0, min(remaining, STRETCH * step.estimate(quick)))


def _timeouts(steps: list[Step], budget_s: float, quick: bool) -> list[float]:
    """Planned timeouts when every step uses its whole allowance (the plan a dry run shows;
    a step that ends sooner leaves its time to the later ones)."""
    out, remaining = [], budget_s
    for s in steps:
        t = _timeout(s, remaining, quick)
        out.append(t)
        remaining -= t
    return out


def plan_steps(out_dir: Path | str = "gpu-check", *, quick: bool = False, budget_s: float = BUDGET_S) -> list[dict]:
    """Each step as ``{"name", "title", "command", "estimate_s", "timeout_s"}``: what a run
    would do (``timeout_s`` as planned before any step ran; unused time moves on)."""
    out_dir = Path(out_dir)
    gpu_tests, _ = _find_gpu_tests(_repo_root())
    return [
        {"name": s.name, "title": s.title, "estimate_s": s.estimate(quick), "timeout_s": t,
         "command": _display(s, out_dir, quick, gpu_tests)}
        for s, t in zip(STEPS, _timeouts(STEPS, budget_s, quick))
    ]


def _display(step: Step, out_dir: Path, quick: bool, gpu_tests: list[str]) -> str:
    argv = step.command(out_dir=out_dir, quick=quick, gpu_tests=gpu_tests)
    prefix = f"TRITON_INTERPRET={'1' if quick else '0'} " + ('CUDA_VISIBLE_DEVICES="" ' if quick else "")
    return prefix + shlex.join(argv)


# -- reading results back --------------------------------------------------------------------


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _f(x, spec: str, none: str = "–") -> str:
    return format(x, spec) if _finite(x) else none


def _read_tests(res: StepResult) -> None:
    counts = {}
    lines = [ln for ln in res.output_tail.splitlines() if re.search(r"\b(passed|failed|skipped|error|errors)\b", ln)
             and " in " in ln]
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", lines[-1]):
            counts["errors" if what.startswith("error") else what] = int(n)
    res.figures = counts
    if counts:
        res.table = "| " + " | ".join(counts) + " |\n|" + "---|" * len(counts) + "\n| " + " | ".join(
            str(v) for v in counts.values()) + " |"


def _kernel_figures(data: dict) -> tuple[dict, str]:
    rows = data.get("rows", [])
    on_gpu = not str(data.get("meta", {}).get("device", "cpu")).startswith("cpu")
    sdpa = [r for r in rows if r["impl"].startswith("sdpa") and _finite(r.get("time_ms"))]
    best = min(sdpa, key=lambda r: r["time_ms"]) if sdpa else None
    ours = "triton" if any(r["impl"] == "triton" for r in rows) else "torch"

    def pick(impl: str, nominal: float):
        cands = [r for r in rows if r["impl"] == impl and r["plan"] == ("dense" if nominal >= 1.0 else "random")]
        if not cands:
            return None
        r = min(cands, key=lambda r: abs(r["density"] - nominal))
        return r if abs(r["density"] - nominal) <= 0.05 + 0.2 * nominal else None

    per = {}
    lines = [
        f"Best dense SDPA: {best['impl']} {best['time_ms']:.3f} ms" if best else "Best dense SDPA: none ran",
        "",
        f"| density asked | plan density | gen ({ours}) ms | best SDPA ms | flex ms | gen speedup vs best SDPA "
        "| flex speedup | goal | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for nominal in DENSITIES:
        g, fl = pick(ours, nominal), pick("flex", nominal)
        t_best = best["time_ms"] if best else None
        sp = t_best / g["time_ms"] if g and t_best and _finite(g["time_ms"]) and g["time_ms"] > 0 else None
        fsp = t_best / fl["time_ms"] if fl and t_best and _finite(fl["time_ms"]) and fl["time_ms"] > 0 else None
        goal = KERNEL_GOALS.get(nominal)
        met = None if goal is None or sp is None or not on_gpu else sp >= goal
        per[nominal] = {"gen_ms": g["time_ms"] if g else None, "plan_density": g["density"] if g else None,
                        "best_sdpa_ms": t_best, "best_sdpa": best["impl"] if best else None,
                        "flex_ms": fl["time_ms"] if fl else None, "speedup": sp, "flex_speedup": fsp,
                        "goal": goal, "met": met}
        lines.append(
            f"| {nominal:g} | {_f(g['density'] if g else None, '.3f')} | {_f(g['time_ms'] if g else None, '.3f')} | "
            f"{_f(t_best, '.3f')} | {_f(fl['time_ms'] if fl else None, '.3f')} | {_f(sp, '.2f')}"
            f"{'x' if sp is not None else ''} | {_f(fsp, '.2f')}{'x' if fsp is not None else ''} | "
            f"{'≥ ' + format(goal, 'g') + 'x' if goal else '–'} | "
            f"{('not assessed (CPU)' if goal and not on_gpu else '–') if met is None else ('yes' if met else 'no')} |"
        )
    skipped = data.get("meta", {}).get("skipped") or []
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped)]
    return per, "\n".join(lines)


def _read_json(res: StepResult, path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        res.data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        res.reason = f"results file {path.name} unreadable: {err}"
        return False
    return True


def _read_kernels(res: StepResult) -> None:
    per, table = _kernel_figures(res.data)
    m = res.data.get("meta", {})
    shape = m.get("shape", {})
    head = (f"Shape {shape.get('name')} (B={shape.get('batch')}, H={shape.get('heads')}, S={shape.get('seq_len')}, "
            f"D={shape.get('head_dim')}), {m.get('dtype')}, on {m.get('device')}")
    res.figures = {"shape": shape.get("name"), "device": m.get("device"), "densities": per}
    res.table = head + "\n\n" + table


def _read_cache(res: StepResult) -> None:
    rows = res.data.get("rows", [])
    lines = ["| case | impl | queries | keys | time (ms) | TFLOP/s | speedup vs best SDPA | rel. err vs fp32 ref | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    figs: dict = {}
    for r in rows:
        lines.append(f"| {r['case']} | {r['impl']} | {r['q_len']} | {r['kv_len']} | {_f(r.get('time_ms'), '.3f')} | "
                     f"{_f(r.get('tflops'), '.1f')} | {_f(r.get('speedup'), '.2f')} | {_f(r.get('rel_err'), '.1e')} | "
                     f"{r.get('note', '')} |")
        c = figs.setdefault(r["case"], {"sdpa_err": None})
        if r["impl"] == "triton":
            c.update(triton_ms=r.get("time_ms"), speedup=r.get("speedup"), err=r.get("rel_err"))
        elif r["impl"].startswith("sdpa") and _finite(r.get("rel_err")):
            c["sdpa_err"] = r["rel_err"] if c["sdpa_err"] is None else min(c["sdpa_err"], r["rel_err"])
    res.figures = {"device": res.data.get("meta", {}).get("device"), "cases": figs}
    res.table = f"{res.data.get('meta', {}).get('dtype')} on {res.data.get('meta', {}).get('device')}\n\n" + "\n".join(lines)


def _read_long(res: StepResult) -> None:
    m = res.data.get("meta", {})
    r = (res.data.get("rows") or [{}])[0]
    res.figures = {k: r.get(k) for k in ("schedule", "fps", "fps_denoise", "peak_mem_mb", "kv_cache_mb", "chunks",
                                         "warmup_chunks", "video_frames", "denoise_s", "decode_s", "chunk_ms")}
    res.figures.update(device=m.get("device"), model=m.get("model"), size=f"{m.get('width')}x{m.get('height')}")
    res.table = "\n".join([
        f"{m.get('model')} at {m.get('width')}x{m.get('height')} ({m.get('tokens_per_frame')} tokens per latent "
        f"frame), random weights, transformer {m.get('dtype')}, VAE {m.get('vae_dtype')}, on {m.get('device')}. "
        f"FPS counts decoded video frames ({m.get('frames_counted')}) of the chunks after the warm-up; "
        "\"denoise only\" times the transformer forwards of the schedule, \"with decode\" adds the streaming "
        "VAE decode to host uint8 frames (mp4 encoding not timed).",
        "",
        "| schedule | chunks counted (warm-up) | video frames | denoise (s) | decode (s) | FPS denoise only "
        "| FPS with decode | median chunk (ms) | peak memory (GiB) | KV cache (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {r.get('schedule')} | {r.get('chunks')} ({r.get('warmup_chunks')}) | {r.get('video_frames')} | "
        f"{_f(r.get('denoise_s'), '.2f')} | {_f(r.get('decode_s'), '.2f')} | {_f(r.get('fps_denoise'), '.1f')} | "
        f"{_f(r.get('fps'), '.1f')} | {_f(r.get('chunk_ms'), '.0f')} | "
        f"{_f(r['peak_mem_mb'] / 1024 if _finite(r.get('peak_mem_mb')) else None, '.2f')} | "
        f"{_f(r.get('kv_cache_mb'), '.0f')} |",
    ])


def _read_rectified(res: StepResult) -> None:
    rows = [r for r in res.data.get("rows", []) if r.get("plan") == "rectified"]
    sdpa = [r for r in res.data.get("rows", []) if r["impl"].startswith("sdpa") and _finite(r.get("time_ms"))]
    best = min((r["time_ms"] for r in sdpa), default=None)
    if not rows:
        res.table = "no rectified row in the output"
        return
    r = min(rows, key=lambda r: r["time_ms"])
    share = r["plan_ms"] / r["time_ms"] if r.get("plan_ms") and r["time_ms"] else None
    res.figures = {"density": r["density"], "attn_ms": r["time_ms"], "plan_ms": r.get("plan_ms"), "share": share,
                   "speedup": best / r["time_ms"] if best else None}
    res.table = ("| impl | plan density | attention ms | estimation ms | estimation / attention | speedup vs best SDPA |\n"
                 "|---|---|---|---|---|---|\n"
                 f"| {r['impl']} | {r['density']:.3f} | {r['time_ms']:.3f} | {_f(r.get('plan_ms'), '.3f')} | "
                 f"{_f(share and 100 * share, '.1f')} % | {_f(res.figures['speedup'], '.2f')} |")


_READERS = {"bench-wan": _read_kernels, "bench-hunyuan": _read_kernels, "bench-baselines": _read_kernels,
            "cache-attention": _read_cache,
            "long-sink": _read_long, "long-rolling": _read_long, "bench-rectified": _read_rectified}


# -- goals -----------------------------------------------------------------------------------


def _goals(results: dict[str, StepResult], *, quick: bool, dry_run: bool, device: str) -> list[Goal]:
    goals: list[Goal] = []

    def unmeasured(res: StepResult | None) -> str:
        if res is None:
            return "not measured: step not in this run"
        if dry_run:
            return "not measured: dry run"
        return f"not measured: step {res.status}" + (f" ({res.reason})" if res.reason else "")

    cpu_note = "not assessed: CPU quick run (its figures check the plumbing, not speed)"

    t = results.get("tests")
    if t is None or t.status != "ok" and not (t.status == "failed" and t.figures):
        goals.append(Goal("GPU correctness tests pass", "all gpu-marked tests pass", "–", unmeasured(t),
                          "correctness check"))
    else:
        c = t.figures
        measured = ", ".join(f"{v} {k}" for k, v in c.items()) or "no summary line"
        if quick:
            status = cpu_note
        elif c.get("failed") or c.get("errors"):
            status = "not met"
        elif c.get("passed"):
            status = "met"
        else:
            status = "not measured: no test ran (all skipped?)"
        goals.append(Goal("GPU correctness tests pass", "all gpu-marked tests pass", measured, status,
                          "correctness check"))

    for name in ("bench-wan", "bench-hunyuan"):
        res = results.get(name)
        shape = _WAN if name == "bench-wan" else _HUN
        for dens, target in KERNEL_GOALS.items():
            label = (f"{shape}: dense plan ≥ {target:g}x best SDPA" if dens >= 1.0 else
                     f"{shape}: density {dens:g} ≥ {target:g}x faster than dense SDPA")
            if res is None or res.status != "ok" or not res.figures:
                goals.append(Goal(label, f"{target:g}x", "–", unmeasured(res)))
                continue
            d = res.figures["densities"].get(dens, {})
            sp = d.get("speedup")
            measured = "–" if sp is None else f"{sp:.2f}x ({d['gen_ms']:.3f} ms vs {d['best_sdpa']} {d['best_sdpa_ms']:.3f} ms)"
            if sp is not None and res.figures.get("shape") != shape:
                measured += f" at shape {res.figures.get('shape')}"
            if quick:
                status = cpu_note
            elif sp is None:
                status = "not measured: no row for this density in the step's output"
            else:
                status = "met" if sp >= target else "not met"
            goals.append(Goal(label, f"≥ {target:g}x", measured, status))

    res = results.get("bench-rectified")
    label = "rectified estimation ≤ 5 % of its attention time (Wan 1.3B 480p)"
    if res is None or res.status != "ok" or not (res.figures or {}).get("share"):
        goals.append(Goal(label, "≤ 5 %", "–", unmeasured(res)))
    else:
        f = res.figures
        measured = f"{100 * f['share']:.1f} % ({f['plan_ms']:.3f} ms of {f['attn_ms']:.3f} ms at density {f['density']:.3f})"
        goals.append(Goal(label, "≤ 5 %", measured, cpu_note if quick else ("met" if f["share"] <= 0.05 else "not met")))

    res = results.get("cache-attention")
    cases = (res.figures or {}).get("cases", {}) if res is not None and res.status == "ok" else {}
    if not cases:
        goals.append(Goal("cache attention error ≤ 3x plain SDPA's (fp32 reference)", "ratio ≤ 3", "–",
                          unmeasured(res), "correctness check"))
    for case, c in cases.items():
        err, base = c.get("err"), c.get("sdpa_err")
        label = f"cache attention ({case}): error ≤ {CACHE_ERR_FACTOR:g}x plain SDPA's vs the fp32 reference"
        if not _finite(err):
            goals.append(Goal(label, f"ratio ≤ {CACHE_ERR_FACTOR:g}", "–", "not measured: the kernel did not run",
                              "correctness check"))
            continue
        bound = CACHE_ERR_FACTOR * max(base or 0.0, 1e-7)
        measured = f"{err:.1e} (SDPA {_f(base, '.1e')})"
        goals.append(Goal(label, f"≤ {bound:.1e}", measured, "met" if err <= bound else "not met", "correctness check"))

    for name in ("long-sink", "long-rolling"):
        res = results.get(name)
        sched = name.split("-")[1]
        label = f"gen long {sched}: ≥ {FPS_GOAL:g} FPS at 832x480 with VAE decode (H100; LongLive 20.7)"
        if res is None or res.status != "ok" or not res.figures:
            goals.append(Goal(label, f"≥ {FPS_GOAL:g} FPS", "–", unmeasured(res)))
            continue
        f = res.figures
        measured = (f"{_f(f.get('fps'), '.1f')} FPS with decode, {_f(f.get('fps_denoise'), '.1f')} denoise only, "
                    f"peak {_f(f['peak_mem_mb'] / 1024 if _finite(f.get('peak_mem_mb')) else None, '.1f')} GiB")
        if quick:
            status = cpu_note
        elif not _finite(f.get("fps")):
            status = "not measured: no FPS in the step's output"
        else:
            status = "met" if f["fps"] >= FPS_GOAL else "not met"
            if "H100" not in device:
                status += f" (goal stated for an H100; measured on {device})"
        goals.append(Goal(label, f"≥ {FPS_GOAL:g} FPS", measured, status))
    return goals


# -- the report ------------------------------------------------------------------------------


def _fence(text: str) -> str:
    ticks = max([len(m) for m in re.findall(r"`+", text)] + [2]) + 1
    return "`" * ticks + "text\n" + text.rstrip("\n") + "\n" + "`" * ticks


def _markdown(env: dict, mode: str, budget_s: float, wall_s: float, results: list[StepResult], goals: list[Goal],
              out_dir: Path) -> str:
    lines = [
        "# gen GPU check",
        "",
        f"- mode: {mode}",
        f"- device: {env.get('device')}" + (f" ({env['compute_capability']}, driver {env.get('driver')})"
                                            if "compute_capability" in env else ""),
        f"- torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda_runtime')}"
        + (f", cuDNN {env['cudnn']}" if "cudnn" in env else "") + f", Python {env.get('python')}, gen {env.get('gen')}",
        f"- date: {env.get('date')}",
        f"- commit: {env.get('commit')}",
        f"- budget: {budget_s:.0f} s; wall time of the steps: {wall_s:.1f} s",
        f"- output folder: {out_dir} (raw rows in gpu_check.json, full logs in logs/)",
        "",
        "## Goals",
        "",
        "| goal | kind | target | measured | status |",
        "|---|---|---|---|---|",
    ]
    for g in goals:
        lines.append(f"| {g.name} | {g.source} | {g.target} | {g.measured} | {g.status} |")
    met = sum(g.status.startswith("met") for g in goals)
    not_met = sum(g.status.startswith("not met") for g in goals)
    other = len(goals) - met - not_met
    lines += ["", f"{met} met, {not_met} not met, {other} not measured or not assessed.", "", "## Steps", "",
              "| # | step | status | wall (s) | timeout (s) | estimate (s) |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        status = r.status + (f": {r.reason}" if r.reason else "")
        lines.append(f"| {i} | {r.name} | {status} | {_f(r.wall_s, '.1f')} | {_f(r.timeout_s, '.0f')} | "
                     f"{r.estimate_s:.0f} |")
    for i, r in enumerate(results, 1):
        lines += ["", f"### {i}. {r.name}: {r.title}", "", "Command:", "", _fence(r.command), "",
                  f"Status: **{r.status}**" + (f" ({r.reason})" if r.reason else "")
                  + (f"; {r.wall_s:.1f} s" if r.wall_s is not None else "")]
        if r.table:
            lines += ["", r.table]
        elif r.status.startswith("would run") and (r.timeout_s or 0) >= 1:
            lines += ["", f"Would run with a timeout of {r.timeout_s:.0f} s (estimate {r.estimate_s:.0f} s)."]
        elif r.status.startswith("would run"):
            lines += ["", f"Would run only with time the earlier steps leave (estimate {r.estimate_s:.0f} s; if "
                          "each earlier step used its whole allowance, the budget would be spent)."]
        elif r.status != "ok":
            lines += ["", "No figures: the step did not produce them."]
        if r.output_tail:
            lines += ["", f"Output (tail{'; full log: ' + r.log if r.log else ''}):", "", _fence(r.output_tail)]
    return "\n".join(lines) + "\n"


def run_gpu_check(out_dir: Path, *, dry_run: bool = False, budget_s: float = BUDGET_S, quick: bool = False,
                  steps: list[Step] | None = None) -> Path:
    """Run the prepared GPU check (module docstring) and return the markdown report's path.

    Args:
        out_dir: folder for ``gpu_check.md``, ``gpu_check.json``, the steps' results files
            and ``logs/``.
        dry_run: write the report listing each step's command as "would run (dry run)";
            run nothing.
        budget_s: total seconds for the steps (timeouts are shared out by estimate).
        quick: the same steps at tiny sizes on the CPU (plumbing check; no speed claims).
        steps: the steps to run (default :data:`STEPS`).

    Raises:
        NoGPUError: no CUDA device, and neither ``dry_run`` nor ``quick``.
        ValueError: a budget that is not positive.
    """
    import torch

    from gen._io import atomic_write_text

    if not budget_s > 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}.")
    steps = list(STEPS if steps is None else steps)
    cuda = torch.cuda.is_available()
    if not cuda and not dry_run and not quick:
        raise NoGPUError(
            "no CUDA device here: the GPU check measures on a GPU. Pass dry_run=True (`gen check gpu --dry-run`) "
            "to list the steps and commands without running them, or quick=True (`gen check gpu --quick`) to "
            "run them at tiny sizes on the CPU."
        )
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    root = _repo_root()
    gpu_tests, no_tests = _find_gpu_tests(root)
    cwd = root if root.is_dir() else out_dir
    env = _environment(root, cuda=cuda and not quick)
    mode = "dry run" if dry_run else ("quick (CPU, tiny sizes)" if quick else "full")
    logger.info("GPU check (%s) on %s: %d steps, budget %.0f s, writing to %s", mode, env["device"], len(steps),
                budget_s, out_dir)
    results: list[StepResult] = []
    planned = _timeouts(steps, budget_s, quick)
    start = time.perf_counter()
    for i, step in enumerate(steps):
        cmd = _display(step, out_dir, quick, gpu_tests)
        res = StepResult(step.name, step.title, cmd, "", estimate_s=step.estimate(quick))
        results.append(res)
        if step.name == "tests" and not gpu_tests:
            res.status, res.reason = "skipped", no_tests
            continue
        if step.name == "tests" and importlib.util.find_spec("pytest") is None:
            res.status, res.reason = "skipped", "pytest is not installed (pip install -e \".[dev]\")"
            continue
        if dry_run:
            res.status, res.timeout_s = "would run (dry run)", planned[i]
            continue
        remaining = budget_s - (time.perf_counter() - start)
        timeout = _timeout(step, remaining, quick)
        if timeout < 1.0:
            res.status, res.reason = "skipped", f"time budget spent ({remaining:.0f} s left of {budget_s:.0f} s)"
            continue
        res.timeout_s = timeout
        if step.output:
            (out_dir / step.output).unlink(missing_ok=True)  # never read a stale file back
        argv = step.command(out_dir=out_dir, quick=quick, gpu_tests=gpu_tests)
        log = out_dir / "logs" / f"{step.name}.log"
        logger.info("[%d/%d] %s (timeout %.0f s): %s", i + 1, len(steps), step.name, timeout, cmd)
        status, rc, wall, tail = _run(argv, cwd=cwd, env=_step_env(quick), timeout=timeout, log=log)
        res.status, res.returncode, res.wall_s, res.output_tail = status, rc, wall, tail
        res.log = str(log.relative_to(out_dir))
        if status == "timed out":
            res.reason = f"killed after {timeout:.0f} s"
        elif status == "failed":
            res.reason = (f"exit code {rc}" if rc is not None and rc > 0 else
                          f"killed by signal {-rc}" if rc is not None else (tail.strip().splitlines() or ["?"])[-1])
        if step.name == "tests":
            _read_tests(res)
        elif step.output and (status == "ok" or status == "timed out" and (out_dir / step.output).is_file()):
            if status == "timed out":  # it wrote its results, then did not exit in time: keep them
                res.reason += ", after writing its results"
            if _read_json(res, out_dir / step.output):
                try:
                    _READERS.get(step.name, lambda r: None)(res)
                except (KeyError, TypeError, ValueError) as err:
                    res.status, res.reason = "failed", f"results file {step.output} not understood: {err!r}"
            else:
                res.status = "failed"
                res.reason = res.reason or f"exited 0 but wrote no results file {step.output}"
        logger.info("[%d/%d] %s: %s%s (%.1f s)", i + 1, len(steps), step.name, res.status,
                    f" ({res.reason})" if res.reason else "", wall)
    wall_s = time.perf_counter() - start
    goals = _goals({r.name: r for r in results}, quick=quick, dry_run=dry_run, device=env["device"])
    report = out_dir / "gpu_check.md"
    atomic_write_text(report, _markdown(env, mode, budget_s, wall_s, results, goals, out_dir))
    payload = {"meta": {**env, "mode": mode, "budget_s": budget_s, "wall_s": wall_s},
               "steps": [asdict(r) for r in results], "goals": [asdict(g) for g in goals]}
    atomic_write_text(out_dir / "gpu_check.json", json.dumps(payload, indent=2, default=str) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m gen.check.gpu``: the same as ``gen check gpu``."""
    ap = argparse.ArgumentParser(prog="python -m gen.check.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the steps and commands; run nothing")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (plumbing check)")
    ap.add_argument("--out", default="gpu-check", help="output folder (default: ./gpu-check)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="total seconds for the steps")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dry_run:
        for i, s in enumerate(plan_steps(args.out, quick=args.quick, budget_s=args.budget_s), 1):
            print(f"{i}. {s['name']} (~{s['estimate_s']:.0f} s, timeout {s['timeout_s']:.0f} s): {s['command']}")
    try:
        report = run_gpu_check(Path(args.out), dry_run=args.dry_run, budget_s=args.budget_s, quick=args.quick)
    except (NoGPUError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
