"""Where gen keeps models on disk: its own cache (the tiny pipelines, built once and
published atomically), the bundled model folders, and the Hugging Face Hub cache.

Tiny models are built from ``gen.pipelines.tiny`` once, saved with ``save_pretrained``
into ``$GEN_CACHE_DIR/tiny/<name>-v1`` (default ``~/.cache/gen``) with a fingerprint of
everything they depend on, and loaded back with ``from_pretrained`` (``loading.py``), so
they exercise the same loading path as real checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .specs import ModelSpec, get_spec
from .tiny import TINY_CONFIGS, build_tiny_pipeline
from .tokenizers import vocabulary

__all__ = ["TINY_CACHE_VERSION", "bundled_folder", "ensure_tiny_folder", "gen_cache_dir", "hf_cache_dir",
           "tiny_cache_folder"]

# Bump when the saved tiny folders change in a way the fingerprint cannot see
# (e.g. a different save format); old folders are then simply not used.
TINY_CACHE_VERSION = 1


def gen_cache_dir() -> Path:
    """Root of gen's own cache: ``$GEN_CACHE_DIR``, else ``~/.cache/gen``."""
    return Path(os.environ.get("GEN_CACHE_DIR") or "~/.cache/gen").expanduser()


def tiny_cache_folder(name: str) -> Path:
    """Where ``load(name)`` keeps the saved tiny pipeline: ``<gen cache>/tiny/<name>-v1``."""
    return gen_cache_dir() / "tiny" / f"{name}-v{TINY_CACHE_VERSION}"


def bundled_folder(name: str | ModelSpec) -> Path:
    """Where a bundled model's pipeline folder lives: ``gen/pipelines/weights/<name>``."""
    spec = get_spec(name)
    if not spec.is_bundled:
        raise ValueError(f"{spec.name} has no bundled weights.")
    return Path(__file__).resolve().parent / "weights" / spec.bundled


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache, read from the environment now (not at import time).

    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``).
    """
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _tiny_fingerprint(name: str, seed: int) -> str:
    """Hash of everything the saved tiny folder depends on (configs, vocabulary, seed, versions)."""
    import diffusers
    import transformers

    payload = {
        "name": name,
        "seed": seed,
        "configs": TINY_CONFIGS[name],
        "vocab": vocabulary(),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


_STAMP = "gen_tiny.json"


def _tiny_folder_is_current(folder: Path, fingerprint: str) -> bool:
    try:
        stamp = json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (folder / "model_index.json").is_file() and stamp.get("fingerprint") == fingerprint


def ensure_tiny_folder(name: str, seed: int = 0) -> Path:
    """Build, save and atomically publish the tiny pipeline folder unless a current one exists."""
    folder = tiny_cache_folder(name)
    fingerprint = _tiny_fingerprint(name, seed)
    if _tiny_folder_is_current(folder, fingerprint):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Save into a sibling temp dir and rename: a reader never sees a half-written folder,
    # and a crash leaves only a temp dir behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        build_tiny_pipeline(name, seed=seed).save_pretrained(tmp, safe_serialization=True)
        (tmp / _STAMP).write_text(json.dumps({"name": name, "seed": seed, "fingerprint": fingerprint}))
        if _tiny_folder_is_current(folder, fingerprint):
            return folder  # another process published it while we were building
        if folder.exists():
            # Stale or broken: move it aside first, since os.replace cannot overwrite a
            # non-empty directory.
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            try:
                os.replace(folder, old / "x")
            except OSError:
                pass  # another process moved it already
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process published the same folder between our check and now.
            if not _tiny_folder_is_current(folder, fingerprint):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
