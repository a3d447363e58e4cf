"""Loading a model offline: ``load(name)`` and ``list_models()``.

- tiny models load from gen's cache (``caches.ensure_tiny_folder`` builds them once);
- bundled models from ``pipelines/weights/<name>`` after ``check_folder`` finds every file
  present and matching its checksum;
- real models from the local Hugging Face cache only (``local_files_only=True``: nothing
  is downloaded), or from ``model_path``.

Anything missing or damaged raises ``ModelNotAvailableError`` saying what is missing
and how to get or restore it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ._compat import realign_cpu_tensors
from .caches import bundled_folder, ensure_tiny_folder, hf_cache_dir, tiny_cache_folder
from .shapes.folder import check_folder, component_keys, read_manifest
from .specs import MODELS, ModelSpec, get_spec, parse_dtype

__all__ = ["ModelNotAvailableError", "list_models", "load"]


class ModelNotAvailableError(ValueError):
    """The weights of a model are not on this machine (or ``model_path`` is not a pipeline)."""


def _dtype_kwargs(spec: ModelSpec, dtype: torch.dtype | str | None) -> dict[str, Any]:
    """``from_pretrained`` keyword for the dtype; a per-component dict when some stay fp32."""
    main = spec.torch_dtype if dtype is None else parse_dtype(dtype)
    value: Any = main
    if spec.fp32_components and main != torch.float32:
        value = {"default": main, **dict.fromkeys(spec.fp32_components, torch.float32)}
    # diffusers renamed torch_dtype= to dtype= (0.42 warns on the old name).
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

        return {"dtype": value}
    except ImportError:
        return {"torch_dtype": value}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _pipeline_class(spec: ModelSpec):
    import diffusers

    return getattr(diffusers, spec.pipeline_class)


def _component_problems(folder: Path) -> list[str]:
    """Files a pipeline folder lacks (cheap, offline): component folders and weight shards."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"model_index.json ({_first_line(exc)})"]
    missing: list[str] = []
    for key in component_keys(index):
        sub = folder / key
        if not sub.is_dir():
            missing.append(f"{key}/")
            continue
        for shard_index in sub.glob("*.index.json"):
            try:
                shards = set(json.loads(shard_index.read_text()).get("weight_map", {}).values())
            except (OSError, ValueError):
                missing.append(f"{key}/{shard_index.name} (unreadable)")
                continue
            missing.extend(f"{key}/{s}" for s in sorted(shards) if not (sub / s).is_file())
        is_model = (sub / "config.json").is_file()
        has_weights = any(sub.glob("*.safetensors")) or any(sub.glob("*.bin"))
        if is_model and not has_weights:
            missing.append(f"{key}/ weights")
    return missing


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of ``repo_id`` if its model_index.json is cached, else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=str(hf_cache_dir()))
    except Exception:  # a malformed cache entry counts as absent
        return None
    return Path(path).parent if isinstance(path, str) else None


def _how_to_get(spec: ModelSpec) -> str:
    return (
        f"On a machine with network run `hf download {spec.repo_id}` (`huggingface-cli download "
        f"{spec.repo_id}` with huggingface_hub < 1.0) and copy the cache here or point HF_HOME / "
        f"HF_HUB_CACHE at it, or pass --model-path /path/to/folder (model_path=...) naming a "
        f"diffusers pipeline folder (one with model_index.json)."
    )


def _check_pipeline_folder(spec: ModelSpec, path: Path) -> None:
    if not path.is_dir():
        raise ModelNotAvailableError(
            f"--model-path {path} is not a folder. Pass the folder of a diffusers pipeline "
            f"(the one holding model_index.json), e.g. a local copy of {spec.repo_id or spec.name}."
        )
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelNotAvailableError(
            f"--model-path {path} is not a diffusers pipeline folder: it has no model_index.json. "
            f"Point it at the folder that holds model_index.json and the transformer/, vae/, ... "
            f"subfolders (for a Hub download: .../snapshots/<revision>/)."
        )
    try:
        found = json.loads(index_file.read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(f"{index_file} cannot be read ({_first_line(exc)}).") from None
    if found != spec.pipeline_class:
        raise ModelNotAvailableError(
            f"--model-path {path} holds a {found} but {spec.name} needs a {spec.pipeline_class}; "
            f"pick the model name whose pipeline class matches the folder."
        )


def _restore_hint(spec: ModelSpec) -> str:
    if spec.is_bundled:
        flag = " --causal" if spec.name.endswith("-causal") else ""
        return (f"Restore the shipped files (`git checkout -- pipelines/weights/{spec.bundled}` in a clone of gen, "
                f"or reinstall gen), or retrain them with `gen train-tiny{flag}`.")
    return "Delete the folder to rebuild it."


def _damaged(spec: ModelSpec, source: Path, what: str) -> None:
    """Raise ``ModelNotAvailableError`` naming every problem ``check_folder`` finds."""
    problems = check_folder(source)
    if problems:
        raise ModelNotAvailableError(
            f"{spec.name} at {what} {source} is incomplete or damaged: {'; '.join(problems)}. {_restore_hint(spec)}"
        )


def _from_pretrained(spec: ModelSpec, source: Path, dtype: torch.dtype | str | None, what: str):
    try:
        return _pipeline_class(spec).from_pretrained(
            str(source), local_files_only=True, **_dtype_kwargs(spec, dtype)
        )
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        missing, problems = _component_problems(source), check_folder(source)
        detail = (f"; missing: {', '.join(missing)}" if missing else "") + (
            f"; problems: {'; '.join(problems)}" if problems else "")
        hint = _how_to_get(spec) if spec.repo_id else _restore_hint(spec)
        raise ModelNotAvailableError(
            f"Could not load {spec.name} from {what} {source} ({_first_line(exc)}){detail}. {hint}"
        ) from None


def load(
    name: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    model_path: str | os.PathLike | None = None,
):
    """Load model ``name`` as a diffusers pipeline, offline.

    Args:
        name: a key of ``MODELS`` (see ``list_models()``).
        device: where to move the pipeline, e.g. ``"cuda"``.
        dtype: parameter dtype (``torch.dtype`` or a name such as ``"bfloat16"``); default
            the spec's. Components in ``spec.fp32_components`` stay float32.
        model_path: a local diffusers pipeline folder (with model_index.json) to load
            instead of the Hub cache / tiny cache.

    Returns:
        The pipeline (of class ``spec.pipeline_class``) on ``device`` with its progress bar
        enabled. Tiny models are built and saved to ``tiny_cache_folder(name)`` on first
        use, then always loaded from there with ``from_pretrained``.

    Raises:
        ValueError: unknown name or dtype.
        ModelNotAvailableError: weights not in the local Hugging Face cache, a
            ``model_path`` that is not a matching pipeline folder, or a folder that fails
            to load (e.g. an interrupted download); the message says what to do.
    """
    spec = get_spec(name)
    if model_path is not None:
        source = Path(model_path).expanduser()
        _check_pipeline_folder(spec, source)
        if read_manifest(source) is not None:  # a gen-trained folder: its checksums are known
            _damaged(spec, source, "--model-path")
        pipe = _from_pretrained(spec, source, dtype, "--model-path")
    elif spec.is_bundled:
        source = bundled_folder(spec)
        _damaged(spec, source, "the bundled folder")
        pipe = _from_pretrained(spec, source, dtype, "the bundled folder")
    elif spec.is_tiny:
        source = ensure_tiny_folder(spec.name)
        pipe = _from_pretrained(spec, source, dtype, "the tiny-model cache")
    else:
        snapshot = _cached_snapshot(spec.repo_id)
        if snapshot is None:
            raise ModelNotAvailableError(
                f"Weights for {spec.name} ({spec.repo_id}) were not found in the Hugging Face "
                f"cache at {hf_cache_dir()}, and gen never downloads them. {_how_to_get(spec)}"
            )
        missing = _component_problems(snapshot)
        if missing:
            raise ModelNotAvailableError(
                f"The cached copy of {spec.repo_id} at {snapshot} is incomplete (missing: "
                f"{', '.join(missing)}); the download was probably interrupted. {_how_to_get(spec)}"
            )
        pipe = _from_pretrained(spec, snapshot, dtype, "the Hugging Face cache")
    pipe.to(device)
    # remembered so gen.sparsify picks this model's method presets
    pipe.__dict__["_gen_model_name"] = spec.name
    realign_cpu_tensors(m for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    pipe.set_progress_bar_config(disable=False)
    return pipe


def list_models() -> list[tuple[ModelSpec, bool, str]]:
    """Every model with whether it can load offline here and from where.

    Returns:
        ``(spec, available, where)`` per model, in ``MODELS`` order. Tiny models are always
        available (``where`` is their cache folder, built on first use); real ones are
        available when the local Hugging Face cache holds a complete snapshot (checked
        from files only, no network).
    """
    rows: list[tuple[ModelSpec, bool, str]] = []
    for spec in MODELS.values():
        if spec.is_tiny:
            folder = tiny_cache_folder(spec.name)
            built = (folder / "model_index.json").is_file()
            rows.append((spec, True, str(folder) if built else f"built on first use into {folder}"))
            continue
        if spec.is_bundled:
            folder = bundled_folder(spec)
            problems = check_folder(folder)
            rows.append((spec, not problems, str(folder) if not problems else f"damaged at {folder} ({'; '.join(problems)})"))
            continue
        snapshot = _cached_snapshot(spec.repo_id)
        if snapshot is None:
            rows.append((spec, False, f"not in the Hugging Face cache ({hf_cache_dir()})"))
            continue
        missing = _component_problems(snapshot)
        if missing:
            rows.append((spec, False, f"incomplete at {snapshot} (missing {', '.join(missing)})"))
        else:
            rows.append((spec, True, str(snapshot)))
    return rows
