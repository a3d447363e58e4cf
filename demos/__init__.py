"""The Gradio demo (``gen.demos``): generate with a sparse attention method, compare it
with dense from the same seed, and look at its block masks.

    gen demo                      # http://127.0.0.1:7860, this machine only
    python -m gen.demos --port 7861

From Python: ``create_app(loader=..., outputs_dir=...)`` builds the app and
``launch(app)`` serves it; see ``app.py``. Importing this package does not import
Gradio; the names below load on first use.
"""

from __future__ import annotations

import importlib

__all__ = ["create_app", "launch", "serve"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("gen.demos.app"), name)
    raise AttributeError(f"module 'gen.demos' has no attribute {name!r}")
