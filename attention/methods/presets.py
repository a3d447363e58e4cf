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
    # Radial: the reference's scripts (50 steps). Video-video block density at the native
    # grid (radial_block_mask, 128-token blocks): Wan 14B 720p 0.262, Wan 1.3B 480p 0.339,
    # HunyuanVideo 720p 129 frames 0.270 (token-weighted; the reference's own port gives
    # 0.275 at 32 frames x 3600 tokens, which this code reproduces).
    "radial": {
        "wan2.1-t2v-14b": dict(decay=0.2, dense_steps=12, dense_layers=1, sink=True),
        "wan2.1-i2v-14b-480p": dict(decay=0.2, dense_steps=12, dense_layers=1, sink=True),
        "wan2.1-i2v-14b-720p": dict(decay=0.2, dense_steps=12, dense_layers=1, sink=True),
        # The reference ships no 1.3B settings. The 14B ones at 480p give density 0.339
        # (ideal 2.9x) and keep the first layer and the first 12 of 50 steps dense, as
        # its scripts do for 14B; γ=1.0 would only reach 0.445.
        "wan2.1-t2v-1.3b": dict(decay=0.2, dense_steps=12, dense_layers=1, sink=True),
        "hunyuanvideo": dict(decay=0.95, dense_steps=12, dense_layers=0, sink=False),
        "wan": dict(decay=0.2, dense_steps=12, dense_layers=1, sink=True),
        "hunyuan": dict(decay=0.95, dense_steps=12, dense_layers=0, sink=False),
        # tiny models: 64-token frames, 2 steps: 16-token blocks and no dense schedule so
        # the pattern is visible at all (density 0.865 Wan, 0.920 HunyuanVideo)
        "tiny-wan": dict(decay=0.2, block_size=16, sink=True),
        "tiny-wan-i2v": dict(decay=0.2, block_size=16, sink=True),
        "tiny-hunyuan": dict(decay=0.95, block_size=16, sink=False),
    },
}


def preset_for(method: str, *, model: str | None = None, family: str | None = None) -> dict:
    """Config overrides for ``method`` on ``model`` (or ``family``); ``{}`` when none."""
    table = PRESETS.get(method, {})
    for key in (model, family):
        if key is not None and key in table:
            return dict(table[key])
    return {}
