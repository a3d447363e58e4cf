"""gen.sparsify on the tiny offline pipelines, end to end (fp32, CPU): Wan T2V, Wan I2V
(image-context branch), HunyuanVideo (short prompts: padded text) and FLUX (text first).
The stock pipeline's output is the reference."""

import numpy as np
import pytest
import torch
from PIL import Image

import gen
from gen.attention.methods import DenseConfig
from gen.pipelines import get_spec, load

NAMES = ["tiny-wan", "tiny-wan-i2v", "tiny-hunyuan", "tiny-flux"]
ALL_BLOCKS = lambda qt, qh, qw, kt, kh, kw: torch.ones((), dtype=torch.bool)
SAME_FRAME_NEAR_ROWS = lambda qt, qh, qw, kt, kh, kw: ((qt - kt).abs() == 0) & ((qh - kh).abs() <= 2)


@pytest.fixture(scope="module")
def pipes():
    return {}


def _pipe(pipes, name):
    if name not in pipes:
        pipes[name] = load(name)
        pipes[name].set_progress_bar_config(disable=True)
    return pipes[name]


def _run(pipe, name, steps=2, seed=0):
    spec = get_spec(name)
    kw = dict(prompt="a red ball", num_inference_steps=steps, height=spec.height, width=spec.width,
              guidance_scale=spec.guidance, generator=torch.Generator().manual_seed(seed), output_type="np")
    if spec.is_video:
        kw["num_frames"] = spec.frames
    if spec.task == "i2v":
        rng = np.random.default_rng(0)
        kw["image"] = Image.fromarray(rng.integers(0, 255, (spec.height, spec.width, 3), dtype=np.uint8))
    with torch.no_grad():
        out = pipe(**kw)
    return np.asarray(out.images if spec.task == "t2i" else out.frames)


@pytest.mark.parametrize("name", NAMES)
def test_dense_matches_stock_restore_is_exact_masks_behave(pipes, name):
    pipe = _pipe(pipes, name)
    stock = _run(pipe, name)
    with gen.sparse(pipe, "dense") as handle:
        dense = _run(pipe, name)
        summary = handle.summary()["transformers"][0]
    assert summary["sparse_calls"] > 0 and summary["dense_calls"] == 0
    np.testing.assert_allclose(dense, stock, atol=1e-4, rtol=0)
    assert np.array_equal(_run(pipe, name), stock), "restore must give back the stock output bit for bit"
    with gen.sparse(pipe, "mask", pattern=ALL_BLOCKS):
        np.testing.assert_allclose(_run(pipe, name), stock, atol=1e-4, rtol=0)
    with gen.sparse(pipe, "mask", pattern=SAME_FRAME_NEAR_ROWS, block_m=16, block_n=16) as handle:
        sparse = _run(pipe, name)
        layout = next(iter(handle.patches[0].run.stats.layouts))
        assert handle.method.plan(layout, 2).density() < 0.8  # video-video pairs
    assert np.abs(sparse - stock).max() > 1e-3
    assert np.array_equal(_run(pipe, name), stock)


def test_i2v_cross_attention_keeps_image_branch(pipes):
    pipe = _pipe(pipes, "tiny-wan-i2v")
    attn2 = pipe.transformer.blocks[0].attn2
    before = attn2.processor
    assert attn2.add_k_proj is not None  # the image-context branch exists
    with gen.sparse(pipe, "dense"):
        assert attn2.processor is before  # and stays stock


@pytest.mark.parametrize("name, calls_per_step", [("tiny-wan", 2), ("tiny-flux", 1), ("tiny-hunyuan", 1)])
def test_step_index_under_cfg_and_across_runs(pipes, name, calls_per_step):
    """Wan runs CFG as two calls per step (and passes step_index); FLUX and HunyuanVideo
    one guidance-embedded call (no step_index: counted). A second run starts at step 0."""
    pipe = _pipe(pipes, name)
    layers = len(gen.attention.processors.attention_modules(pipe.transformer))
    with gen.sparse(pipe, DenseConfig(dense_steps=1)) as handle:
        for run in (1, 2):
            _run(pipe, name, steps=3)
            s = handle.summary()["transformers"][0]
            assert s["dense_calls"] == run * 1 * calls_per_step * layers
            assert s["sparse_calls"] == run * 2 * calls_per_step * layers


def test_sparsify_leaves_other_components_alone(pipes):
    pipe = _pipe(pipes, "tiny-hunyuan")
    refiner = pipe.transformer.context_embedder.token_refiner.refiner_blocks[0].attn.processor
    before = {n: id(m) for n, m in pipe.components.items()}
    with gen.sparse(pipe, "dense"):
        assert pipe.transformer.context_embedder.token_refiner.refiner_blocks[0].attn.processor is refiner
        assert {n: id(m) for n, m in pipe.components.items()} == before
    assert not hasattr(pipe, "_gen_sparse_handle")
