"""Per-model long-video settings are data: presets merge over the published defaults."""

import pytest

from gen.pipelines import MODELS
from gen.pipelines.ar.flex import FlexConfig
from gen.pipelines.ar.presets import AR_PRESETS, flex_config, schedule_config
from gen.pipelines.ar.rolling import RollingConfig
from gen.pipelines.ar.schedules import ChunkConfig, SinkWindowConfig


def test_models_without_a_preset_get_the_published_defaults():
    assert schedule_config("chunk", "wan2.1-t2v-1.3b") == ChunkConfig()
    assert schedule_config("sink", None) == SinkWindowConfig()
    assert schedule_config("rolling", "tiny-wan") == RollingConfig()
    assert flex_config("wan2.1-t2v-1.3b") == FlexConfig()


def test_shapes_causal_presets_stay_within_its_training_window():
    from gen.pipelines.shapes.config import CausalTrain

    train = CausalTrain()
    sink = schedule_config("sink", "shapes-wan-causal")
    assert sink.window_frames <= train.window_frames and sink.chunk_frames == train.chunk_frames
    assert sink.positions == "relative"
    rolling = schedule_config("rolling", "shapes-wan-causal")
    assert rolling.max_attention_frames <= train.window_frames and rolling.levels == train.rolling_chunks
    assert flex_config("shapes-wan-causal").train_frames == train.window_frames
    assert set(AR_PRESETS) <= set(MODELS)


def test_overrides_and_bad_fields():
    assert schedule_config("sink", "shapes-wan-causal", sink_frames=0).sink_frames == 0
    with pytest.raises(ValueError, match="no field"):
        schedule_config("chunk", None, window_frames=3)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_config("spiral")


def test_euler_and_renoise_steps_on_an_exact_flow(seed):
    import torch

    from gen.pipelines.ar.schedules import step_to

    x0, eps, fresh = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    sigma, nxt = 0.8, 0.3
    x = (1 - sigma) * x0 + sigma * eps
    v = eps - x0  # the exact flow of a straight path
    assert torch.allclose(step_to(x, x0, v, sigma, nxt, "euler", lambda: fresh), (1 - nxt) * x0 + nxt * eps, atol=1e-6)
    assert torch.allclose(step_to(x, x0, v, sigma, nxt, "renoise", lambda: fresh), (1 - nxt) * x0 + nxt * fresh)
    with pytest.raises(ValueError, match="sampler"):
        ChunkConfig(sampler="heun")
