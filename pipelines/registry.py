"""The model registry: what each model is, what it can take, and how to load it offline.

The public face of three modules, which hold the parts:

- ``specs.py``: ``ModelSpec`` and ``MODELS`` (the data: pipeline class, repository,
  default size and sampling, VAE scale and patch size, geometry rules), ``get_spec``,
  ``check_geometry``; a spec gives the token grid and ``TokenLayout`` of a render;
- ``loading.py``: ``load(name)`` (offline: tiny cache, bundled folders with checksums,
  the local Hugging Face cache or ``model_path``; ``ModelNotAvailableError`` saying how to
  get what is missing) and ``list_models()``;
- ``caches.py``: gen's cache (tiny pipelines built once and published atomically), the
  bundled folders, the Hugging Face cache location.

``from gen.pipelines.registry import X`` keeps working for every name below.
"""

from __future__ import annotations

from .caches import (
    TINY_CACHE_VERSION,
    bundled_folder,
    gen_cache_dir,
    hf_cache_dir,
    tiny_cache_folder,
)
from .loading import ModelNotAvailableError, list_models, load
from .specs import MODELS, SHAPES_GUIDANCE, SHAPES_STEPS, ModelSpec, check_geometry, get_spec
from .tiny import TINY_NAMES

__all__ = [
    "MODELS",
    "ModelNotAvailableError",
    "ModelSpec",
    "SHAPES_GUIDANCE",
    "SHAPES_STEPS",
    "TINY_CACHE_VERSION",
    "bundled_folder",
    "check_geometry",
    "gen_cache_dir",
    "get_spec",
    "hf_cache_dir",
    "list_models",
    "load",
    "tiny_cache_folder",
]

assert set(TINY_NAMES) == {s.name for s in MODELS.values() if s.is_tiny}, "tiny specs and builders disagree"
