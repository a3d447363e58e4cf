"""Model registry and loading, offline tiny models, presets and the long-video runner
(``gen.pipelines``). May import ``gen.attention``, diffusers and transformers.

Today: ``MODELS`` / ``ModelSpec`` (what each model is and can take), ``load`` (offline
loading with clear errors when weights are missing), ``list_models``, the tiny
random-weight pipelines of ``build_tiny_pipeline``, the trained ``shapes-wan`` models
(``shapes``: data, training, vision scoring; weights in ``weights/``) and the long-video
runner (``ar``); see README.md in this folder.
"""

from .registry import (
    MODELS,
    ModelNotAvailableError,
    ModelSpec,
    bundled_folder,
    check_geometry,
    get_spec,
    list_models,
    load,
)
from .tiny import build_tiny_pipeline

__all__ = [
    "MODELS",
    "ModelNotAvailableError",
    "ModelSpec",
    "build_tiny_pipeline",
    "bundled_folder",
    "check_geometry",
    "get_spec",
    "list_models",
    "load",
]
