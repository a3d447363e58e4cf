"""Ahead-of-time compiles of every Triton kernel for sm_80 and sm_90, on a CPU.

The interpreter tests prove arithmetic; these prove the kernels compile for the GPUs
users have (no global the compiler refuses, shared memory within the device's limit, no
register spills and tensor-core instructions for bf16/fp16 on sm_90). The fast subset
runs here; ``gen check kernels --full`` sweeps every config the autotuners may keep.
"""

import ast
import re
from pathlib import Path

import pytest

from gen.check.kernels import problems, run_checks
from gen.kernels.aot import KERNELS, TARGETS, AotCase, cases

KERNEL_DIR = Path(__file__).resolve().parents[1] / "kernels"


def _kernel_functions() -> dict[str, str]:
    """Every ``_*_kernel`` function defined in kernels/, by name -> module file stem."""
    found = {}
    for path in sorted(KERNEL_DIR.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and re.fullmatch(r"_\w+_kernel", node.name):
                found[node.name] = path.stem
    return found


def test_every_kernel_is_in_the_one_list():
    found = _kernel_functions()
    assert found, "no kernels found: did the folder move?"
    missing = sorted(set(found) - set(KERNELS))
    assert not missing, f"add these kernels to gen.kernels.aot.KERNELS: {missing}"
    for name, (module, _) in KERNELS.items():
        assert found.get(name) == module, f"{name} is listed under {module!r} but defined in {found.get(name)!r}"


def test_cases_cover_every_kernel_target_and_dtype():
    quick, full = cases(full=False), cases(full=True)
    assert {c.kernel for c in quick} == set(KERNELS)
    assert {c.arch for c in quick} == set(TARGETS)
    assert {c.dtype for c in full} == {"bf16", "fp16", "fp32"}
    assert len(full) > 3 * len(quick)
    for c in full:
        # what the launcher's pruning assumed must fit the target: the compile then says
        # whether the assumption holds
        assert c.smem_estimate is not None and c.smem_estimate <= {80: 166912, 90: 232448}[c.arch], c


@pytest.fixture(scope="module")
def quick_rows():
    return run_checks(full=False, jobs=2)


def test_fast_subset_compiles_without_problems(quick_rows):
    bad = [(r.case, r.arch, r.tile, r.warps, r.stages, r.problems) for r in quick_rows if not r.ok]
    assert not bad, bad
    assert {r.arch for r in quick_rows} == {"sm_80", "sm_90"}


def test_hopper_code_uses_wgmma_and_ampere_code_mma(quick_rows):
    for r in quick_rows:
        if r.dtype in ("bf16", "fp16") and r.expects_mma:
            assert (r.wgmma if r.arch == "sm_90" else r.mma_sync) > 0, r
        assert r.shared is not None and 0 < r.shared <= r.shared_limit, r
        assert r.shared <= r.shared_estimate, r


def _tiny_case(kernel: str) -> AotCase:
    return AotCase("aot_bad_kernel", kernel, "tiny", 90, "fp32",
                   {"X": "*fp32", "N": 1000}, {"BLOCK": 128}, 4, 2, None)


def test_a_plain_global_fails_the_check_and_a_constexpr_passes():
    # the defect that shipped once: LN2 as a plain float inside the kernels
    rows = run_checks(jobs=2, todo=[_tiny_case("_plain_global_kernel"), _tiny_case("_constexpr_global_kernel")])
    bad, good = rows
    assert bad.status.startswith("FAIL") and "global" in bad.status, bad.status
    assert problems(bad, half=False) == [bad.status]
    assert good.status == "ok" and good.registers is not None, good


def test_kernel_status_runs_each_kernel():
    # `gen info` on a GPU; here through the interpreter
    import torch

    from gen.kernels.status import kernel_status

    rows = kernel_status(torch.device("cpu"))
    assert [r["name"] for r in rows] == ["block_sparse_attention", "cache_attention"]
    for r in rows:
        assert r["ok"], r
        assert r["error_vs_sdpa"] < 2e-2, r


def test_check_kernels_command(tmp_path):
    from typer.testing import CliRunner

    from gen.cli import app

    runner = CliRunner()
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    res = runner.invoke(app, ["check", "kernels", "--kernel", "_cache_attn_fwd_kernel", "--arch", "90",
                              "--jobs", "2", "--markdown", str(md), "--json", str(js)])
    assert res.exit_code == 0, res.output
    import json

    rows = json.loads(js.read_text())
    assert rows and {r["arch"] for r in rows} == {"sm_90"} and all(not r["problems"] for r in rows)
    assert md.read_text().startswith("| kernel | case | arch |")
    for bad, words in ((["--arch", "75"], "--arch"), (["--arch", "x"], "--arch"),
                       (["--kernel", "nope"], "unknown kernel"), (["--jobs", "0"], "--jobs")):
        res = runner.invoke(app, ["check", "kernels", *bad])
        assert res.exit_code == 2 and words in res.output, res.output


def test_int8_kernels_use_int8_tensor_cores():
    """PARO's INT8 kernels compile for sm_80 and sm_90 with their matmuls on s8 operands
    (``mma.sync...s32.s8.s8.s32`` / ``wgmma...s32.s8.s8``): ``int8`` has both dots' worth
    of MMA, the Q·K ones int8 and the P·V ones bf16; ``int8-pv`` only int8 ones. The
    round-half-to-even constant survives compilation (no ``(y + c) - c`` folding) in the
    quantization kernel and in ``int8-pv`` (P to int8); shared memory fits the target."""
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from gen.check.kernels import _worker_init
    from gen.kernels.aot import int8_code_report

    todo = []
    for case in cases(full=False, kernels=("_quant_block_sparse_fwd_kernel", "_quantize_qkv_kernel")):
        if case.label.startswith("wan14b720") and not any((c.label, c.arch) == (case.label, case.arch) for c in todo):
            todo.append(case)  # one config per main case and target
    assert {(c.kernel, c.arch) for c in todo} == {(k, a) for k in ("_quant_block_sparse_fwd_kernel",
                                                                   "_quantize_qkv_kernel") for a in TARGETS}
    with tempfile.TemporaryDirectory(prefix="gen-aot-int8-") as cache:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(2, mp_context=ctx, initializer=_worker_init, initargs=(cache,)) as pool:
            reports = list(pool.map(int8_code_report, todo))
    for case, rep in zip(todo, reports):
        limit = {80: 166912, 90: 232448}[case.arch]
        assert rep["shared"] <= limit, rep
        if case.kernel == "_quantize_qkv_kernel":
            assert rep["mma"] == 0 and rep["rint_constant"] >= 1, rep
            continue
        wanted = "wgmma.mma_async" if case.arch == 90 else "mma.sync"
        assert rep["s8_mma"] > 0 and all(k.startswith(wanted) for k in rep["mma_kinds"]), rep
        assert all("s32.s8.s8" in k for k in rep["mma_kinds"] if ".s8" in k), rep
        if "int8-pv" in case.label:
            assert rep["s8_mma"] == rep["mma"] and rep["rint_constant"] >= 1, rep
        else:
            assert 0 < rep["s8_mma"] < rep["mma"], rep


_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "i32": "int32", "i64": "int64",
                 "u8": "uint8", "i8": "int8"}


def test_autotune_pruning_reads_meta_parameters_given_by_keyword():
    """Each autotuned kernel's early pruning, called the way Triton's autotuner calls it:
    the launch's positional arguments by name, its meta-parameters (``HEAD_DIM``, ...) as
    keywords. The AOT cases above call ``keep_config`` directly and never go through this
    door; on a GPU the cache kernel's pruning once read ``HEAD_DIM`` from the positional
    arguments only and every launch failed with ``KeyError: 'HEAD_DIM'``."""
    import importlib

    import torch

    checked = set()
    for name, (module, make) in KERNELS.items():
        m = importlib.import_module(f"gen.kernels.{module}")
        if not hasattr(m, "_prune"):
            continue
        tile_keys = set(m.HOPPER_CONFIGS[0].kwargs)
        for case in make(90, False):
            if not tile_keys <= set(case.constexprs):
                continue  # another kernel of the module (not the autotuned one)
            named = {}
            for arg, value in case.runtime.items():
                if isinstance(value, str) and value.startswith("*"):
                    named[arg] = torch.empty(1, dtype=getattr(torch, _TORCH_DTYPES[value[1:]]), device="meta")
                else:
                    named[arg] = value
            meta = {k: v for k, v in case.constexprs.items() if k not in tile_keys}
            kept = m._prune(m.HOPPER_CONFIGS, named, **meta)
            assert kept, f"{name} ({case.label}): pruning kept no config"
            assert m._prune(m.HOPPER_CONFIGS, {**named, **meta}) == kept, (
                f"{name} ({case.label}): pruning depends on how the meta-parameters are passed")
            checked.add(name)
    assert len(checked) >= 4, f"expected the four autotuned attention kernels, checked {sorted(checked)}"
