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
    # PSA: the authors' configs/attention_config.yaml (Gilbert order, tile_n 32, dense warm-up
    # 15 of 50 steps). Wan 14B: psa_balanced (128x128 blocks, cumulative-mass bounds
    # 0.4/0.5/0.6/0.8 for levels 1/2/4/8, the rest skipped). Wan 1.3B: psa_topk (128x32
    # blocks, 5/5/5/10 % of the key blocks at levels 1/2/4/8, 75 % skipped); their default
    # 1.3B preset needs the legacy kernel's similarity mask, which gen does not implement.
    # HunyuanVideo and FLUX have no authors' preset: the 14B settings (FLUX: 64-token key
    # blocks for its 4096 image tokens, warm-up 7 of 28 steps dev, 1 of 4 schnell) are gen's
    # unmeasured choice.
    "psa": {
        "wan2.1-t2v-14b": dict(block_m=128, block_n=128, mode="threshold", bounds=(0.4, 0.5, 0.6, 0.8), dense_steps=15),
        "wan2.1-i2v-14b-480p": dict(block_m=128, block_n=128, mode="threshold", bounds=(0.4, 0.5, 0.6, 0.8),
                                    dense_steps=15),
        "wan2.1-i2v-14b-720p": dict(block_m=128, block_n=128, mode="threshold", bounds=(0.4, 0.5, 0.6, 0.8),
                                    dense_steps=15),
        "wan2.1-t2v-1.3b": dict(block_m=128, block_n=32, mode="topk", bounds=(0.05, 0.10, 0.15, 0.25), dense_steps=15),
        "hunyuanvideo": dict(block_m=128, block_n=128, mode="threshold", bounds=(0.4, 0.5, 0.6, 0.8), dense_steps=15),
        "flux.1-dev": dict(block_m=128, block_n=64, mode="threshold", bounds=(0.4, 0.5, 0.6, 0.8), dense_steps=7),
        "flux.1-schnell": dict(block_m=128, block_n=64, mode="threshold", bounds=(0.4, 0.5, 0.6, 0.8), dense_steps=1),
        "wan": dict(block_m=128, block_n=128, mode="threshold", bounds=(0.4, 0.5, 0.6, 0.8), dense_steps=15),
        "hunyuan": dict(block_m=128, block_n=128, mode="threshold", bounds=(0.4, 0.5, 0.6, 0.8), dense_steps=15),
        "flux": dict(block_m=128, block_n=64, mode="threshold", bounds=(0.4, 0.5, 0.6, 0.8), dense_steps=7),
        # tiny models (320 tokens, 2 steps): 32x16 blocks, the 16-key tile (4 visits a tile at level 8)
        "tiny-wan": dict(block_m=32, block_n=16, tile_n=16),
        "tiny-wan-i2v": dict(block_m=32, block_n=16, tile_n=16),
        "tiny-hunyuan": dict(block_m=32, block_n=16, tile_n=16),
        "tiny-flux": dict(block_m=32, block_n=16, tile_n=16),
        # shapes-wan (5x8x8, 25 steps): 32x16 blocks (20 key blocks), the 14B bounds, the
        # authors' warm-up scaled (the first 7 of 25 steps dense)
        "shapes-wan": dict(block_m=32, block_n=16, tile_n=16, mode="threshold", bounds=(0.4, 0.5, 0.6, 0.8),
                           dense_steps=7),
        "shapes-wan-causal": dict(block_m=32, block_n=16, tile_n=16, mode="threshold", bounds=(0.4, 0.5, 0.6, 0.8),
                                  dense_steps=7),
    },
    # VMoBA: FastVideo's stored Wan 2.1 1.3B config (77 frames, 448x832): threshold 0.25 per
    # query token and head, chunks 2 frames / 4x13 patches / 4x4x13 cubes (2,912 / 1,040 /
    # 208 tokens at 20x28x52), no dense steps (the config's first_full_step is never read)
    # and no dense layers (first_full_layer is not in the notes: 0). At 480p (21x30x52) the
    # same chunks leave ragged edge chunks (11 / 32 / 192 chunks). The authors' other configs
    # are for Wan 1.3B only: 14B, HunyuanVideo and FLUX chunks are gen's choice (about the
    # 1.3B chunk counts; FLUX 2-D only), unmeasured.
    "vmoba": {
        "wan2.1-t2v-1.3b": dict(chunks_1d=2, chunks_2d=(4, 13), chunks_3d=(4, 4, 13), select="threshold", tau=0.25),
        "wan2.1-i2v-14b-480p": dict(chunks_1d=2, chunks_2d=(4, 13), chunks_3d=(4, 4, 13), select="threshold",
                                    tau=0.25),
        # 21x45x80: 11 / 36 / 120 chunks
        "wan2.1-t2v-14b": dict(chunks_1d=2, chunks_2d=(5, 20), chunks_3d=(4, 9, 20), select="threshold", tau=0.25),
        "wan2.1-i2v-14b-720p": dict(chunks_1d=2, chunks_2d=(5, 20), chunks_3d=(4, 9, 20), select="threshold",
                                    tau=0.25),
        # 33x45x80: 11 / 36 / 120 chunks
        "hunyuanvideo": dict(chunks_1d=3, chunks_2d=(5, 20), chunks_3d=(6, 9, 20), select="threshold", tau=0.25),
        # 64x64 image tokens (1024 px): 16 patches of 16x16, spatial chunks only
        "flux.1-dev": dict(chunks_2d=(16, 16), partitions="2d", select="threshold", tau=0.25),
        "flux.1-schnell": dict(chunks_2d=(16, 16), partitions="2d", select="threshold", tau=0.25),
        "wan": dict(chunks_1d=2, chunks_2d=(4, 13), chunks_3d=(4, 4, 13), select="threshold", tau=0.25),
        "hunyuan": dict(chunks_1d=3, chunks_2d=(5, 20), chunks_3d=(6, 9, 20), select="threshold", tau=0.25),
        "flux": dict(chunks_2d=(16, 16), partitions="2d", select="threshold", tau=0.25),
        # tiny models and shapes-wan (5x8x8): 3 / 4 / 12 chunks (2 frames, 4x4, 2x4x4)
        "tiny-wan": dict(chunks_1d=2, chunks_2d=(4, 4), chunks_3d=(2, 4, 4)),
        "tiny-wan-i2v": dict(chunks_1d=2, chunks_2d=(4, 4), chunks_3d=(2, 4, 4)),
        "tiny-hunyuan": dict(chunks_1d=2, chunks_2d=(4, 4), chunks_3d=(2, 4, 4)),
        "tiny-flux": dict(chunks_2d=(4, 4), partitions="2d"),
        "shapes-wan": dict(chunks_1d=2, chunks_2d=(4, 4), chunks_3d=(2, 4, 4), select="threshold", tau=0.25),
        "shapes-wan-causal": dict(chunks_1d=2, chunks_2d=(4, 4), chunks_3d=(2, 4, 4), select="threshold", tau=0.25),
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
    # PSA decides per call; only its topk presets have the same level counts in every row
    # (Wan 1.3B psa_topk: 51/51/51/103 of 1024 key blocks at levels 1/2/4/8, Σ 1/L)
    "psa": {
        "wan2.1-t2v-1.3b": ("21x30x52", 0.0997314453125),
    },
}
