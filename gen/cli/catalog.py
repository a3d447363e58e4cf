"""``gen models`` and ``gen methods``: what gen knows.

``gen methods`` reprints a cached listing while gen's sources and versions are unchanged
(building it imports torch, which takes seconds); ``tests/test_cli_speed.py`` holds both
the cache and the recorded preset densities to the fresh values.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from gen.cli.app import app
from gen.cli.common import console, print_path


@app.command()
def models() -> None:
    """List the models gen knows and whether their weights are available here."""
    from gen.pipelines import list_models

    rows = []
    for spec, available, where in list_models():
        size = f"{spec.width}x{spec.height}" + (f"x{spec.frames}f" if spec.frames > 1 else "")
        rows.append((spec.name, spec.task, spec.family, size, "yes" if available else "no", where))
    table = Table(title="models")
    for col in ("name", "task", "family", "default size", "weights"):
        table.add_column(col, no_wrap=True)  # a model name is typed back: never cut it
    table.add_column("source", overflow="fold")
    for *row, where in rows:
        weights = "[green]yes[/green]" if row[-1] == "yes" else "[dim]no[/dim]"
        table.add_row(*map(escape, row[:-1]), weights, escape(where))
    if table.__rich_measure__(console, console.options).minimum <= console.width:
        console.print(table)
        return
    # too narrow for the table's fixed columns: one block per model, the name on its own line
    for name, task, family, size, weights, where in rows:
        print_path(name)
        console.print(f"  {task}, {family}, {size}, weights {weights}", highlight=False)
        console.print("  " + escape(where), highlight=False, soft_wrap=True)  # may hold a path: never split


def _preset_grid_density(method: str, key: str, *, precomputed: bool = True) -> tuple[str, float] | None:
    """``("21x30x52", 0.339...)``: the native video grid of the model ``key`` names and the
    density of ``method``'s preset for it there; None for family presets and methods
    without a static plan. Takes the number from ``PRESET_DENSITIES`` when it is recorded
    for that grid (building a plan at a model's full size takes seconds), else builds the
    plan (always with ``precomputed=False``)."""
    from gen.pipelines import MODELS

    spec = MODELS.get(key)
    if spec is None:
        return None
    from gen.attention import TokenLayout
    from gen.attention.methods import get_method
    from gen.attention.methods.presets import PRESET_DENSITIES
    from gen.masks import layout_for_model

    try:
        layout = layout_for_model(spec)
        grid = f"{layout.frames}x{layout.height}x{layout.width}"
        recorded = PRESET_DENSITIES.get(method, {}).get(key)
        if precomputed and recorded is not None and recorded[0] == grid:
            return recorded
        video = TokenLayout(layout.frames, layout.height, layout.width)
        d = get_method(method, model=key, family=spec.family).density(video, spec.heads)
    except (NotImplementedError, ValueError):
        return None
    return grid, d


def _preset_density(method: str, key: str) -> str:
    """``, density 0.339 at 21x30x52`` for a preset keyed by a model name (its native
    geometry), empty for family presets and methods without a static plan."""
    got = _preset_grid_density(method, key)
    if got is None:
        return ""
    grid, d = got
    return f"  [green]density {d:.3f}[/green] at {grid}"


def _methods_lines() -> list[str]:
    """What ``gen methods`` prints, one console line (rich markup) per entry, built from the
    method registry (imports torch)."""
    import dataclasses

    from gen.attention.methods import PRESETS, list_methods, method_class

    lines = []
    for name in list_methods():
        cls = method_class(name)
        lines.append(f"[bold]{name}[/bold] — {cls.summary}  [dim](models: {', '.join(cls.families)})[/dim]")
        for f in dataclasses.fields(cls.config_cls):
            default = f.default if f.default is not dataclasses.MISSING else "required"
            lines.append(f"    {f.name} = {default!r}")
        for key, values in PRESETS.get(name, {}).items():
            lines.append(f"    preset [cyan]{key}[/cyan]: {values}{_preset_density(name, key)}")
    return lines


_METHODS_CACHE_FORMAT = 1


def _methods_cache_file() -> Path:
    """``$GEN_CACHE_DIR/methods.json`` (default ``~/.cache/gen``), as the model cache."""
    return Path(os.environ.get("GEN_CACHE_DIR") or "~/.cache/gen").expanduser() / "methods.json"


def _methods_cache_key() -> str:
    """Hash of everything the listing is made from: every source and JSON file of the gen
    packages (methods, presets, model registry, plans), the Python and torch versions."""
    import hashlib
    import importlib.metadata
    import importlib.util

    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    digest = hashlib.sha256(f"{_METHODS_CACHE_FORMAT}\n{sys.version}\n{torch_version}\n".encode())
    for package in ("gen", "gen.attention", "gen.kernels", "gen.pipelines", "gen.demos"):
        spec = importlib.util.find_spec(package)  # finds without importing the package
        for root in map(Path, spec.submodule_search_locations if spec else ()):
            for file in sorted([*root.rglob("*.py"), *root.rglob("*.json")]):
                digest.update(f"\n{package}/{file.relative_to(root).as_posix()}\n".encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()


def _cached_methods_lines() -> list[str]:
    """:func:`_methods_lines`, from a cache file while gen's sources and versions are the
    ones it was made from: listing the methods imports torch, which takes seconds. A
    missing, stale, unreadable or unwritable cache only means building the list again."""
    import contextlib
    import json

    file = _methods_cache_file()
    try:
        key = _methods_cache_key()
    except OSError:
        return _methods_lines()
    try:
        cached = json.loads(file.read_text(encoding="utf-8"))
        lines = cached["lines"]
        if cached["key"] == key and isinstance(lines, list) and all(isinstance(x, str) for x in lines):
            return lines
    except (OSError, ValueError, TypeError, KeyError):
        pass
    lines = _methods_lines()
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "lines": lines}, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, file)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return lines


@app.command()
def methods() -> None:
    """List the attention methods, their parameters (with defaults) and presets per model."""
    for line in _cached_methods_lines():
        console.print(line)
