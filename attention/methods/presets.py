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
        # shapes-wan (trained, 5x8x8, 25 steps): the reference's schedule scaled to 25 steps
        # (first 6 steps and the first of 4 layers dense), 16-token blocks
        "shapes-wan": dict(decay=0.2, block_size=16, sink=True, dense_steps=6, dense_layers=1),
        "shapes-wan-causal": dict(decay=0.2, block_size=16, sink=True, dense_steps=6, dense_layers=1),
    },
    # GNA: all fully block-sparse at the native grid (no partial tile pairs, so no PyTorch
    # correction). "density" = allowed token pairs (NATTEN's FLOP bound); "compute" = tile
    # pairs run, padding included, over dense. An axis whose extent the tile does not
    # divide (33, 45, 21, 30) can only be block-aligned with tile 1 or a full window (-1),
    # so T gets tile 1 and H a full window; W carries the window and stride.
    # NATTEN's own 18x24x24 / 16x8x8 / (2,8,8) has 15% partial pairs at 33x45x80.
    # Dense steps/layers for GNA are unverified in the notes: none by default.
    "gna": {
        # 33x45x80: ±5 frames, all rows, 24 columns: density 0.100, compute 0.114
        "hunyuanvideo": dict(window=(11, -1, 24), stride=(1, 1, 8), tile=(1, 16, 8)),
        # 21x30x52 (1.3B is sensitive to sparsity): density 0.198, compute 0.225
        "wan2.1-t2v-1.3b": dict(window=(9, -1, 24), stride=(1, 1, 8), tile=(1, 32, 4)),
        # 21x30x52: density 0.154, compute 0.175
        "wan2.1-i2v-14b-480p": dict(window=(7, -1, 24), stride=(1, 1, 8), tile=(1, 32, 4)),
        # 21x45x80: density 0.100, compute 0.114
        "wan2.1-t2v-14b": dict(window=(7, -1, 24), stride=(1, 1, 8), tile=(1, 16, 8)),
        "wan2.1-i2v-14b-720p": dict(window=(7, -1, 24), stride=(1, 1, 8), tile=(1, 16, 8)),
        # 64x64 (1024 px): 24x24 window, stride 8: density = compute 0.141
        "flux.1-dev": dict(window=(24, 24), stride=(8, 8), tile=(8, 8)),
        "flux.1-schnell": dict(window=(24, 24), stride=(8, 8), tile=(8, 8)),
        "flux": dict(window=(24, 24), stride=(8, 8), tile=(8, 8)),
        "wan": dict(window=(9, -1, 24), stride=(1, 1, 8), tile=(1, 32, 4)),
        "hunyuan": dict(window=(11, -1, 24), stride=(1, 1, 8), tile=(1, 16, 8)),
        # tiny models, 5x8x8 (16-token tiles): density 0.150; 16x16: density 0.5625
        "tiny-wan": dict(window=(3, 4, 4), stride=(1, 4, 4), tile=(1, 4, 4)),
        "tiny-wan-i2v": dict(window=(3, 4, 4), stride=(1, 4, 4), tile=(1, 4, 4)),
        "tiny-hunyuan": dict(window=(3, 4, 4), stride=(1, 4, 4), tile=(1, 4, 4)),
        "tiny-flux": dict(window=(12, 12), stride=(4, 4), tile=(4, 4)),
        # shapes-wan, 5x8x8: ±1 frame, 4x4 tiles: density 0.150 (as tiny-wan)
        "shapes-wan": dict(window=(3, 4, 4), stride=(1, 4, 4), tile=(1, 4, 4)),
        "shapes-wan-causal": dict(window=(3, 4, 4), stride=(1, 4, 4), tile=(1, 4, 4)),
    },
    # Rectified SpaAttn: the authors' scripts (128-token blocks, p 0.3). Wan 2.1: drop 0.75,
    # the first 2 layers and the first 10 forward calls (5 steps with CFG) dense, for 14B and
    # (same parameters, commented out in their script) 1.3B; I2V: 2 layers only.
    # HunyuanVideo: drop 0.8, nothing dense. FLUX: drop 0.9, processors 37-56 (the last 20
    # single blocks) dense; one frame, so no first-frame blocks.
    "rectified": {
        "wan2.1-t2v-14b": dict(p=0.3, drop_rate=0.75, dense_steps=5, dense_layers=2),
        "wan2.1-t2v-1.3b": dict(p=0.3, drop_rate=0.75, dense_steps=5, dense_layers=2),
        "wan2.1-i2v-14b-480p": dict(p=0.3, drop_rate=0.75, dense_layers=2),
        "wan2.1-i2v-14b-720p": dict(p=0.3, drop_rate=0.75, dense_layers=2),
        "hunyuanvideo": dict(p=0.3, drop_rate=0.8),
        "flux.1-dev": dict(p=0.3, drop_rate=0.9, dense_layers=tuple(range(37, 57)), first_frame=False),
        "flux.1-schnell": dict(p=0.3, drop_rate=0.9, dense_layers=tuple(range(37, 57)), first_frame=False),
        "wan": dict(p=0.3, drop_rate=0.75, dense_steps=5, dense_layers=2),
        "hunyuan": dict(p=0.3, drop_rate=0.8),
        "flux": dict(p=0.3, drop_rate=0.9, dense_layers=tuple(range(37, 57)), first_frame=False),
        # tiny models (256-320 tokens, 2 steps): 16-token blocks so there is something to drop
        "tiny-wan": dict(block_size=16),
        "tiny-wan-i2v": dict(block_size=16),
        "tiny-hunyuan": dict(block_size=16),
        "tiny-flux": dict(block_size=16, first_frame=False),
        # shapes-wan (5x8x8, 25 steps, 4 layers): 16-token blocks, the authors' schedule
        # scaled (first 3 of 25 steps and the first of 4 layers dense)
        "shapes-wan": dict(block_size=16, p=0.3, drop_rate=0.75, dense_steps=3, dense_layers=1),
        "shapes-wan-causal": dict(block_size=16, p=0.3, drop_rate=0.75, dense_steps=3, dense_layers=1),
    },
}


def preset_for(method: str, *, model: str | None = None, family: str | None = None) -> dict:
    """Config overrides for ``method`` on ``model`` (or ``family``); ``{}`` when none."""
    table = PRESETS.get(method, {})
    for key in (model, family):
        if key is not None and key in table:
            return dict(table[key])
    return {}


# What ``gen methods`` prints next to each model preset: ``(grid, density)``, the model's
# native video grid (frames x height x width in tokens, no text) and the fraction of
# query-key pairs the preset computes there. Derived numbers, recorded because building a
# plan at a model's full size takes seconds; tests/test_cli_speed.py recomputes every
# entry and fails when a preset, a method or a model's geometry moves one.
PRESET_DENSITIES: dict[str, dict[str, tuple[str, float]]] = {
    "radial": {
        "wan2.1-t2v-14b": ("21x45x80", 0.26199853307578175),
        "wan2.1-i2v-14b-480p": ("21x30x52", 0.3388228594089399),
        "wan2.1-i2v-14b-720p": ("21x45x80", 0.26199853307578175),
        "wan2.1-t2v-1.3b": ("21x30x52", 0.3388228594089399),
        "hunyuanvideo": ("33x45x80", 0.2701598430999104),
        "tiny-wan": ("5x8x8", 0.865),
        "tiny-wan-i2v": ("5x8x8", 0.865),
        "tiny-hunyuan": ("5x8x8", 0.9200000000000002),
        "shapes-wan": ("5x8x8", 0.865),
        "shapes-wan-causal": ("5x8x8", 0.865),
    },
    "gna": {
        "hunyuanvideo": ("33x45x80", 0.11377777777777778),
        "wan2.1-t2v-1.3b": ("21x30x52", 0.22505494505494505),
        "wan2.1-i2v-14b-480p": ("21x30x52", 0.17504273504273504),
        "wan2.1-t2v-14b": ("21x45x80", 0.11377777777777778),
        "wan2.1-i2v-14b-720p": ("21x45x80", 0.11377777777777778),
        "flux.1-dev": ("1x64x64", 0.140625),
        "flux.1-schnell": ("1x64x64", 0.140625),
        "tiny-wan": ("5x8x8", 0.15),
        "tiny-wan-i2v": ("5x8x8", 0.15),
        "tiny-hunyuan": ("5x8x8", 0.15),
        "tiny-flux": ("1x16x16", 0.5625),
        "shapes-wan": ("5x8x8", 0.15),
        "shapes-wan-causal": ("5x8x8", 0.15),
    },
}
