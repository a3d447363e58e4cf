"""PARO: the six token orders and their inverses, the calibration's order choice on a
synthetic map, all-on plans against dense attention (also through `sparsify` on the
tiny Wan), `attention()` against the reference with `token_mask()` for random
calibrated plans, timestep bins, empty heads, per-head slicing for context parallelism,
the INT8 path, and calibration end to end on the trained `shapes-wan`."""

import math

import numpy as np
import pytest
import torch

import gen
from gen.attention import AttentionContext, TokenLayout
from gen.attention.methods import get_method, list_methods, parse_overrides
from gen.attention.methods.paro import (
    AXES,
    ORDER_NAMES,
    ParoConfig,
    ParoPlan,
    load_paro_plan,
    order_permutation,
    pack_masks,
    time_bin,
    unpack_masks,
)
from gen.attention.methods.paro_calibration import (
    block_statistics,
    build_masks,
    order_metrics,
    select_orders,
)

from helpers import dense_masked_attention, rel_err
from tiny_transformers import tiny_wan, wan_inputs

# 3 frames of 4x6 tokens = 72 video tokens: 16-token blocks leave a ragged last block
LAYOUTS = {"wan": TokenLayout(3, 4, 6), "hunyuan": TokenLayout(3, 4, 6, text_len=12),
           "flux": TokenLayout(1, 6, 10, text_len=5, text_first=True)}


def _qkv(layout, heads=6, batch=2, dim=16):
    return [torch.randn(batch, heads, layout.seq_len, dim) for _ in range(3)]


def _random_plan(layout, generator, *, heads=6, layers=2, bins=2, steps=4, empty=None, p=0.35, **meta):
    nb = -(-layout.video_len // 16)
    masks = torch.rand(bins, layers, heads, nb, nb, generator=generator) < p
    orders = torch.arange(layers * heads).view(layers, heads) % 6  # every order in every layer
    return ParoPlan.from_masks(orders, masks, layout, empty=empty, block_size=16, steps=steps, **meta)


def _kv_valid(layout):
    return torch.tensor([layout.seq_len, layout.seq_len - 4]) if layout.text_len and not layout.text_first else None


# -- orders ------------------------------------------------------------------------------
def test_six_orders_invert_exactly_on_ragged_grids():
    for grid in [(3, 5, 7), (1, 5, 7), (4, 1, 3), (2, 3, 1)]:
        n = math.prod(grid)
        coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(n, 3)
        for order, axes in enumerate(AXES):
            perm = order_permutation(grid, order)
            assert perm.n_out == perm.n_in == n
            x = torch.randn(2, n, 3)
            assert torch.equal(perm.invert(perm.apply(x, dim=1), dim=1), x)
            assert torch.equal(perm.index[perm.inverse], torch.arange(n))
            assert torch.equal(perm.inverse[perm.index], torch.arange(n))
            # slot order is raster order over the named axes, slowest first
            names = ORDER_NAMES[order].replace("F", "t").lower()
            assert names == axes
            axis = ["thw".index(c) for c in axes]
            key, size = coords[perm.index][:, axis], [grid[a] for a in axis]
            flat = (key[:, 0] * size[1] + key[:, 1]) * size[2] + key[:, 2]
            assert torch.equal(flat, torch.arange(n)), (grid, ORDER_NAMES[order])


def test_order_ids_are_the_authors_axis_permutations():
    grid = (3, 5, 7)
    x = torch.arange(math.prod(grid)).reshape(grid)
    # (F, H, W) dims permuted, and the inverse permutation the authors use for ids 2 and 5
    dims = {0: (0, 1, 2), 1: (0, 2, 1), 2: (1, 2, 0), 3: (1, 0, 2), 4: (2, 1, 0), 5: (2, 0, 1)}
    inverse = {2: (2, 0, 1), 5: (1, 2, 0)}
    for order, d in dims.items():
        permuted = x.permute(*d)
        assert torch.equal(order_permutation(grid, order).index, permuted.flatten())
        if order in inverse:
            assert torch.equal(permuted.permute(*inverse[order]), x)
    with pytest.raises(ValueError, match="order ids are 0-5"):
        order_permutation(grid, 6)


# -- calibration rules -------------------------------------------------------------------
def _fwh_block_map(grid, seed, noise=0.01):
    """q, k whose softmax is block-diagonal in 64-token blocks of the FWH order only."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    block = order_permutation(grid, 1).inverse // 64
    nb = int(block.max()) + 1
    q = torch.zeros(1, 2, n, nb + 4)
    q[:, :, torch.arange(n), block] = 6.0
    q = q + noise * torch.randn(q.shape, generator=g)
    k = q.clone() + noise * torch.randn(q.shape, generator=g)
    return q, k


@pytest.mark.parametrize("grid", [(2, 4, 32), (3, 2, 64)])
def test_a_map_block_diagonal_in_fwh_order_selects_order_1(seed, grid):
    q, k = _fwh_block_map(grid, seed)
    stats = block_statistics(q, k, grid, block_size=64, scale=1.0, budget=4096)  # several row chunks
    m_sparse, m_quant = order_metrics(stats)
    assert m_sparse.shape == m_quant.shape == (2, 6)
    for alpha in (0.0, 0.5, 1.0):
        assert select_orders(m_sparse, m_quant, alpha).tolist() == [1, 1], (alpha, m_sparse, m_quant)
    # FWH: every off-diagonal block is sparse, the diagonal ones flat (max/mean about 1)
    nb = -(-math.prod(grid) // 64)
    assert torch.allclose(m_sparse[:, 1], torch.full((2,), 1 - 1 / nb, dtype=torch.float64))
    assert (m_quant[:, 1] < m_quant[:, [0, 2, 3, 4, 5]].min(-1).values).all()
    # the masks in that order keep the diagonal blocks first
    masks, kept = build_masks(stats.mass[1], 1.0 / nb + 2 / nb, math.prod(grid), 64)
    assert masks.diagonal(dim1=-2, dim2=-1).all() and (kept > 0.99).all()


def test_block_statistics_match_the_full_map(seed):
    layout = TokenLayout(3, 4, 6, text_len=5)
    q, k, _ = _qkv(layout, heads=2, batch=2)
    vs, ts = layout.video_slice, layout.text_slice
    valid = torch.tensor([5, 2])
    stats = block_statistics(q[:, :, vs], k[:, :, vs], layout.grid, block_size=16, k_text=k[:, :, ts],
                             text_valid=valid, budget=300)
    s = (q @ k.transpose(-1, -2)) / 4
    pos = torch.arange(layout.seq_len)
    s = s.masked_fill(pos >= (layout.video_len + valid).view(-1, 1, 1, 1), -math.inf)
    p = torch.softmax(s.double(), -1)[:, :, vs, vs]  # (B, H, 72, 72)
    for i, order in enumerate(stats.orders):
        perm = order_permutation(layout.grid, order)
        pp = p[:, :, perm.index][:, :, :, perm.index]
        pp = torch.nn.functional.pad(pp, (0, 8, 0, 8), value=float("nan")).unflatten(2, (5, 16)).unflatten(4, (5, 16))
        mass = pp.nan_to_num(0).sum(dim=(0, 3, 5))
        peak = pp.nan_to_num(-1).amax(dim=(0, 3, 5))
        small = ((pp < 1e-3) & ~pp.isnan()).sum(dim=(0, 3, 5)).double()
        assert torch.allclose(stats.mass[i], mass, rtol=1e-5, atol=1e-9)
        assert torch.allclose(stats.peak[i].double(), peak, rtol=1e-5, atol=1e-9)
        assert torch.equal(stats.small[i], small)
    assert torch.allclose(stats.vv_mass, p.sum(-1).mean(dim=(0, 2)), rtol=1e-5)
    assert stats.area[0, 0] == 256 and stats.area[-1, -1] == 64


def test_select_orders_rule():
    ms = torch.tensor([[0.5, 0.5, 0.9, 0.1, 0.5, 0.5], [0.0] * 6, [float("nan")] * 6])
    mq = torch.tensor([[2.0, 1.0, 4.0, 1.0, 2.0, 2.0], [3.0, 2.0, 2.0, 5.0, 2.0, 2.0], [1.0] * 6])
    assert select_orders(ms, mq, 1.0).tolist() == [2, 0, 0]  # sparsity alone; ties to the lower id; NaN -> 0
    assert select_orders(ms, mq, 0.0).tolist() == [1, 1, 0]
    assert select_orders(ms, mq, 0.5).tolist() == [1, 1, 0]


def test_build_masks_density_and_forced_blocks(seed):
    n, b = 200, 16  # 13 blocks, ragged last one of 8
    mass = torch.rand(3, 13, 13)
    for density in (0.05, 0.3, 0.6, 1.0):
        masks, kept = build_masks(mass, density, n, b)
        assert masks[..., -1, :].all() and masks[..., :, -1].all()
        lens = torch.tensor([16.0] * 12 + [8.0])
        pairs = torch.einsum("hqk,q,k->h", masks.double(), lens.double(), lens.double()) / n**2
        forced = float(2 * 8 * 200 - 64) / n**2
        assert (abs(pairs - max(density, forced)) <= 256 / n**2 / 2 + 1e-9).all(), (density, pairs)
        free = mass.masked_fill(masks, -1.0)
        lowest_kept = mass.masked_fill(~masks, 2.0)[..., :-1, :-1].flatten(1).min(-1).values
        assert (free.flatten(1).max(-1).values <= lowest_kept).all() or density == 0.05
        assert torch.allclose(kept, (mass * masks).sum(dim=(-1, -2)) / mass.sum(dim=(-1, -2)))


def test_mask_packing_round_trips(seed):
    m = torch.rand(2, 3, 13, 13) < 0.5
    packed = pack_masks(m)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 13, 2)
    assert torch.equal(unpack_masks(packed, 13), m)


# -- the method ----------------------------------------------------------------------------
def test_bins_switch_where_the_authors_callback_does():
    bins = [time_bin(s, 50, 4) for s in range(50)]
    assert [bins.index(b) for b in range(4)] == [0, 13, 25, 38] and bins[-1] == 3
    assert [time_bin(s, 4, 4) for s in range(4)] == [0, 1, 2, 3]
    assert [time_bin(s, 10, 3) for s in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("family", ["wan", "hunyuan", "flux"])
def test_all_on_plans_equal_dense_attention(seed, family):
    layout = LAYOUTS[family]
    q, k, v = _qkv(layout)
    kv_valid = _kv_valid(layout)
    ref, _ = dense_masked_attention(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), kv_valid=kv_valid)
    nb = -(-layout.video_len // 16)
    every = ParoPlan.from_masks(torch.randint(0, 6, (1, 6)), torch.ones(1, 1, 6, nb, nb, dtype=torch.bool), layout,
                                block_size=16, steps=1)
    for plan in (None, every):
        method = get_method("paro", plan=plan)
        out = method.attention(q, k, v, layout, AttentionContext(step_index=0, layer_index=0, kv_valid=kv_valid))
        assert rel_err(out, ref) < 1e-6, (plan, rel_err(out, ref))
    assert get_method("paro").density(layout, 6) == 1.0


@pytest.mark.parametrize("family,backend", [("wan", "torch"), ("hunyuan", "torch"), ("flux", "torch"),
                                            ("hunyuan", "triton")])
def test_attention_equals_reference_with_its_token_mask(seed, backend, family):
    layout = LAYOUTS[family]
    g = torch.Generator().manual_seed(seed)
    empty = torch.zeros(2, 6, dtype=torch.bool)
    empty[1, 2] = True
    plan = _random_plan(layout, g, empty=empty)
    method = get_method("paro", plan=plan, backend=backend)
    q, k, v = _qkv(layout)
    kv_valid = _kv_valid(layout)
    # the Triton interpreter is slow on the CPU: one call per bin there
    calls = [(s, la) for s in range(4) for la in range(2)] if backend == "torch" else [(1, 1), (2, 0)]
    for step, layer in calls:
        ctx = AttentionContext(step_index=step, num_steps=4, layer_index=layer, kv_valid=kv_valid)
        out = method.attention(q, k, v, layout, ctx)
        mask = method.token_mask(layout, 6, ctx)
        ref, _ = dense_masked_attention(q, k, v, mask.unsqueeze(0), kv_valid=kv_valid)
        assert rel_err(out, ref) < 1e-5, (step, layer, rel_err(out, ref))
    # the token mask is each head's block mask, permuted back from its order
    ctx = AttentionContext(step_index=3, num_steps=4, layer_index=0)
    video = method.video_token_mask(layout, 6, ctx)
    blocks = plan.mask(1, 0)
    for h in range(6):
        perm = order_permutation(layout.grid, h)
        slot = perm.inverse // 16
        assert torch.equal(video[h], blocks[h][slot][:, slot])


def test_bins_pick_their_masks(seed):
    layout = LAYOUTS["wan"]
    nb = 5
    masks = torch.zeros(2, 1, 6, nb, nb, dtype=torch.bool)
    masks[0] |= torch.eye(nb, dtype=torch.bool)  # bin 0: diagonal (+ forced row/col)
    plan = ParoPlan.from_masks(torch.zeros(1, 6, dtype=torch.int8), masks, layout, block_size=16, steps=4)
    method = get_method("paro", plan=plan)
    q, k, v = _qkv(layout)
    outs = [method.attention(q, k, v, layout, AttentionContext(step_index=s, num_steps=4, layer_index=0))
            for s in range(4)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3]) and not torch.allclose(outs[1], outs[2])
    d = [method.density(layout, 6, AttentionContext(step_index=s, num_steps=4, layer_index=0)) for s in (0, 3)]
    assert d[0] > d[1]
    assert method.density(layout, 6) == pytest.approx((d[0] + d[1]) / 2)
    assert get_method("paro", plan=plan, dense_steps=2).density(layout, 6) == pytest.approx((1 + d[1]) / 2)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_empty_heads_zero_and_uniform(seed, family):
    layout = LAYOUTS[family]
    g = torch.Generator().manual_seed(seed)
    empty = torch.tensor([[True, False, True, False, False, True]])
    plan = _random_plan(layout, g, layers=1, bins=1, steps=1, empty=empty)
    q, k, v = _qkv(layout)
    kv_valid = _kv_valid(layout)
    ctx = AttentionContext(step_index=0, layer_index=0, kv_valid=kv_valid)
    vs, ts = layout.video_slice, layout.text_slice
    idx = [0, 2, 5]
    zero = get_method("paro", plan=plan).attention(q, k, v, layout, ctx)
    uniform = get_method("paro", plan=plan, empty_head="uniform").attention(q, k, v, layout, ctx)
    assert torch.equal(zero[:, [1, 3, 4]], uniform[:, [1, 3, 4]])  # other heads untouched
    if not layout.text_len:
        assert torch.equal(zero[:, idx], torch.zeros_like(zero[:, idx]))
        assert torch.allclose(uniform[:, idx], v[:, idx].mean(2, keepdim=True).expand_as(uniform[:, idx]), atol=1e-6)
        return
    # zero: video queries attend the text keys only; uniform: plus every video key at the
    # query's mean video logit
    sub = [x[:, idx] for x in (q, k, v)]
    text_only = torch.zeros(1, 1, layout.seq_len, layout.seq_len, dtype=torch.bool)
    text_only[..., ts] = True
    text_only[..., ts, :] = True
    ref, _ = dense_masked_attention(*sub, text_only, kv_valid=kv_valid)
    assert rel_err(zero[:, idx], ref) < 1e-5
    qs, ks, vs_ = (x.double() for x in sub)
    pos = torch.arange(layout.seq_len)
    logits = qs[:, :, vs] @ ks.transpose(-1, -2) / 4
    logits[..., vs] = (qs[:, :, vs] @ ks[:, :, vs].mean(2, keepdim=True).transpose(-1, -2)) / 4
    logits = logits.masked_fill(pos >= kv_valid.view(-1, 1, 1, 1), -math.inf)
    expect = torch.softmax(logits, -1) @ vs_
    assert rel_err(uniform[:, idx][:, :, vs], expect) < 1e-5
    # text queries of an empty head still attend every valid key
    full, _ = dense_masked_attention(*sub, torch.ones(1, 1, 1, 1, dtype=torch.bool), kv_valid=kv_valid)
    assert rel_err(zero[:, idx][:, :, ts], full[:, :, ts]) < 1e-5
    mask = get_method("paro", plan=plan).token_mask(layout, 6, ctx)
    assert not mask[idx][:, vs, vs].any() and mask[idx][:, vs, ts].all()


def test_heads_slice_by_head_offset(seed):
    layout = LAYOUTS["hunyuan"]
    plan = _random_plan(layout, torch.Generator().manual_seed(seed), empty=torch.rand(2, 6) < 0.3)
    method = get_method("paro", plan=plan)
    q, k, v = _qkv(layout)
    kv_valid = _kv_valid(layout)
    whole = method.attention(q, k, v, layout, AttentionContext(step_index=2, num_steps=4, layer_index=1,
                                                               kv_valid=kv_valid))
    for offset, count in ((0, 3), (3, 3), (2, 2), (5, 1)):
        ctx = AttentionContext(step_index=2, num_steps=4, layer_index=1, kv_valid=kv_valid, head_offset=offset,
                               num_heads=6)
        part = method.attention(*(x[:, offset:offset + count] for x in (q, k, v)), layout, ctx)
        assert torch.allclose(part, whole[:, offset:offset + count], atol=1e-6), offset
        mask = method.token_mask(layout, count, ctx)
        full_mask = method.token_mask(layout, 6, AttentionContext(step_index=2, num_steps=4, layer_index=1))
        assert torch.equal(mask, full_mask[offset:offset + count])
    with pytest.raises(ValueError, match="not among the model's 6"):
        method.attention(q[:, :3], k[:, :3], v[:, :3], layout,
                         AttentionContext(step_index=0, layer_index=0, head_offset=4, num_heads=6))


def test_config_and_plan_checks(seed):
    assert "paro" in list_methods()
    assert parse_overrides("paro", ["plan=/x.safetensors", "empty_head=uniform", "quant=int8", "density=0.3"]) == {
        "plan": "/x.safetensors", "empty_head": "uniform", "quant": "int8", "density": 0.3}
    for bad, message in [(dict(bins=0), "bins"), (dict(density=0.0), "density"), (dict(density=1.5), "density"),
                         (dict(alpha=2.0), "alpha"), (dict(block_size=48), "power of two"),
                         (dict(empty_head="drop"), "empty_head"), (dict(quant="int4"), "quant"),
                         (dict(plan=3), "plan must be")]:
        with pytest.raises(ValueError, match=message):
            ParoConfig(**bad)
    with pytest.raises(ValueError, match="density=0.3 needs a calibrated plan.*gen calibrate paro"):
        get_method("paro", density=0.3)
    layout = LAYOUTS["wan"]
    plan = _random_plan(layout, torch.Generator().manual_seed(seed), steps=4)
    with pytest.raises(ValueError, match="bins=4 differs from the plan's bins=2"):
        get_method("paro", plan=plan, bins=4)
    with pytest.raises(ValueError, match="block_size=64 differs"):
        get_method("paro", plan=plan, block_size=64)
    assert get_method("paro", plan=plan, bins=2, block_size=16).needs_step
    assert not get_method("paro").needs_step
    method = get_method("paro", plan=plan)
    q, k, v = _qkv(layout)
    with pytest.raises(ValueError, match="this run has 5.*--steps 4"):
        method.attention(q, k, v, layout, AttentionContext(step_index=0, num_steps=5, layer_index=0))
    with pytest.raises(ValueError, match="calibrated for custom .*4 heads"):
        method.attention(q[:, :4], k[:, :4], v[:, :4], layout, AttentionContext(step_index=0, layer_index=0))
    with pytest.raises(ValueError, match="needs the denoising step"):
        method.attention(q, k, v, layout, AttentionContext(layer_index=0))
    with pytest.raises(ValueError, match="calibrated for custom, not tiny-wan"):
        get_method("paro", plan=plan, model="tiny-wan")


def test_head_orders_and_picture_hooks(seed, tmp_path):
    layout = LAYOUTS["wan"]
    plan = _random_plan(layout, torch.Generator().manual_seed(seed), empty=torch.eye(2, 6, dtype=torch.bool))
    method = get_method("paro", plan=plan)
    ctx = AttentionContext(step_index=0, num_steps=4, layer_index=0)
    info = method.head_orders(layout, 6, ctx)
    assert [h["order"] for h in info] == list(ORDER_NAMES) and info[0]["empty"] and info[0]["density"] == 0
    assert all(0 < h["density"] <= 1 for h in info[1:])
    png = method.save_plan_picture(tmp_path / "paro.png", layout, 6, ctx)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert method.plan(layout, 6, ctx).kv_counts.shape == (1, 6, 5)


def test_int8_paths_follow_the_fp32_result(seed):
    pytest.importorskip("gen.attention.quant", reason="gen.attention.quant (the INT8 kernels) is not in this build")
    layout = LAYOUTS["hunyuan"]
    plan = _random_plan(layout, torch.Generator().manual_seed(seed))
    q, k, v = _qkv(layout)
    ctx = AttentionContext(step_index=1, num_steps=4, layer_index=0, kv_valid=_kv_valid(layout))
    ref = get_method("paro", plan=plan).attention(q, k, v, layout, ctx)
    for quant in ("int8", "int8-pv"):
        out = get_method("paro", plan=plan, quant=quant, backend="torch").attention(q, k, v, layout, ctx)
        assert rel_err(out, ref) < 0.05, (quant, rel_err(out, ref))


# -- integration ---------------------------------------------------------------------------
def test_sparsify_with_an_all_on_plan_reproduces_the_stock_transformer(seed):
    t, x = tiny_wan(), wan_inputs()  # 3 x 8 x 8 video tokens, 2 layers x 2 heads
    with torch.no_grad():
        stock = t(**x)[0]
    layout = TokenLayout(3, 8, 8)
    nb = -(-layout.video_len // 64)
    orders = torch.randint(0, 6, (2, 2))
    plan = ParoPlan.from_masks(orders, torch.ones(1, 2, 2, nb, nb, dtype=torch.bool), layout, steps=1, head_dim=16)
    for p in (None, plan):
        with gen.sparse(t, "paro", plan=p) as handle:
            with torch.no_grad():
                out = t(**x)[0]
            summary = handle.summary()["transformers"][0]
        torch.testing.assert_close(out, stock, atol=1e-4, rtol=0)
        assert summary["sparse_calls"] == 2 and summary["density"] == {str(layout): 1.0}
    with torch.no_grad():
        assert torch.equal(t(**x)[0], stock)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """PARO calibrated on the trained shapes-wan: 1 prompt, 2 steps, 16-token blocks (the
    5x8x8 grid has 5 blocks of 64), 2 bins, density 0.5."""
    from gen.calibrate_paro import calibrate_paro
    from gen.pipelines import load

    pipe = load("shapes-wan")
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path_factory.mktemp("paro") / "shapes.safetensors"
    seen = []
    result = calibrate_paro("shapes-wan", ["a red circle moving right on a blue background"], steps=2, bins=2,
                            block_size=16, density=0.5, out=path, pipe=pipe,
                            progress=lambda done, total, msg: seen.append((done, total)))
    return pipe, result, seen


def _render(pipe, steps=2, height=128):
    with torch.inference_mode():
        out = pipe(prompt="a red circle moving right on a blue background", height=height, width=128, num_frames=17,
                   num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                   output_type="latent")
    return out.frames[0].float().numpy()


def test_calibration_on_shapes_wan_writes_a_plan_that_loads_and_renders(calibrated):
    pipe, result, seen = calibrated
    assert seen[-1] == (2, 2) and result.passes == 1
    plan = load_paro_plan(result.path, model="shapes-wan", height=128, width=128, frames=17, steps=2)
    meta = plan.meta
    assert (meta.layers, meta.heads, meta.bins, meta.block_size, meta.density) == (4, 4, 2, 16, 0.5)
    assert meta.grid == (5, 8, 8) and meta.alpha == 0.5 and meta.prompts
    assert torch.equal(plan.orders, result.plan.orders) and torch.equal(plan.masks, result.plan.masks)
    assert not plan.empty.any()  # Wan self-attention: every probability is video -> video
    assert torch.allclose(plan.vv_mass, torch.ones(4, 4), atol=1e-5)
    assert not plan.m_sparse.isnan().any() and (plan.m_quant >= 1).all()
    assert (plan.video_density() - 0.5).abs().max() < 256 / 320**2
    assert (plan.kept_mass > 0.5).all() and (plan.kept_mass <= 1).all()  # the heaviest half of the blocks
    masks = plan.all_masks()
    assert masks[..., -1, :].all() and masks[..., :, -1].all()
    with gen.sparse(pipe, "paro", plan=str(result.path)) as handle:
        sparse = _render(pipe)
        summary = handle.summary()["transformers"][0]
    dense = _render(pipe)
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    assert summary["sparse_calls"] == 2 * 2 * 4 and summary["dense_calls"] == 0  # steps x CFG x layers
    assert list(summary["density"].values()) == [pytest.approx(float(plan.video_density().mean()))]
    with gen.sparse(pipe, "paro", plan=str(result.path)):
        with pytest.raises(ValueError, match="2 denoising steps and this run has 3"):
            _render(pipe, steps=3)
        with pytest.raises(ValueError, match="this call has 5x6x8 tokens"):
            _render(pipe, height=96)


def test_the_observer_calibrates_order_1_on_a_fwh_block_diagonal_model(seed):
    """The calibration's observer fed calls of a 'model' whose every head attends in FWH
    blocks: it chooses order 1, its masks keep the diagonal blocks, and it stays dense."""
    from gen.calibrate_paro import ParoObserver, calibrate_paro

    grid = (2, 4, 32)
    layout = TokenLayout(*grid)
    observer = ParoObserver(ParoConfig())
    observer.begin(steps=2, layers=2, heads=2, bins=2, block_size=64, eps=1e-3, sigma=0.9, keep_all=True,
                   budget=1 << 14)
    q, k = _fwh_block_map(grid, seed)
    v = torch.randn(q.shape)
    for step in range(2):
        for layer in range(2):
            ctx = AttentionContext(step_index=step, num_steps=2, layer_index=layer)
            out = observer.attention(q, k, v, layout, ctx)
            ref, _ = dense_masked_attention(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool))
            assert rel_err(out, ref) < 1e-5  # fp32 with logits up to 13
    orders = observer.choose_orders(0.5)
    assert orders.tolist() == [[1, 1], [1, 1]]
    # 4 x 4 blocks: the forced row and column are 7, the three other diagonal blocks make 10
    plan = observer.finish(orders=orders, density=10 / 16, empty_mass=0.01, meta=dict(model="synthetic"))
    masks = plan.all_masks()
    assert masks.diagonal(dim1=-2, dim2=-1).all() and (plan.kept_mass > 0.99).all()
    assert not plan.empty.any() and plan.meta.alpha is None and plan.meta.steps == 2
    with pytest.raises(ValueError, match="order must be an order id"):
        calibrate_paro("shapes-wan", ["a red circle moving right on a blue background"], order=6)


def test_gen_masks_draws_a_calibrated_plan_at_its_step_count(calibrated, tmp_path):
    """``gen masks --method paro --set plan=P`` needs no ``--steps``: it draws at the plan's
    step count, names the head's order in the title, and adds every head's block mask in
    its own order; the plan file's path and the three pictures come back whole."""
    from typer.testing import CliRunner

    from gen.cli import app
    from gen.masks import mask_picture

    _, result, _ = calibrated
    pic = mask_picture("paro", "shapes-wan", out=tmp_path / "m.png", overrides={"plan": str(result.path)}, head=1)
    assert pic.heads_png is not None and pic.heads_png.stat().st_size > 0
    assert pic.video_density == pytest.approx(float(result.plan.video_density()[0, 0, 1]))
    res = CliRunner().invoke(app, ["masks", "--method", "paro", "--model", "shapes-wan", "--set",
                                   f"plan={result.path}", "--step", "1", "--out", str(tmp_path / "cli.png")])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "cli-heads.png") in res.output.splitlines()


def test_calibrate_paro_command_refuses_bad_values_before_loading(tmp_path):
    from typer.testing import CliRunner

    from gen.cli import app

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving right on a blue background\n")
    for bad, words in ((["--density", "0"], "density"), (["--order", "7"], "order"),
                       (["--alpha", "2"], "alpha"), (["--model", "nope"], "unknown model")):
        args = ["calibrate", "paro", "--model", "shapes-wan", "--prompts", str(prompts), "--out",
                str(tmp_path / "p.safetensors"), *bad]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and words in res.output.lower(), (bad, res.output)
        assert not (tmp_path / "p.safetensors").exists()


def test_bench_skips_paro_without_a_plan():
    from gen.bench.common import resolve_methods
    from gen.pipelines import get_spec

    spec = get_spec("shapes-wan")
    skip, run = resolve_methods("paro", spec), resolve_methods("paro", spec, plan="p.safetensors")
    assert skip[0].name is None and "gen calibrate paro" in skip[0].skip
    assert run[0].name == "paro" and run[0].overrides == {"plan": "p.safetensors"}
