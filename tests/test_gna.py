"""``gna`` (Generalized Neighborhood Attention): the exact mask against an independent
implementation of NATTEN's per-axis definition, its special cases, the block plan's
per-axis logic, attention against dense masked attention (text first/last, both
backends), the presets at their native grids, and the tiny pipelines end to end.

Run with ``-s`` to see the preset densities."""

import logging
import math
import random

import numpy as np
import pytest
import torch

import gen
from gen.attention import AttentionContext, TokenLayout
from gen.attention.methods import PRESETS, get_method
from gen.attention.methods.gna import GNAConfig, gna_axis_mask, gna_mask
from gen.pipelines import MODELS, get_spec, load

from helpers import dense_masked_attention, rel_err
from test_sparsify_pipelines import _run

# -- an independent reference, written from the definition --------------------------------


def ref_axis_allowed(xq: int, xk: int, n: int, w: int, s: int, d: int, causal: bool) -> bool:
    """One axis of GNA for one (query, key) pair, in plain integers."""
    if xq % d != xk % d:  # dilation groups never mix
        return False
    group_len = len(range(xq % d, n, d))
    q, k = xq // d, xk // d  # positions inside the group
    if causal:
        leader = min(q - q % s + s - 1, group_len - 1)  # last query of the stride group
        return k <= q and leader - k < w
    left = w // 2
    right = w - left - 1  # an even window has one more key on the left
    leader = min(q - q % s + s // 2, group_len - 1)  # centre query of the stride group
    centre = max(left, min(leader, group_len - 1 - right))  # shift, do not shrink
    return centre - left <= k <= centre + right


def ref_mask(grid, window, stride, dilation, causal) -> torch.Tensor:
    """Bool ``(N, N)`` over the grid in raster order (last axis fastest): per-axis tables
    by loops, combined through each token's coordinates."""
    tables = []
    for n, w, s, d, c in zip(grid, window, stride, dilation, causal):
        t = torch.zeros(n, n, dtype=torch.bool)
        for xq in range(n):
            for xk in range(n):
                t[xq, xk] = ref_axis_allowed(xq, xk, n, w, s, d, c)
        tables.append(t)
    coords = torch.stack(
        [c.flatten() for c in torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")], 1
    )
    mask = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for axis, t in enumerate(tables):
        mask &= t[coords[:, axis, None], coords[None, :, axis]]
    return mask


def random_axis(rng: random.Random, n: int) -> tuple[int, int, int, bool]:
    """A valid (window, stride, dilation, causal) for an axis of extent ``n``."""
    d = rng.choice([1, 1, 2, 3]) if n >= 2 else 1
    d = min(d, n)
    w = rng.randint(1, n // d)
    s = rng.randint(1, w)
    return w, s, d, rng.random() < 0.3


def random_params(rng: random.Random, grid):
    axes = [random_axis(rng, n) for n in grid]
    return tuple(tuple(a[i] for a in axes) for i in range(4))


def method_for(grid, window, stride, dilation, causal, tile=None, **kw):
    """The method and a layout for a 1-D (as t x 1 x 1), 2-D (image) or 3-D grid."""
    if len(grid) == 1:
        layout = TokenLayout(grid[0], 1, 1)
        pad = lambda v, f: (*v, f, f)
        window, stride, dilation, causal = pad(window, 1), pad(stride, 1), pad(dilation, 1), pad(causal, False)
        tile = (2, 1, 1) if tile is None else (*tile, 1, 1)
    elif len(grid) == 2:
        layout = TokenLayout(1, *grid, **kw)
    else:
        layout = TokenLayout(*grid, **kw)
    tile = tile or tuple(min(3, n) for n in grid)
    cfg = GNAConfig(window=window, stride=stride, dilation=dilation, causal=causal, tile=tile)
    return get_method(cfg), layout


GRIDS = {
    "1d": lambda r: (r.randint(1, 25),),
    "2d": lambda r: (r.randint(2, 12), r.randint(2, 12)),
    "3d": lambda r: (r.randint(2, 6), r.randint(1, 7), r.randint(2, 7)),
}


# -- the mask ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", ["1d", "2d", "3d"])
def test_token_mask_equals_the_definition(seed, rank):
    rng = random.Random(seed)
    for _ in range(6):
        grid = GRIDS[rank](rng)
        params = random_params(rng, grid)
        ref = ref_mask(grid, *params)
        assert torch.equal(gna_mask(grid, *params), ref), (grid, params)
        method, layout = method_for(grid, *params)
        mask = method.token_mask(layout, num_heads=2)
        assert mask.shape == (1, layout.video_len, layout.video_len)
        assert torch.equal(mask[0], ref), (grid, params)


def test_every_axis_setting_on_small_extents():
    """Exhaustive over extents 1..9 and every valid window, stride, dilation, causal."""
    for n in range(1, 10):
        for d in range(1, n + 1):
            for w in range(1, n // d + 1):
                for s in range(1, w + 1):
                    for c in (False, True):
                        ref = ref_mask((n,), (w,), (s,), (d,), (c,))
                        assert torch.equal(gna_axis_mask(n, w, s, d, c), ref), (n, w, s, d, c)


def test_standard_na_blocked_and_dense_special_cases():
    n = 11
    for w in range(1, n + 1):
        # stride 1: standard NA, the window [start, start + w) shifted inside the axis
        x = torch.arange(n)
        start = (x - w // 2).clamp(0, n - w)
        na = (x[None, :] >= start[:, None]) & (x[None, :] < start[:, None] + w)
        assert torch.equal(gna_axis_mask(n, w, 1), na), w
    # stride = window on an extent the window divides: blocked (block-diagonal) attention
    for n, w in ((12, 4), (12, 3), (10, 5), (8, 8)):
        x = torch.arange(n)
        assert torch.equal(gna_axis_mask(n, w, w), x[:, None] // w == x[None, :] // w)
    # window = extent: dense for any stride; causal: lower triangular
    for s in (1, 3, 7):
        assert gna_axis_mask(7, 7, s).all()
        assert torch.equal(gna_axis_mask(7, 7, s, causal=True), torch.ones(7, 7, dtype=torch.bool).tril())
    # through the method: -1 and windows larger than the extent are the whole axis
    for window in (-1, (9, 40, 40), (-1, 7, -1)):
        method = get_method("gna", window=window, stride=1, tile=(1, 4, 4))
        assert method.token_mask(TokenLayout(3, 7, 5), 1).all(), window
    layout = TokenLayout(4, 6, 6)
    na3 = get_method("gna", window=(3, 3, 3), stride=1, tile=(1, 2, 2)).token_mask(layout, 1)[0]
    assert torch.equal(na3, ref_mask((4, 6, 6), (3, 3, 3), (1, 1, 1), (1, 1, 1), (False,) * 3))
    blocked = get_method("gna", window=(2, 3, 3), stride=(2, 3, 3), tile=(1, 3, 3)).token_mask(layout, 1)[0]
    c = layout.video_coords()
    same_block = ((c[:, None] // torch.tensor([2, 3, 3])) == (c[None] // torch.tensor([2, 3, 3]))).all(-1)
    assert torch.equal(blocked, same_block)


def test_images_use_the_last_two_entries_and_text_is_dense():
    layout = TokenLayout(1, 6, 7, text_len=3, text_first=True)
    a = get_method("gna", window=(5, 3, 5), stride=(1, 2, 3), tile=(1, 4, 4)).token_mask(layout, 2)
    b = get_method("gna", window=(3, 5), stride=(2, 3), tile=(4, 4)).token_mask(layout, 2)
    assert torch.equal(a, b)
    vs = layout.video_slice
    assert torch.equal(a[0, vs, vs], ref_mask((6, 7), (3, 5), (2, 3), (1, 1), (False, False)))
    assert a[0, :3].all() and a[0, :, :3].all()  # text rows and columns stay dense


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="stride must not exceed the window"):
        GNAConfig(window=(3, 8, 8), stride=(1, 9, 1))
    with pytest.raises(ValueError, match="window entries must be >= 1"):
        GNAConfig(window=(0, 8, 8))
    with pytest.raises(ValueError, match="tuple of 3"):
        GNAConfig(window=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="dilation entries"):
        GNAConfig(dilation=0)
    with pytest.raises(ValueError, match="booleans"):
        GNAConfig(causal=(True, 2, False))
    with pytest.raises(ValueError, match="dense_steps"):
        GNAConfig(dense_steps=-1)
    with pytest.raises(ValueError, match="exceeds the extent"):
        get_method("gna", window=(3, 4, 4), dilation=(1, 3, 1)).geometry(TokenLayout(4, 8, 8))
    with pytest.raises(ValueError, match="needs dilation 1"):
        get_method("gna", window=(-1, 4, 4), dilation=(2, 1, 1)).geometry(TokenLayout(4, 8, 8))
    with pytest.raises(ValueError, match="does not fit the 3-axis token grid"):
        get_method("gna", window=(4, 4), tile=(4, 4)).geometry(TokenLayout(4, 8, 8))
    cfg = GNAConfig(window=[3, 5, 5], causal=(1, 0, 0))
    assert cfg.window == (3, 5, 5) and cfg.causal == (True, False, False)


# -- the block plan ---------------------------------------------------------------------------


def brute_block_masks(method, layout):
    """Visited / full tile pairs from the exact token mask in the padded tile order."""
    perm = method.token_order(layout)
    bs = method.geometry(layout).block
    mask = method.video_token_mask(layout, 1)[0]
    idx, valid = perm.index.clamp(min=0), perm.valid
    slots = mask[idx][:, idx] & valid[:, None] & valid[None, :]
    ok = slots | ~(valid[:, None] & valid[None, :])
    nb = perm.n_out // bs
    visit = slots.view(nb, bs, nb, bs).any(3).any(1)
    full = ok.view(nb, bs, nb, bs).all(3).all(1) & visit
    return visit, full


@pytest.mark.parametrize("rank", ["2d", "3d"])
def test_per_axis_plan_logic_equals_brute_force(seed, rank):
    rng = random.Random(seed)
    for _ in range(5):
        grid = GRIDS[rank](rng)
        tile = tuple(rng.randint(1, 4) for _ in grid)
        method, layout = method_for(grid, *random_params(rng, grid), tile=tile)
        visit, full = brute_block_masks(method, layout)
        plan = method.plan(layout, 2)
        assert torch.equal(plan.to_block_mask()[0, 0], visit)
        assert torch.equal(method._block_mask(layout, "full"), full)
        stats = method.stats(layout)
        assert stats.visited_blocks == int(visit.sum()) and stats.full_blocks == int(full.sum())
        assert stats.mask_density == pytest.approx(float(method.video_token_mask(layout, 1).float().mean()))


def native_layout(model: str) -> TokenLayout:
    return TokenLayout(*MODELS[model].token_grid())


def test_hunyuanvideo_preset_is_fully_block_sparse_at_its_native_grid():
    layout = native_layout("hunyuanvideo")
    assert layout.grid == (33, 45, 80)
    method = get_method("gna", model="hunyuanvideo", family="hunyuan")
    stats = method.stats(layout)  # per-axis counts: no 119k x 119k mask anywhere
    assert stats.fully_block_sparse and stats.partial_blocks == 0
    assert stats.block_size == 128 and stats.mask_density == pytest.approx(0.1)
    # the same, axis by axis: every visited 1-D tile pair is fully allowed
    for _, any_, all_ in method.geometry(layout).axes():
        assert torch.equal(any_, all_)
    # NATTEN's own 30x48x80 recipe is not fully block-sparse on this grid (odd extents)
    natten = get_method("gna", window=(18, 24, 24), stride=(16, 8, 8), tile=(2, 8, 8))
    assert natten.stats(layout).partial_blocks > 0


def test_presets_at_their_native_grids():
    print()
    for key, values in PRESETS["gna"].items():
        if key not in MODELS:
            continue
        spec = get_spec(key)
        layout = native_layout(key)
        method = get_method("gna", model=key, family=spec.family)
        assert method.config == GNAConfig(**values)
        s = method.stats(layout)
        print(f"gna preset {key:22s} grid {'x'.join(map(str, layout.grid)):9s} tile {s.block_size:3d}: "
              f"density {s.mask_density:.4f}  compute {s.compute_ratio:.4f}  "
              f"block-sparse {s.fully_block_sparse} ({s.partial_blocks} partial of {s.visited_blocks})")
        assert s.fully_block_sparse, key
        assert s.block_size & (s.block_size - 1) == 0 and 16 <= s.block_size <= 256  # Triton blocks
        assert s.mask_density < 0.6
    # family presets run on the tiny grids (dense where their windows cover the grid)
    for family, grid in (("wan", (5, 8, 8)), ("hunyuan", (5, 8, 8)), ("flux", (1, 16, 16))):
        layout = TokenLayout(*grid)
        s = get_method("gna", family=family).stats(layout)
        print(f"gna family {family:8s} on tiny {grid}: density {s.mask_density:.4f}")
        assert s.fully_block_sparse


# -- attention ---------------------------------------------------------------------------------

CASES = [
    # (layout, config): partial blocks (stride 1, dilation, causal) and fully block-sparse ones
    (TokenLayout(3, 5, 6), dict(window=(2, 3, 4), stride=(1, 2, 3), tile=(1, 4, 4))),
    (TokenLayout(3, 5, 6, text_len=7), dict(window=(3, 3, 3), causal=(True, False, False), tile=(2, 2, 4))),
    (TokenLayout(1, 9, 7, text_len=5, text_first=True), dict(window=(4, 3), stride=(2, 1), dilation=(2, 1), tile=(4, 4))),
    (TokenLayout(5, 8, 8, text_len=6), dict(window=(3, 4, 4), stride=(1, 4, 4), tile=(1, 4, 4))),
    (TokenLayout(1, 8, 12, text_len=4, text_first=True), dict(window=(4, 4), stride=(4, 4), tile=(4, 4))),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_attention_equals_dense_masked_attention(seed, backend, case):
    layout, cfg = CASES[case]
    method = get_method("gna", backend=backend, **cfg)
    b, h, d = 2, 2, 16
    q, k, v = (torch.randn(b, h, layout.seq_len, d) for _ in range(3))
    kv_valid = None
    if layout.text_len and not layout.text_first:  # HunyuanVideo-style padded text
        kv_valid = torch.tensor([layout.seq_len, layout.seq_len - 3])
    out = method.attention(q, k, v, layout, AttentionContext(kv_valid=kv_valid))
    ref, _ = dense_masked_attention(q, k, v, method.token_mask(layout, h), kv_valid=kv_valid)
    assert rel_err(out, ref) < 1e-5


def test_partial_blocks_are_logged_once(caplog):
    layout = TokenLayout(3, 5, 6)
    method = get_method("gna", window=(2, 3, 4), tile=(1, 4, 4))
    assert method.stats(layout).partial_blocks > 0
    q = torch.randn(1, 1, layout.seq_len, 16)
    with caplog.at_level(logging.INFO, logger="gen.attention"):
        for _ in range(2):
            method.attention(q, q, q, layout, AttentionContext())
    assert sum("partial" in r.getMessage() for r in caplog.records) == 1


# -- pipelines ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-hunyuan", "tiny-flux"])
def test_sparsify_tiny_pipelines(one_thread, name):
    pipe = load(name)
    pipe.set_progress_bar_config(disable=True)
    stock = _run(pipe, name)
    handle = gen.sparsify(pipe, "gna")
    assert handle.method.config == GNAConfig(**PRESETS["gna"][name])
    sparse = _run(pipe, name)
    summary = handle.summary()["transformers"][0]
    gen.restore(pipe)
    assert summary["sparse_calls"] > 0
    assert np.abs(sparse - stock).max() > 1e-3
    assert np.array_equal(_run(pipe, name), stock), "restore must give back the stock output"
    with gen.sparse(pipe, "gna", window=-1):  # the whole grid: dense
        np.testing.assert_allclose(_run(pipe, name), stock, atol=1e-4, rtol=0)
    assert np.array_equal(_run(pipe, name), stock)
    assert math.isfinite(float(sparse.sum()))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [dict(window=(3, 4, 4), stride=(1, 4, 4), tile=(1, 4, 4)),  # block-sparse
                                 dict(window=(3, 3, 3), stride=1, tile=(1, 4, 4))])  # partial blocks
def test_compiles_fullgraph_without_recompiling(cfg):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from tiny_transformers import tiny_wan, wan_inputs

    t, x = tiny_wan(), wan_inputs()
    torch._dynamo.reset()
    counters.clear()
    with gen.sparse(t, "gna", **cfg) as handle, torch.no_grad():
        eager = [t(**dict(x, timestep=torch.tensor([ts])))[0] for ts in (900, 600)]
        method = handle.patches[0].method
        for cache in (method._plans, method._full_plans, method._partial_plans):
            cache.clear()  # the compiled call builds its own plans
        compiled = torch.compile(t, fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs = [compiled(**dict(x, timestep=torch.tensor([ts])))[0] for ts in (900, 600)]
    assert counters["stats"]["unique_graphs"] == 1
    for out, ref in zip(outs, eager):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


def test_render_gna_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from gen.cli import app

    out = tmp_path / "gna.mp4"
    res = CliRunner().invoke(app, ["render", "a red ball", "--attention", "gna", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 0 and "density" in res.output
    res = CliRunner().invoke(app, ["render", "a cat", "--model", "tiny-flux", "--attention", "gna",
                                   "--set", "window=-1", "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 0, res.output
