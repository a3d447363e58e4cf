"""Per-model presets of the methods, as data.

``PRESETS[method][key]`` holds config overrides; ``key`` is a model name from the
registry (e.g. ``"wan2.1-t2v-1.3b"``) or a family (``"wan"``, ``"hunyuan"``, ``"flux"``).
Lookup order: the model name, then its family, then the config's own defaults. A
user's overrides always win. Methods add their entries with their own issue.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, dict]] = {
    "dense": {},
    "mask": {},
}


def preset_for(method: str, *, model: str | None = None, family: str | None = None) -> dict:
    """Config overrides for ``method`` on ``model`` (or ``family``); ``{}`` when none."""
    table = PRESETS.get(method, {})
    for key in (model, family):
        if key is not None and key in table:
            return dict(table[key])
    return {}
