"""Model folders of the trained tiny models: saving atomically with a manifest, checking them.

A folder is a plain diffusers pipeline folder (``model_index.json``, one subfolder per
component, written by ``save_pretrained``) plus ``gen_model.json``: the model's name, the
training config, the training log, the library versions it was trained with and the
SHA-256 of every file. ``check_folder`` reads only the folder (no model is built) and
lists everything wrong with it: a missing ``model_index.json``, component folder, config,
weights or tokenizer file, a file whose checksum differs from the manifest (corrupted or
edited), or a weights file whose safetensors header cannot be read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST", "check_folder", "file_digests", "publish_folder", "read_manifest", "strip_source_paths"]

MANIFEST = "gen_model.json"

# Files each kind of component must have (besides its config); weights may be sharded.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_SCHEDULER_FILES = ("scheduler_config.json",)


def file_digests(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` except the manifest."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            out[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's ``gen_model.json`` as a dict, None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _safetensors_ok(path: Path) -> str | None:
    """None if ``path`` has a readable safetensors header and the size it promises, else why not."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100_000_000:
                return "not a safetensors file (bad header length)"
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"unreadable header ({type(exc).__name__})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size < 8 + n + end:
        return f"truncated ({size} of {8 + n + end} bytes)"
    return None


def component_keys(index: dict) -> list[str]:
    """The component entries of a parsed ``model_index.json`` (``"vae": ["diffusers",
    "AutoencoderKLWan"]``; private ``_`` keys and ``[null, null]`` slots are not components)."""
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]


def check_folder(folder: str | os.PathLike) -> list[str]:
    """Everything wrong with a pipeline folder, one short line each (empty: it looks complete).

    Checks ``model_index.json``; per component its folder, ``config.json`` (models) and
    weights (a ``.safetensors``/``.bin`` file, each safetensors header readable and not
    truncated), tokenizer files, scheduler config; and, when ``gen_model.json`` is there,
    that every file it lists exists with the same SHA-256.
    """
    folder = Path(folder)
    problems: list[str] = []
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except OSError:
        return ["model_index.json is missing"]
    except ValueError:
        return ["model_index.json is not valid JSON"]
    for key in component_keys(index):
        sub = folder / key
        if not sub.is_dir():
            problems.append(f"{key}/ is missing")
            continue
        if key.startswith("tokenizer"):
            problems += [f"{key}/{f} is missing" for f in _TOKENIZER_FILES if not (sub / f).is_file()]
            continue
        if key.startswith("scheduler"):
            problems += [f"{key}/{f} is missing" for f in _SCHEDULER_FILES if not (sub / f).is_file()]
            continue
        if not (sub / "config.json").is_file():
            problems.append(f"{key}/config.json is missing")
        weights = sorted(sub.glob("*.safetensors")) + sorted(sub.glob("*.bin"))
        if not weights:
            problems.append(f"{key}/ has no weights file (*.safetensors)")
        for w in weights:
            if w.suffix == ".safetensors" and (why := _safetensors_ok(w)):
                problems.append(f"{key}/{w.name} is {why}")
    manifest = read_manifest(folder)
    if manifest is None and (folder / MANIFEST).exists():
        problems.append(f"{MANIFEST} is not valid JSON")
    for rel, digest in ((manifest or {}).get("files") or {}).items():
        path = folder / rel
        if not path.is_file():
            if not any(p.startswith(rel.split("/")[0] + "/") for p in problems):
                problems.append(f"{rel} is missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{rel} is corrupted (its SHA-256 differs from {MANIFEST})")
    return list(dict.fromkeys(problems))


def strip_source_paths(folder: str | os.PathLike) -> list[Path]:
    """Drop ``_name_or_path`` from every JSON config under ``folder``; returns the files changed.

    diffusers records in each saved config the folder a component was loaded from (for a
    ``--vae`` or ``--causal`` run, a path on the training machine). It plays no part in
    loading, and a published folder must not carry the machine it was made on."""
    changed = []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            changed.append(path)
    return changed


def publish_folder(pipe, out: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """``pipe.save_pretrained`` into a temporary sibling of ``out``, add ``gen_model.json``
    (``manifest`` plus the files' SHA-256) and rename it into place: ``out`` is either the old
    folder or the complete new one, never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        strip_source_paths(tmp)
        record = {**manifest, "files": file_digests(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(record, indent=1, default=str) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
