"""FLEX: temporal RoPE modulation on the tables, antiphase noise statistics, `gen long --flex`."""

import math

import pytest
import torch
from typer.testing import CliRunner

from gen.cli import app
from gen.pipelines.ar.flex import (
    AntiphaseNoiseSampler,
    FlexConfig,
    flex_chunk_config,
    flex_rope_tables,
    rope_gamma,
)
from gen.pipelines.ar.schedules import ChunkConfig, SinkWindowConfig
from gen.pipelines.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def transformer():
    return build_tiny_pipeline("tiny-wan").transformer.eval()


def test_rope_modulation_keeps_high_and_rescales_low(transformer):
    rope = transformer.rope
    t = rope.t_dim
    stock_cos, stock_sin = rope.freqs_cos[:, :t].double(), rope.freqs_sin[:, :t].double()
    omegas = torch.atan2(stock_sin[1, ::2], stock_cos[1, ::2])
    # train 16 frames: pair 0 turns 2.5 times (kept), the others < 1 (interpolated)
    cfg = FlexConfig(train_frames=16)
    g = rope_gamma(omegas, 16, cfg.split, cfg.blend)
    assert (g == 1).any() and (g == 0).any(), g  # the tiny tables have both kinds
    target = 80  # s = 5
    cos, sin = flex_rope_tables(transformer, cfg, target)
    assert cos.shape == (max(rope.freqs_cos.shape[0], target), t)
    pos = torch.arange(cos.shape[0], dtype=torch.float64)[:, None]
    for j in range(t // 2):
        cols = slice(2 * j, 2 * j + 2)
        if g[j] == 1:  # high frequency: untouched (extrapolated)
            assert torch.allclose(cos[:, cols], stock_cos[:, cols], atol=1e-12)
            assert torch.allclose(sin[:, cols], stock_sin[:, cols], atol=1e-12)
            continue
        expect = g[j] * omegas[j] + (1 - g[j]) * omegas[j] / 5  # low: w / s (interpolated); blend between
        assert torch.allclose(cos[:, cols], (pos * expect).cos().expand(-1, 2), atol=1e-9)
        assert torch.allclose(sin[:, cols], (pos * expect).sin().expand(-1, 2), atol=1e-9)
    # a low-frequency pair at position s*p sits where the stock one did at p
    low = int((g == 0).nonzero()[0])
    assert torch.allclose(cos[5 * 7, 2 * low], stock_cos[7, 2 * low], atol=1e-6)
    # off, or no extension: the model's own tables
    for c in (FlexConfig(train_frames=16, rope=False), FlexConfig(train_frames=128)):
        cos, sin = flex_rope_tables(transformer, c, 80)
        assert torch.allclose(cos, stock_cos, atol=1e-12) and torch.allclose(sin, stock_sin, atol=1e-12)


def test_wan_default_split_matches_the_notes():
    omegas = 10000.0 ** (-torch.arange(0, 44, 2, dtype=torch.float64) / 44)
    g = rope_gamma(omegas, 21, 1.0, 2.0)
    assert g[:2].tolist() == [1.0, 1.0] and 0 < g[2] < 1 and (g[3:] == 0).all()
    assert 2 * math.pi / omegas[3] > 21


def test_antiphase_noise_statistics():
    a = 0.5
    shape = (2, 16, 4, 32, 32)
    s = AntiphaseNoiseSampler(seed=3, strength=a)
    x = torch.stack([s.initial(c, shape) for c in range(8)])  # (chunks, B, C, F, H, W)
    frames = x.transpose(0, 3).reshape(4, -1).double()  # (F, samples)
    assert torch.allclose(frames.std(1), torch.ones(4, dtype=torch.float64), atol=0.02)  # each frame N(0, 1)
    corr = torch.corrcoef(frames)
    for i in range(3):
        assert corr[i, i + 1] == pytest.approx(-a, abs=0.02)  # neighbours antiphase
    assert corr[0, 2] == pytest.approx(a, abs=0.02)
    plain = AntiphaseNoiseSampler(seed=3, strength=0.0).initial(0, shape)
    assert torch.corrcoef(plain.transpose(0, 2).reshape(4, -1))[0, 1].abs() < 0.02
    assert torch.equal(s.renoise(0, 1, shape), AntiphaseNoiseSampler(seed=3).renoise(0, 1, shape))  # unchanged
    assert torch.equal(s.initial(2, shape), AntiphaseNoiseSampler(seed=3, strength=a).initial(2, shape))  # seeded


def test_flex_sink_and_bad_input():
    cfg = flex_chunk_config(ChunkConfig(), FlexConfig())
    assert isinstance(cfg, SinkWindowConfig) and (cfg.window_frames, cfg.sink_frames) == (21, 3)
    assert flex_chunk_config(ChunkConfig(), FlexConfig(sink=False)) == ChunkConfig()
    with pytest.raises(ValueError, match="split < blend"):
        FlexConfig(split=2.0, blend=1.0)
    with pytest.raises(ValueError, match="antiphase_strength"):
        FlexConfig(antiphase_strength=1.0)


@pytest.mark.parametrize("schedule", ["chunk", "rolling"])
def test_cli_long_flex(tmp_path, schedule):
    out = tmp_path / "f.mp4"
    r = CliRunner().invoke(app, ["long", "a cat", "--schedule", schedule, "--flex", "--seconds", "1", "--height",
                                 "32", "--width", "32", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file()
