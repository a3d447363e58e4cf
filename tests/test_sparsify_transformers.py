"""gen.sparsify on tiny Wan, HunyuanVideo and FLUX transformers (fp32, CPU).

Stock diffusers output is the reference: the dense method must reproduce it, restore
must bring it back bit for bit, an all-blocks mask equals dense and a real sparse mask
changes the output.
"""

import dataclasses

import pytest
import torch

import gen
from gen.attention import AttentionContext, TokenLayout
from gen.attention.methods import DenseConfig, MaskConfig, get_method
from gen.attention.processors import (
    FluxSparseAttnProcessor,
    HunyuanVideoSparseAttnProcessor,
    WanSparseAttnProcessor,
)

from tiny_transformers import FAMILIES, hunyuan_inputs, tiny_hunyuan, tiny_wan, wan_inputs

PROCESSOR = {"wan": WanSparseAttnProcessor, "hunyuan": HunyuanVideoSparseAttnProcessor,
             "flux": FluxSparseAttnProcessor}


def _run(t, inputs):
    with torch.no_grad():
        return t(**inputs)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_reproduces_stock_and_restore_is_exact(family):
    make, inputs = FAMILIES[family]
    t, x = make(), inputs()
    before = dict(t.attn_processors)
    forward_before = t.__dict__.get("forward")
    stock = _run(t, x)
    handle = gen.sparsify(t, "dense")
    swapped = {k: type(v) for k, v in t.attn_processors.items() if v is not before[k]}
    assert swapped and set(swapped.values()) == {PROCESSOR[family]}
    if family == "wan":  # cross-attention keeps its stock processor
        assert all(".attn1." in k for k in swapped)
    if family == "hunyuan":  # the token refiner keeps its stock processor
        assert not any("token_refiner" in k for k in swapped)
    torch.testing.assert_close(_run(t, x), stock, atol=1e-4, rtol=0)
    assert handle.summary()["transformers"][0]["sparse_calls"] > 0
    gen.restore(t)
    assert all(t.attn_processors[k] is v for k, v in before.items())
    assert t.__dict__.get("forward") is forward_before and not hasattr(t, "_gen_sparse_patch")
    assert torch.equal(_run(t, x), stock)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mask_all_blocks_is_dense_and_sparse_mask_changes_output(family):
    make, inputs = FAMILIES[family]
    t, x = make(), inputs()
    stock = _run(t, x)
    with gen.sparse(t, "mask", pattern=lambda qt, qh, qw, kt, kh, kw: torch.ones((), dtype=torch.bool),
                    block_m=16, block_n=16):
        torch.testing.assert_close(_run(t, x), stock, atol=1e-4, rtol=0)
    # a ±0-frame, ±1-row window: far from dense at these sizes
    local = lambda qt, qh, qw, kt, kh, kw: ((qt - kt).abs() == 0) & ((qh - kh).abs() <= 1)
    with gen.sparse(t, "mask", pattern=local, block_m=16, block_n=16) as h:
        out = _run(t, x)
        layout = next(iter(h.patches[0].run.stats.layouts))
        assert h.method.density(layout, 2) < 0.9
    assert (out - stock).abs().max() > 1e-3
    assert torch.equal(_run(t, x), stock)


def test_hunyuan_padded_text_matches_stock():
    """Short prompts (per-sample text padding) under the dense method equal stock."""
    t = tiny_hunyuan()
    x = hunyuan_inputs(batch=2, valid=(9, 3))
    stock = _run(t, x)
    with gen.sparse(t, "dense"):
        out = _run(t, x)
    torch.testing.assert_close(out, stock, atol=1e-4, rtol=0)
    # and the padding matters: treating all text as valid gives something else
    x_full = dict(x, encoder_attention_mask=torch.ones_like(x["encoder_attention_mask"]))
    assert (_run(t, x_full) - stock).abs().max() > 1e-4


@pytest.mark.parametrize("with_text", [None, "first", "last"])
def test_method_attention_equals_reference_with_its_token_mask(seed, with_text):
    """attention() of a static method == masked dense attention with token_mask()
    (joint text rule included, padded text keys included)."""
    from helpers import dense_masked_attention, rel_err

    text = 0 if with_text is None else 6
    layout = TokenLayout(4, 5, 7, text_len=text, text_first=with_text == "first")  # 35-token frames
    pattern = lambda qt, qh, qw, kt, kh, kw: ((qt - kt).abs() == 0) | ((qh - kh).abs() + (qw - kw).abs() == 0)
    method = get_method("mask", pattern=pattern, block_m=16, block_n=16)
    b, h, s, d = 2, 2, layout.seq_len, 16
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    kv_valid = torch.tensor([s, s - 3]) if with_text == "last" else None
    out = method.attention(q, k, v, layout, AttentionContext(kv_valid=kv_valid))
    mask = method.token_mask(layout, h)
    assert mask.shape[-2:] == (s, s)
    assert 0.0 < mask.float().mean() < 1.0
    ref, _ = dense_masked_attention(q, k, v, mask, kv_valid=kv_valid)
    assert rel_err(out, ref) < 1e-5


def _steps_seen(handle):
    stats = handle.patches[0].run.stats
    return sum(stats.dense_calls.values()), sum(stats.sparse_calls.values())


def test_step_index_by_timestep_when_called_by_hand():
    """No cache_context: equal timesteps are one step (CFG as two calls), lower is the next."""
    t = tiny_wan()
    x = wan_inputs()
    layers = 2
    with gen.sparse(t, DenseConfig(dense_steps=2)) as h:
        for ts in (900, 900, 700, 700, 500, 500, 300, 300):  # 4 steps, two calls each
            _run(t, dict(x, timestep=torch.tensor([ts])))
        assert _steps_seen(h) == (2 * 2 * layers, 2 * 2 * layers)
        assert h.patches[0].run.step_index == 3
        # a timestep that goes up again starts a new run at step 0
        _run(t, dict(x, timestep=torch.tensor([900])))
        assert h.patches[0].run.step_index == 0


@pytest.mark.parametrize("explicit", [True, False])
def test_step_index_from_cache_context_two_calls_and_batched(explicit):
    t = tiny_wan()
    x = wan_inputs()
    with gen.sparse(t, DenseConfig(dense_steps=1)) as h:
        run = h.patches[0].run
        for step, ts in enumerate((900, 600, 300)):
            kw = dict(step_index=step, num_inference_steps=3) if explicit else {}
            for name in ("cond", "uncond"):  # CFG as two calls
                with t.cache_context(name, **kw):
                    _run(t, dict(x, timestep=torch.tensor([ts])))
                    assert run.step_index == step and run.branch == name
        assert _steps_seen(h) == (2 * 2, 2 * 2 * 2)
        h.reset()
        for step, ts in enumerate((900, 600, 300)):  # batched CFG: one call per step
            kw = dict(step_index=step) if explicit else {}
            with t.cache_context("cond", **kw):
                _run(t, dict(wan_inputs(batch=2), timestep=torch.tensor([ts, ts])))
                assert run.step_index == step
        assert _steps_seen(h) == (2, 2 * 2)


def test_dense_layers_schedule_runs_stock_attention():
    t = tiny_wan()
    x = wan_inputs()
    stock = _run(t, x)
    pattern = lambda qt, qh, qw, kt, kh, kw: (qt - kt).abs() == 0
    with gen.sparse(t, "mask", pattern=pattern, dense_layers=(0, 1)) as h:
        out = _run(t, x)  # every layer dense by schedule: the stock path, bit for bit
        assert h.summary()["transformers"][0]["dense_layers"] == [0, 1]
    assert torch.equal(out, stock)


def test_errors_say_what_to_do():
    t = tiny_wan()
    with pytest.raises(ValueError, match="unknown attention method 'radiall'; available: dense, .*Did you mean 'radial'"):
        gen.sparsify(t, "radiall")
    with pytest.raises(ValueError, match="has no field 'decay'"):
        gen.sparsify(t, "dense", decay=0.5)
    with pytest.raises(ValueError, match="needs pattern="):
        gen.sparsify(t, "mask")
    with pytest.raises(ValueError, match="not supported; gen sparsifies"):
        gen.sparsify(torch.nn.Linear(2, 2), "dense")
    with pytest.raises(ValueError, match="takes a diffusers pipeline or transformer"):
        gen.sparsify(object(), "dense")

    @dataclasses.dataclass(frozen=True)
    class FluxOnlyConfig(DenseConfig):
        pass

    from gen.attention.methods import DenseAttention, register_method
    from gen.attention.methods.registry import _METHODS

    class FluxOnly(DenseAttention):
        name = "flux-only-test"
        config_cls = FluxOnlyConfig
        families = ("flux",)

    register_method(FluxOnly)
    try:
        with pytest.raises(ValueError, match="does not support wan models; it supports: flux"):
            gen.sparsify(t, "flux-only-test")
    finally:
        del _METHODS["flux-only-test"]
    gen.sparsify(t, "dense")
    with pytest.raises(ValueError, match="already sparsified"):
        gen.sparsify(t, "dense")
    gen.restore(t)
    gen.restore(t)  # idempotent


def test_block_mask_pattern_and_wrong_size():
    t = tiny_wan()
    x = wan_inputs()  # 3 x 8 x 8 = 192 video tokens = 3 x 3 blocks of 64
    stock = _run(t, x)
    eye = torch.eye(3, dtype=torch.bool)
    with gen.sparse(t, MaskConfig(pattern=eye)):
        assert (_run(t, x) - stock).abs().max() > 1e-3
    with gen.sparse(t, "mask", pattern=torch.ones(2, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"block mask is \(2, 2\) but this call has 192 video tokens"):
            _run(t, x)


def test_padded_token_order_masks_padding_slots(seed):
    """A method whose plan lives in a padded tile order (tiles that do not divide the
    grid) equals masked dense attention with its token_mask: padding slots never count."""
    from gen.attention import BlockPlan, tile_order
    from gen.attention.methods import MaskAttention

    from helpers import dense_masked_attention, rel_err

    class TiledRandom(MaskAttention):
        name = "tiled-random-test"

        def token_order(self, layout):
            return tile_order(layout.grid, (2, 4, 4), pad=True)

        def build_plan(self, key):
            layout, _, _ = self.key_layout(key)
            n = self.token_order(layout).n_out
            nb = -(-n // 32)
            mask = (torch.rand(nb, nb) < 0.5) | torch.eye(nb, dtype=torch.bool)
            return BlockPlan.from_block_mask(mask, 32, 32, n, n)

    method = TiledRandom(MaskConfig(pattern=torch.ones(1, 1, dtype=torch.bool)))
    layout = TokenLayout(3, 5, 7, text_len=4)  # 105 video tokens -> 128 padded slots
    assert method.token_order(layout).n_out > layout.video_len
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16) for _ in range(3))
    out = method.attention(q, k, v, layout, AttentionContext())
    ref, _ = dense_masked_attention(q, k, v, method.token_mask(layout, 2))
    assert rel_err(out, ref) < 1e-5
