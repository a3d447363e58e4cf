"""``gen check kernels``: compile every Triton kernel ahead of time for sm_80 and sm_90.

No GPU is needed: ``triton.compile`` takes a ``GPUTarget`` and runs the ``ptxas`` that
ships in the Triton wheel. For every case of ``gen.kernels.aot`` (each kernel, over every
config its autotuner may keep on that target, at real model sizes) this reports the
registers, spills and shared memory that ptxas gives, and which instructions the PTX
uses, and flags what would fail or run slow on the GPU:

* a compile error (for example a module-level global that is not ``tl.constexpr``);
* shared memory over the target's limit (227 KiB sm_90, 163 KiB sm_80): a launch error;
* register spills for bf16/fp16 on sm_90;
* bf16/fp16 code without tensor-core instructions (``wgmma`` on sm_90, ``mma.sync`` on sm_80),
  for kernels that multiply tiles (``AotCase.tensor_cores``; reductions such as the block
  statistics have no matmul to put on tensor cores).

Compiles run in worker processes with ``TRITON_INTERPRET=0`` (the interpreter and the
compiler cannot share a process: Triton decides at import) and an empty Triton cache, so
ptxas runs every time.

    gen check kernels                 # the fast subset (also in the test suite)
    gen check kernels --full --markdown table.md   # every kept config; the table in BENCHMARKS.md
"""

from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

__all__ = ["CompileRow", "compile_case", "markdown_table", "problems", "run_checks"]


@dataclass
class CompileRow:
    """What compiling one case gave (``status`` is ``ok`` or the compiler's last error line)."""

    kernel: str
    case: str
    arch: str
    dtype: str
    tile: str
    warps: int
    stages: int
    status: str = "ok"
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    shared_limit: int = 0
    shared_estimate: int | None = None
    expects_tma: bool = False
    expects_mma: bool = True  # a kernel with tile matmuls (tl.dot); reductions have none
    wgmma: int = 0
    mma_sync: int = 0
    tma: int = 0
    cp_async: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _worker_init(cache_dir: str) -> None:
    # Set before triton is imported in this process: compiled mode, private cache.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default, stated


def _number(pattern: str, text: str) -> int | None:
    found = re.search(pattern, text)
    return int(found.group(1)) if found else None


@functools.cache
def _jitted(module_name: str, kernel: str):
    # one JITFunction per kernel and process: triton.jit reads the function's source from
    # disk, so the whole sweep compiles the same source even if the file changes meanwhile
    import importlib

    import triton

    return triton.jit(getattr(importlib.import_module(module_name), kernel))


def compile_case(case) -> CompileRow:
    """Compile one ``gen.kernels.aot.AotCase`` for its target and read ptxas's report."""
    import triton
    from triton.backends.compiler import GPUTarget

    from gen.kernels._common import SMEM_LIMIT
    from gen.kernels.aot import signature_of

    row = CompileRow(kernel=case.kernel, case=case.label, arch=f"sm_{case.arch}", dtype=case.dtype,
                     tile=case.tile, warps=case.num_warps, stages=case.num_stages,
                     shared_limit=SMEM_LIMIT[case.arch], shared_estimate=case.smem_estimate,
                     expects_tma=bool(case.constexprs.get("USE_TMA", False)),
                     expects_mma=case.tensor_cores)
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    log, start = io.StringIO(), time.perf_counter()
    try:
        fn = _jitted(case.module, case.kernel)
        sig, consts, attrs = signature_of(fn, case.runtime, case.constexprs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                target=GPUTarget("cuda", case.arch, 32),
                options=dict(num_warps=case.num_warps, num_stages=case.num_stages),
            )
    except Exception as exc:  # noqa: BLE001 - any compiler error is the finding
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
        row.status = f"FAIL: {type(exc).__name__}: {lines[-1][:160]}"
        row.seconds = round(time.perf_counter() - start, 1)
        row.problems = problems(row, half=case.half)
        return row
    text, ptx = log.getvalue(), compiled.asm["ptx"]
    row.registers = _number(r"Used (\d+) registers", text)
    row.spill_stores = _number(r"(\d+) bytes spill stores", text)
    row.spill_loads = _number(r"(\d+) bytes spill loads", text)
    row.shared = int(compiled.metadata.shared)
    row.wgmma = ptx.count("wgmma.mma_async")
    row.mma_sync = ptx.count("mma.sync")
    row.tma = ptx.count("cp.async.bulk.tensor")
    row.cp_async = len(re.findall(r"cp\.async\.c[ag]\.shared", ptx))
    row.seconds = round(time.perf_counter() - start, 1)
    row.problems = problems(row, half=case.half)
    return row


def problems(row: CompileRow, *, half: bool) -> list[str]:
    """What in ``row`` would fail or run slow on the target GPU (empty: fine)."""
    if row.status != "ok":
        return [row.status]
    found = []
    if row.shared is not None and row.shared > row.shared_limit:
        found.append(f"shared memory {row.shared} B > {row.shared_limit} B: launch would fail")
    if row.shared is not None and row.shared_estimate is not None and row.shared > row.shared_estimate:
        found.append(f"shared memory {row.shared} B > the pruning estimate {row.shared_estimate} B")
    if row.registers is None:
        found.append("no ptxas register report")
    if half and row.arch == "sm_90" and ((row.spill_stores or 0) or (row.spill_loads or 0)):
        found.append(f"register spills ({row.spill_stores}/{row.spill_loads} B stores/loads)")
    if half and row.expects_mma and row.arch == "sm_90" and row.wgmma == 0:
        found.append("no wgmma (Hopper tensor cores) in sm_90 code")
    if half and row.expects_mma and row.arch == "sm_80" and row.mma_sync == 0:
        found.append("no mma.sync (tensor cores) in sm_80 code")
    if row.expects_tma and row.tma == 0:
        found.append("tensor-descriptor variant without TMA copies (cp.async.bulk.tensor)")
    return found


def run_checks(
    *,
    full: bool = False,
    archs: Iterable[int] = (80, 90),
    kernels: tuple[str, ...] | None = None,
    jobs: int | None = None,
    on_row: Callable[[CompileRow, int, int], None] | None = None,
    todo: list | None = None,
) -> list[CompileRow]:
    """Compile every case (``full``: every kept config, else the fast subset; or the
    ``gen.kernels.aot.AotCase`` list ``todo``) in worker processes; ``on_row(row, done,
    total)`` is called as results arrive, in case order."""
    from gen.kernels.aot import cases

    if todo is None:
        todo = cases(full=full, archs=tuple(archs), kernels=kernels)
    jobs = max(1, jobs or os.cpu_count() or 1)
    rows: list[CompileRow] = []
    with tempfile.TemporaryDirectory(prefix="gen-aot-") as cache:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(cache,)) as pool:
            for row in pool.map(compile_case, todo):
                rows.append(row)
                if on_row is not None:
                    on_row(row, len(rows), len(todo))
    return rows


_COLUMNS = ["kernel", "case", "arch", "tile", "warps", "stages", "status", "registers", "spills",
            "shared KiB", "limit KiB", "wgmma", "mma.sync", "TMA", "cp.async"]


def markdown_table(rows: list[CompileRow]) -> str:
    """The rows as a markdown table (spills as stores/loads bytes)."""
    out = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in rows:
        status = "ok" if r.ok else ("; ".join(r.problems))
        cells = [r.kernel.strip("_"), r.case, r.arch, r.tile, r.warps, r.stages, status, r.registers,
                 f"{r.spill_stores}/{r.spill_loads}",
                 "" if r.shared is None else f"{r.shared / 1024:.0f}", f"{r.shared_limit / 1024:.0f}",
                 r.wgmma, r.mma_sync, r.tma, r.cp_async]
        out.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


def rows_as_dicts(rows: list[CompileRow]) -> list[dict]:
    return [asdict(r) for r in rows]
