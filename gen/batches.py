"""Scripted batch rendering (``gen batch``, ``gen.batch``): a manifest of jobs rendered
on one run core, each output with a sidecar, resumable, split across processes.

Manifest formats (chosen by the file's extension):

* ``.jsonl`` (or ``.json``): one JSON object per line, any :class:`gen.session.RenderJob`
  field (``prompt`` required; ``id`` optional); blank lines and lines starting with ``#``
  are skipped.
* ``.csv``: a header with a ``prompt`` column; other columns are job fields; empty cells
  take the defaults; ``overrides`` is a JSON object.
* anything else: plain text, one prompt per line.

Command-line options (or ``defaults=``) give every job's defaults; a line overrides them.
``repeat=N`` renders N seeds per line (``seed``, ``seed + 1``, …), each recorded.

Every output is written atomically next to a sidecar ``<name>.json`` (the job, its hash,
versions, device, method, density, what ran dense, timings, status). A rerun of the same
command skips every job whose sidecar says ``done`` with the same job hash and whose file
is there and readable; a changed job renders again; ``force=True`` renders all. A job
that fails is recorded as failed and the batch goes on. Names are deterministic:
``{id or line number}-{prompt words}-s{seed}.mp4``, or ``{prompt}-{repeat}.mp4`` with
``naming="vbench"`` (what VBench reads). At the end ``index.md`` and ``index.html`` show
a thumbnail strip, status, time and density per job.

Under ``torchrun``/``accelerate launch`` the jobs are split between the processes with
accelerate's ``PartialState``; each process renders and writes only its own jobs, and
process 0 writes the index after the others finish. With ``ulysses=N`` (``gen batch
--ulysses N`` under ``torchrun --nproc_per_node N``) the processes instead render every
job together, each attention call shared by all N (diffusers' Ulysses context
parallelism, ``gen.parallel``), with the same seed on every rank; process 0 writes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import html
import io
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gen.session import JOB_FIELDS, RenderJob

logger = logging.getLogger("gen.batch")

__all__ = ["BatchItem", "BatchResult", "ManifestError", "batch", "plan_batch", "read_manifest"]

NAMINGS = ("default", "vbench")
_INT_FIELDS = ("seed", "height", "width", "frames", "steps")
_FLOAT_FIELDS = ("guidance",)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ManifestError(ValueError):
    """A manifest gen cannot run; the message names the file and line."""


@dataclass(frozen=True)
class BatchItem:
    """One output of a batch.

    Attributes:
        number: 1-based position of the manifest entry (line order, blank lines skipped).
        line: the manifest line it came from (1-based; 0 for jobs given in Python).
        repeat: which of the ``repeat`` seeds this is (0-based).
        job: the resolved job.
        name: output file name inside the output folder.
        key: the job's hash (``RenderJob.key``): what resume compares.
    """

    number: int
    line: int
    repeat: int
    job: RenderJob
    name: str
    key: str

    @property
    def sidecar(self) -> str:
        """File name of the sidecar: the output's name with ``.json`` for its extension."""
        return str(Path(self.name).with_suffix(".json"))

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line else f"job {self.number}"


@dataclass
class BatchResult:
    """What a batch did (in this process).

    Attributes:
        out_dir: the output folder.
        items: every item of the batch (all processes').
        rendered: names rendered now by this process. skipped: names already done.
        failed: names of this process's jobs that failed now, with the error.
        index: the ``index.md`` written (process 0), else None.
    """

    out_dir: Path
    items: list[BatchItem]
    rendered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    index: Path | None = None

    @property
    def exit_code(self) -> int:
        """The number of failed jobs (capped at 125, which shells keep apart from signals)."""
        return min(len(self.failed), 125)


# -- reading a manifest ---------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``[(line, fields)]`` of a manifest file (see the module docstring for formats).

    Raises:
        ManifestError: unreadable file, invalid JSON on a line, a line that is not an
            object, a CSV without a ``prompt`` column; the message names the line.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"cannot read the manifest {path}: {err}") from None
    suffix = path.suffix.lower()
    entries: list[tuple[int, dict]] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path.name}, line {n}: invalid JSON ({err.msg} at column {err.colno}).") from None
            if not isinstance(value, dict):
                raise ManifestError(f"{path.name}, line {n}: a job is a JSON object like "
                                    f'{{"prompt": "...", "seed": 1}}, got {type(value).__name__}.')
            entries.append((n, value))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "prompt" not in [f.strip() for f in reader.fieldnames]:
            raise ManifestError(f"{path.name}: a CSV manifest needs a header with a 'prompt' column.")
        for row in reader:
            n = reader.line_num
            if None in row:
                raise ManifestError(f"{path.name}, line {n}: more cells than header columns.")
            fields = {k.strip(): v for k, v in row.items() if v is not None and v.strip() != ""}
            if not fields:
                continue
            entries.append((n, _from_csv(fields, path.name, n)))
    else:
        for n, raw in enumerate(text.splitlines(), 1):
            if raw.strip() and not raw.lstrip().startswith("#"):
                entries.append((n, {"prompt": raw.strip()}))
    if not entries:
        raise ManifestError(f"the manifest {path} has no jobs.")
    return entries


def _from_csv(fields: dict, name: str, line: int) -> dict:
    """CSV cells are text: numbers and the overrides object are parsed by field."""
    out: dict = {}
    for key, value in fields.items():
        try:
            if key in _INT_FIELDS:
                out[key] = int(value)
            elif key in _FLOAT_FIELDS:
                out[key] = float(value)
            elif key == "overrides":
                out[key] = json.loads(value)
            else:
                out[key] = value
        except ValueError:
            raise ManifestError(f"{name}, line {line}: column {key!r} has {value!r}, which is not a "
                                f"{'JSON object' if key == 'overrides' else 'number'}.") from None
    return out


# -- planning ---------------------------------------------------------------------------------


def _slug(text: str, words: int = 6) -> str:
    return "-".join(re.findall(r"[a-z0-9]+", text.lower())[:words]) or "clip"


def _vbench_name(prompt: str) -> str:
    # VBench names files by the prompt itself; only the path separator and NUL cannot be kept
    name = prompt.strip().replace("/", "_").replace("\0", "")
    return name.encode()[:200].decode(errors="ignore")


def plan_batch(jobs: str | os.PathLike | Iterable, *, defaults: Mapping | None = None, repeat: int = 1,
               naming: str = "default") -> list[BatchItem]:
    """Expand a manifest (a file, or jobs as ``RenderJob``s / dicts / prompt strings) into
    the batch's items, checking every job before anything loads.

    Args:
        jobs: a manifest path, or an iterable of jobs.
        defaults: job fields every job starts from (a line overrides them).
        repeat: seeds per job (``seed``, ``seed + 1``, …).
        naming: ``"default"`` or ``"vbench"``.

    Raises:
        ManifestError: unknown field, model or method, bad values, a duplicate id or output
            name; the message names the line.
    """
    if naming not in NAMINGS:
        raise ManifestError(f"naming must be one of {', '.join(NAMINGS)}, got {naming!r}.")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= 10_000:
        raise ManifestError(f"repeat must be a whole number between 1 and 10000, got {repeat!r}.")
    defaults = dict(defaults or {})
    bad = sorted(set(defaults) - set(JOB_FIELDS))
    if bad:
        raise ManifestError(f"unknown default field(s) {', '.join(bad)}; a job has: {', '.join(JOB_FIELDS)}.")
    source = ""
    if isinstance(jobs, (str, os.PathLike)):
        source = Path(jobs).name
        entries = read_manifest(jobs)
    else:
        entries = []
        for i, job in enumerate(jobs):
            if isinstance(job, RenderJob):
                job = job.to_dict()
            elif isinstance(job, str):
                job = {"prompt": job}
            elif not isinstance(job, Mapping):
                raise ManifestError(f"job {i + 1}: a job is a RenderJob, a dict or a prompt, got {type(job).__name__}.")
            entries.append((0, dict(job)))
        if not entries:
            raise ManifestError("the batch has no jobs.")
    items: list[BatchItem] = []
    ids: dict[str, str] = {}
    names: dict[str, str] = {}
    for number, (line, fields) in enumerate(entries, 1):
        where = f"{source}, line {line}" if line else f"job {number}"
        data = {**defaults, **{k: v for k, v in fields.items() if not (line == 0 and v is None and k in defaults)}}
        try:
            base = RenderJob.from_dict(data).resolved()
        except (ValueError, TypeError) as err:
            raise ManifestError(f"{where}: {err}") from None
        if base.id is not None:
            if not isinstance(base.id, str) or not _ID.match(base.id):
                raise ManifestError(f"{where}: id {base.id!r} must be letters, digits, '.', '_' or '-' "
                                    "(it becomes part of a file name).")
            if base.id in ids:
                raise ManifestError(f"{where}: id {base.id!r} was already used on {ids[base.id]}.")
            ids[base.id] = where
        ext = ".mp4" if base.spec.is_video else ".png"
        for r in range(repeat):
            job = dataclasses.replace(base, seed=base.seed + r) if repeat > 1 else base
            if job.out:
                name = _relative_out(job.out, where, base.spec.is_video, repeat, r)
            elif naming == "vbench":
                name = f"{_vbench_name(job.prompt)}-{r}{ext}"
            else:
                name = f"{job.id or f'{number:04d}'}-{_slug(job.prompt)}-s{job.seed}{ext}"
            stem = str(Path(name).with_suffix(""))
            if stem in names:
                raise ManifestError(f"{where}: output {name!r} would overwrite the output of {names[stem]}; "
                                    "give the jobs different ids, prompts or seeds.")
            names[stem] = where
            items.append(BatchItem(number, line, r, job, name, job.key()))
    return items


def _relative_out(out: str, where: str, video: bool, repeat: int, r: int) -> str:
    from gen.values import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    path = Path(out)
    if path.is_absolute() or ".." in path.parts:
        raise ManifestError(f"{where}: out {out!r} must be a file name inside the output folder.")
    allowed = VIDEO_SUFFIXES if video else IMAGE_SUFFIXES
    if path.suffix.lower() not in allowed:
        raise ManifestError(f"{where}: out {out!r} must end in {' or '.join(allowed)}.")
    if repeat > 1:
        path = path.with_name(f"{path.stem}-{r}{path.suffix}")
    return str(path)


# -- resume ---------------------------------------------------------------------------------------


def _readable(path: Path) -> bool:
    """The file is there and its first frame decodes."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        import imageio.v3 as iio

        if path.suffix.lower() in (".mp4", ".gif"):
            next(iter(iio.imiter(path)))
        else:
            iio.imread(path)
        return True
    except Exception:  # noqa: BLE001 (any decoder error means: render it again)
        return False


def read_sidecar(out_dir: Path, item: BatchItem) -> dict | None:
    """The item's sidecar, or None when it is missing or not valid JSON."""
    try:
        data = json.loads((out_dir / item.sidecar).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_done(out_dir: Path, item: BatchItem) -> bool:
    """Whether ``item`` needs no rendering: its sidecar says done for the same job hash and
    its output is there and readable."""
    side = read_sidecar(out_dir, item)
    return (side is not None and side.get("status") == "done" and side.get("job_hash") == item.key
            and _readable(out_dir / item.name))


def _sweep_temps(out_dir: Path, items: Sequence[BatchItem]) -> int:
    """Remove the hidden temporaries (``.<stem>.*<suffix>``) a killed run left for these items."""
    stems = {Path(i.name).with_suffix("").name: Path(i.name).parent for i in items}
    removed = 0
    for stem, sub in stems.items():
        for folder in (out_dir / sub, out_dir / "thumbs" / sub):
            for tmp in folder.glob(f".{glob_escape(stem)}.*"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
                    removed += 1
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


# -- running ----------------------------------------------------------------------------------------


def _versions() -> dict:
    import diffusers
    import torch

    import gen

    return {"gen": gen.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


def _attention_record(out) -> dict:
    """Method, config, density per layout and what ran dense, from a run's summary."""
    transformers = out.attention.get("transformers", [])
    return {
        "method": out.job.attention,
        "config": repr(out.config) if out.config is not None else None,
        "density": {k: v for t in transformers for k, v in t.get("density", {}).items()},
        "sparse_calls": sum(t.get("sparse_calls", 0) for t in transformers),
        "dense_calls": sum(t.get("dense_calls", 0) for t in transformers),
        "dense_layers": sorted({la for t in transformers for la in t.get("dense_layers", [])}),
    }


def _thumbnail(frames: np.ndarray, path: Path, count: int = 5) -> None:
    """A strip of ``count`` evenly spaced frames, as a PNG, atomically."""
    import imageio.v3 as iio

    from gen._io import atomic_path

    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    strip = np.concatenate([frames[i] for i in picks], axis=1)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, strip)


class _Progress:
    """A rich display: jobs done of this process's total with ETA, and the current job's steps."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if not enabled or total == 0:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self.jobs = self.bar.add_task("jobs", total=total)
        self.steps = self.bar.add_task("steps", total=1, visible=False)
        self.bar.start()

    def job(self, name: str, steps: int) -> None:
        if self.bar:
            self.bar.update(self.steps, description=f"  {name[:48]}", completed=0, total=steps, visible=True)

    def step(self, done: int, total: int) -> None:
        if self.bar:
            self.bar.update(self.steps, completed=done, total=total)

    def advance(self) -> None:
        if self.bar:
            self.bar.advance(self.jobs)

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()


def _distributed():
    """accelerate's ``PartialState`` when launched with several processes, else None.
    On a machine without CUDA it must be asked for the CPU (gloo) explicitly, or it would
    stay single-process and every rank would render everything."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def batch(
    jobs: str | os.PathLike | Iterable,
    out_dir: str | os.PathLike,
    *,
    defaults: Mapping | None = None,
    repeat: int = 1,
    naming: str = "default",
    force: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    model_path: str | os.PathLike | None = None,
    progress: bool = False,
    session=None,
    on_job: Callable[[BatchItem, str], None] | None = None,
    ulysses: int = 1,
) -> BatchResult:
    """Render a batch of jobs into ``out_dir`` (see the module docstring).

    Args:
        jobs: a manifest file (JSONL, CSV or text) or an iterable of ``RenderJob``s, dicts
            of job fields, or prompts.
        out_dir: output folder (made if missing; must be writable).
        defaults: job fields each job starts from. repeat: seeds per job.
        naming: ``"default"`` (``{id or number}-{words}-s{seed}``) or ``"vbench"``
            (``{prompt}-{repeat}``).
        force: render every job again, even those already done.
        device, dtype, model_path: for the run core (see ``gen.session.Session``).
        progress: show a progress display on the terminal.
        session: a ``gen.session.Session`` to run on (models it loaded stay loaded).
        on_job: ``on_job(item, status)`` after each job (``"done"``, ``"failed"``,
            ``"skipped"``).
        ulysses: processes that share each job (1: the jobs are split between the
            processes); must equal the number launched.

    Returns:
        The :class:`BatchResult` of this process; ``exit_code`` is the number of failures.

    Raises:
        ManifestError: a bad manifest or option (before any model loads).
        ValueError: an output folder that cannot be written, a bad device or dtype.
    """
    from gen.values import check_ulysses, check_writable_folder

    check_ulysses(ulysses, unit="processes per job")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if ulysses > 1 and launched != ulysses:
        raise ValueError(f"--ulysses {ulysses} needs {ulysses} processes, one per GPU, and {launched} "
                         f"{'was' if launched == 1 else 'were'} launched: run `torchrun --nproc_per_node {ulysses} "
                         "-m gen batch ...`, or leave --ulysses out to split the jobs between the processes.")
    items = plan_batch(jobs, defaults=defaults, repeat=repeat, naming=naming)
    out_dir = check_writable_folder(out_dir).resolve()
    probe = out_dir / f".gen-write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to {out_dir}: {err.strerror or err}; choose another --out-dir.") from None
    result = BatchResult(out_dir, items)

    state = _distributed()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    if rank == 0:
        swept = _sweep_temps(out_dir, items)
        if swept:
            logger.info("removed %d temporary file(s) an interrupted run left in %s", swept, out_dir)
    todo = [i for i in items if force or not is_done(out_dir, i)]
    result.skipped = [i.name for i in items if i not in todo]
    if state is not None:
        # every process has judged what is done before any of them writes
        state.wait_for_everyone()
        if ulysses == 1:
            with state.split_between_processes(todo) as mine:
                todo = list(mine)
    writes = ulysses == 1 or rank == 0  # under Ulysses every rank renders every job; rank 0 writes
    how = ""
    if ulysses > 1:
        how = f" by {world} processes together (Ulysses)"
    elif state is not None:
        how = f" by process {rank} of {world}"
    logger.info("batch of %d job(s) into %s: %d already done, %d to render%s", len(items), out_dir,
                len(result.skipped), len(todo), how)
    if on_job is not None:
        for item in items:
            if item.name in result.skipped:
                on_job(item, "skipped")

    if todo:
        from gen.session import Session

        if session is None:
            dev = device
            if state is not None and dev is None and state.device.type == "cuda":
                dev = str(state.device)
            session = Session(device=dev, dtype=dtype, model_path=model_path, progress=False, ulysses=ulysses)
        versions = _versions()
        bar = _Progress(progress and (state is None or state.is_local_main_process), len(todo))
        try:
            for item in todo:
                bar.job(item.name, item.job.steps)
                status = _render_item(session, item, out_dir, versions, rank, world, bar.step, result, writes=writes,
                                      ulysses=ulysses)
                bar.advance()
                if on_job is not None:
                    on_job(item, status)
        finally:
            bar.stop()
    if state is not None:
        state.wait_for_everyone()
    if rank == 0:
        result.index = write_index(out_dir, items)
    return result


def _render_item(session, item: BatchItem, out_dir: Path, versions: dict, rank: int, world: int,
                 on_step, result: BatchResult, *, writes: bool = True, ulysses: int = 1) -> str:
    """Render one item, write its output and sidecar (atomically, when ``writes``); never
    raises for a failed job (it is recorded), only for an interrupt."""
    from gen._io import atomic_write_text
    from gen.render import write_output

    started = time.time()
    record = {"name": item.name, "job": item.job.to_dict(), "job_hash": item.key, "line": item.line,
              "number": item.number, "repeat": item.repeat, "versions": versions,
              "device": str(session.device), "dtype": str(session.dtype or "model default").removeprefix("torch."),
              "process": rank, "processes": world, "ulysses": ulysses,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}
    try:
        out = session.run(item.job, on_step=on_step)
        if not writes:  # a Ulysses rank other than 0: rank 0 holds the same frames and writes them
            result.rendered.append(item.name)
            return "done"
        t0 = time.perf_counter()
        path = write_output(out.frames, out_dir / item.name, item.job.spec.fps)
        write_s = time.perf_counter() - t0
        _thumbnail(out.frames, out_dir / "thumbs" / Path(item.name).with_suffix(".png"))
        record.update(
            status="done", error=None, file=path.name, frames=int(out.frames.shape[0]),
            frames_sha256=hashlib.sha256(np.ascontiguousarray(out.frames).tobytes()).hexdigest(),
            attention=_attention_record(out),
            timings={"load_s": round(out.load_seconds, 3), "render_s": round(out.seconds, 3),
                     "write_s": round(write_s, 3), "steps_s": [round(s, 4) for s in out.step_seconds]},
        )
        status = "done"
        result.rendered.append(item.name)
    except Exception as err:  # noqa: BLE001 (one failed job must not stop the batch)
        status = "failed"
        message = f"{type(err).__name__}: {err}"
        record.update(status="failed", error=message, traceback=traceback.format_exc(limit=8))
        result.failed[item.name] = message
        logger.error("%s failed: %s", item.name, message)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if not writes:
        return status
    atomic_write_text(out_dir / item.sidecar, json.dumps(record, indent=2) + "\n")
    return status


# -- the index ------------------------------------------------------------------------------------


def _row(out_dir: Path, item: BatchItem) -> dict:
    side = read_sidecar(out_dir, item) or {}
    ok = side.get("job_hash") == item.key
    status = side.get("status", "missing") if ok else ("stale" if side else "missing")
    timings = side.get("timings", {}) if ok else {}
    dens = (side.get("attention") or {}).get("density", {}) if ok else {}
    values = [v for v in dens.values() if v is not None]
    thumb = Path("thumbs") / Path(item.name).with_suffix(".png")
    return {
        "name": item.name, "prompt": item.job.prompt, "seed": item.job.seed, "status": status,
        "time": timings.get("render_s"), "density": sum(values) / len(values) if values else None,
        "method": item.job.attention, "error": side.get("error") if ok else None,
        "thumb": str(thumb) if (out_dir / thumb).is_file() and status == "done" else None,
    }


def write_index(out_dir: Path, items: Sequence[BatchItem]) -> Path:
    """``index.md`` and ``index.html`` in ``out_dir``: one row per item with its thumbnail
    strip, status, render time and density. Returns the markdown file."""
    from gen._io import atomic_write_text

    rows = [_row(out_dir, i) for i in items]
    done = sum(r["status"] == "done" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    head = f"{done} of {len(rows)} done" + (f", {failed} failed" if failed else "")

    def fmt(v, spec):
        return format(v, spec) if v is not None else "–"

    md = [f"# Batch: {head}", "", "| # | file | prompt | seed | attention | status | time (s) | density | frames |",
          "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        status = r["status"] + (f": {r['error']}" if r["error"] else "")
        thumb = f"![{r['name']}]({r['thumb']})" if r["thumb"] else ""
        cells = [str(i), f"[{r['name']}]({r['name']})", r["prompt"], str(r["seed"]), r["method"], status,
                 fmt(r["time"], ".2f"), fmt(r["density"], ".3f"), thumb]
        md.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    atomic_write_text(out_dir / "index.md", "\n".join(md) + "\n")

    e = html.escape
    body = []
    for i, r in enumerate(rows, 1):
        img = f'<img src="{e(r["thumb"])}" alt="{e(r["name"])}" height="96">' if r["thumb"] else ""
        status = e(r["status"]) + (f'<br><small>{e(r["error"])}</small>' if r["error"] else "")
        body.append(f'<tr class="{e(r["status"])}"><td>{i}</td><td><a href="{e(r["name"])}">{e(r["name"])}</a></td>'
                    f'<td>{e(r["prompt"])}</td><td>{r["seed"]}</td><td>{e(r["method"])}</td><td>{status}</td>'
                    f'<td>{fmt(r["time"], ".2f")}</td><td>{fmt(r["density"], ".3f")}</td><td>{img}</td></tr>')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gen batch: {e(head)}</title>
<style>body{{font-family:sans-serif}} td,th{{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}}
tr.failed{{background:#fee}} tr.missing,tr.stale{{background:#ffd}}</style></head>
<body><h1>gen batch: {e(head)}</h1>
<table><tr><th>#</th><th>file</th><th>prompt</th><th>seed</th><th>attention</th><th>status</th><th>time (s)</th>
<th>density</th><th>frames</th></tr>
{chr(10).join(body)}
</table></body></html>
"""
    atomic_write_text(out_dir / "index.html", page)
    return out_dir / "index.md"
