"""VMoBA: the authors' selection vectors, the selection rule against an independent loop,
the gate kernels against their reference, chunk-sparse attention (both backends) against
fp64 dense masked attention, and the method on ragged grids for all three partitions with
joint text; presets, schedule, pictures, the kernel bench, compile (slow) and GPU shapes."""

import math
import os
import random

import pytest
import torch

from gen.attention import AttentionContext, TokenLayout, tile_order
from gen.attention import chunk_reference as R
from gen.attention.chunk_sparse import (
    ChunkPlan,
    chunk_gate,
    chunk_means,
    chunk_sparse_attention,
    plan_chunks,
)
from gen.attention.methods import get_method
from gen.attention.methods.vmoba import VMoBAConfig, chunk_bounds, chunk_order

from helpers import dense_masked_attention, rel_err

GATE = [5.0, 1.0, 3.0, 0.0, 2.0]  # one head, one query in chunk 1
VECTORS = [(0.25, {0, 1}), (0.6, {0, 1, 2}), (0.9, {0, 1, 2, 4}), (1.0, {0, 1, 2, 3, 4})]


def _bounds(sizes):
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


# -- the selection rule ------------------------------------------------------------------------


@pytest.mark.parametrize("tau, want", VECTORS)
def test_authors_vectors_on_the_reference_rule(tau, want):
    sel = R.select_chunks(torch.tensor(GATE).view(1, 1, 1, 5), torch.tensor([1]), tau=tau)
    assert set(sel[0, 0, 0].nonzero().flatten().tolist()) == want
    sel = R.select_chunks(torch.tensor([0.0, 5.0, 1.0]).view(1, 1, 1, 3), torch.tensor([1]), tau=0.25)
    assert set(sel[0, 0, 0].nonzero().flatten().tolist()) == {1, 2}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_authors_vectors_through_means_and_gate(seed, backend):
    # chunk c's keys all equal e_c, so mean(K_c) = e_c and the gate of q is q[:n_chunks]
    d, size = 16, 4
    for gate, own_token, cases in ((GATE, 5, VECTORS), ([0.0, 5.0, 1.0], 6, [(0.25, {1, 2})])):
        nc = len(gate)
        bounds = torch.tensor(_bounds([size] * nc), dtype=torch.int32)
        k = torch.zeros(1, 1, nc * size, d)
        for c in range(nc):
            k[0, 0, c * size:(c + 1) * size, c] = 1.0
        q = torch.randn(1, 1, nc * size, d)
        q[0, 0, own_token] = 0.0
        q[0, 0, own_token, :nc] = torch.tensor(gate)
        means = chunk_means(k, bounds, backend=backend)
        torch.testing.assert_close(means[0, 0], torch.eye(nc, d))
        for tau, want in cases:
            bits, _, keys = chunk_gate(q, means, bounds, tau=tau, query_block=16, backend=backend)
            sel = R.unpack_row_bits(bits, nc)[0, 0, own_token]
            assert set(sel.nonzero().flatten().tolist()) == want, (gate, tau)
            assert int(keys[0, 0, own_token]) == size * len(want)


def _loop_select(g, own, select, tau, topk):
    """The rule from its statement, one row in fp64 with Python lists: (chosen set, margin
    of the closest cumulative comparison)."""
    nc = len(g)
    others = sorted((c for c in range(nc) if c != own), key=lambda c: -g[c])
    if select == "topk":
        return {own, *others[: topk - 1]}, math.inf
    lo, hi = min(g), max(g)
    n = [(x - lo) / (hi - lo) if hi > lo else 1.0 for x in g]
    if tau >= 1:
        return set(range(nc)), math.inf
    total, cum, chosen, margin = sum(n), n[own], {own}, math.inf
    for i, c in enumerate(others):
        if i > 0:
            margin = min(margin, abs(cum - tau * total) / total)
            if cum >= tau * total:
                break
        chosen.add(c)
        cum += n[c]
    return chosen, margin


def _loop_select_global(g, own, select, tau, topk):
    """The per-head rule over all (query, chunk) gates, with Python lists."""
    s, nc = len(g), len(g[0])
    pairs = sorted(((g[i][c], i, c) for i in range(s) for c in range(nc) if c != own[i]), key=lambda x: -x[0])
    chosen = {(i, own[i]) for i in range(s)}
    if select == "topk":
        return chosen | {(i, c) for _, i, c in pairs[: (topk - 1) * s]}, math.inf
    flat = [x for row in g for x in row]
    lo, hi = min(flat), max(flat)
    norm = lambda x: (x - lo) / (hi - lo)
    total = sum(norm(x) for x in flat)
    cum, margin = sum(norm(g[i][own[i]]) for i in range(s)), math.inf
    for j, (x, i, c) in enumerate(pairs):
        if j > 0:
            margin = min(margin, abs(cum - tau * total) / total)
            if cum >= tau * total:
                break
        chosen.add((i, c))
        cum += norm(x)
    return chosen, margin


@pytest.mark.parametrize("select, tau, topk", [("threshold", 0.25, 3), ("threshold", 0.6, 3), ("threshold", 0.05, 3),
                                               ("topk", 0.25, 1), ("topk", 0.25, 3)])
def test_reference_rule_equals_an_independent_loop(seed, select, tau, topk):
    nc, s = 7, 40
    gates = torch.randn(1, 2, s, nc)
    own = torch.randint(0, nc, (s,))
    sel = R.select_chunks(gates, own, select=select, tau=tau, topk=topk)
    checked = 0
    for h in range(2):
        for i in range(s):
            want, margin = _loop_select(gates[0, h, i].double().tolist(), int(own[i]), select, tau, topk)
            if margin < 1e-5:
                continue  # fp32 vs fp64 may decide a near-tie either way
            checked += 1
            assert set(sel[0, h, i].nonzero().flatten().tolist()) == want, (h, i)
    assert checked > 70
    glob = R.select_chunks_global(gates, own, select=select, tau=tau, topk=topk)
    for h in range(2):
        want, margin = _loop_select_global(gates[0, h].double().tolist(), own.tolist(), select, tau, topk)
        if margin >= 1e-5:
            got = {(i, c) for i, c in glob[0, h].nonzero().tolist()}
            assert got == want


def test_bits_pack_and_unpack(seed):
    sel = torch.rand(2, 3, 17, 70) < 0.5
    bits = R.pack_row_bits(sel)
    assert bits.shape == (2, 3, 3, 17) and bits.dtype == torch.int32
    assert torch.equal(R.unpack_row_bits(bits, 70), sel)


# -- the gate kernels ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_chunks, query_block", [(4, 64), (37, 16)])
@pytest.mark.parametrize("rule", [("threshold", 0.25), ("threshold", 0.7), ("topk", 3)])
def test_gate_kernels_equal_the_reference(seed, n_chunks, query_block, rule):
    rng = random.Random(seed)
    bounds_l = _bounds([rng.randint(1, 9) for _ in range(n_chunks)])
    s, d = bounds_l[-1], 32
    bounds = torch.tensor(bounds_l, dtype=torch.int32)
    # (B, S, H, D) seen as (B, H, S, D): the kernels read diffusers' layout in place
    q = torch.randn(1, s, 2, d).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, s, 2, d).to(torch.bfloat16).transpose(1, 2)
    q[:, :, 0] = 0  # a row whose gates all tie
    means_ref = R.chunk_means(k, bounds)
    means = chunk_means(k, bounds, backend="triton")
    torch.testing.assert_close(means, means_ref, atol=1e-6, rtol=1e-5)
    select, x = rule
    kw = dict(select=select, tau=x if select == "threshold" else 0.25, topk=x if select == "topk" else 3,
              query_block=query_block)
    want = chunk_gate(q, means_ref, bounds, backend="torch", **kw)
    got = chunk_gate(q, means_ref, bounds, backend="triton", **kw)
    for name, a, b in zip(("bits", "union", "keys"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    sel = R.unpack_row_bits(want[0], n_chunks)
    own = R.chunk_of_token(bounds, s)
    assert sel[..., torch.arange(s), own].all()  # the own chunk, always
    assert (sel.sum(-1) >= min(2, n_chunks)).all()  # and at least one other


# -- chunk-sparse attention ----------------------------------------------------------------------


def _check(out, lse, q, k, v, plan):
    mask = plan.to_token_mask()
    ref, ref_lse = dense_masked_attention(q, k, v, mask)
    low, _ = dense_masked_attention(q, k, v, mask, dtype=q.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    bound = 2 * rel_err(low, ref) + 1e-6
    assert rel_err(out, ref) <= bound, (rel_err(out, ref), bound)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out[empty.expand_as(lse)] == 0).all()
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 64), (torch.float16, 64), (torch.bfloat16, 64),
                                             (torch.float32, 128)], ids=["fp32-64", "fp16-64", "bf16-64", "fp32-128"])
def test_chunk_attention_matches_fp64(seed, backend, dtype, head_dim):
    rng = random.Random(seed)
    sizes = [rng.choice([5, 16, 33, 70]) for _ in range(6)]  # not multiples of the tile
    bounds = _bounds(sizes)
    s = bounds[-1]
    q, k, v = (torch.randn(2, 2, s, head_dim).to(dtype) for _ in range(3))
    plan = plan_chunks(q, k, bounds, tau=0.3, query_block=32, backend="torch")
    assert 0 < plan.density() < 1 and plan.density() <= plan.tile_density() <= 1
    out, lse = chunk_sparse_attention(q, k, v, plan, return_lse=True, backend=backend)
    _check(out, lse, q, k, v, plan)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunk_attention_rows_that_select_nothing_and_split_walks(seed, backend):
    bounds = [0, 20, 21, 90, 100]
    s, nc = bounds[-1], 4
    q, k, v = (torch.randn(1, 2, s, 32) for _ in range(3))
    sel = torch.rand(1, 2, s, nc) < 0.4
    sel[:, :, :7] = False  # rows that attend nothing
    sel[:, 1, 40:] = True
    union = torch.nn.functional.pad(sel, (0, 0, 0, 128 - s)).view(1, 2, 2, 64, nc).any(3)
    plan = ChunkPlan.from_selection(union, R.pack_row_bits(sel), bounds, block_m=64, q_len=s, kv_len=s)
    kw = {"kv_splits": 3} if backend == "triton" else {}
    if kw:
        from gen.kernels.block_sparse_attention import chunk_sparse_attention as kernel

        out, lse = kernel(q, k, v, plan, return_lse=True, **kw)
    else:
        out, lse = chunk_sparse_attention(q, k, v, plan, return_lse=True, backend=backend)
    _check(out, lse, q, k, v, plan)
    assert (out[:, :, :7] == 0).all() and torch.isneginf(lse[:, :, :7]).all()


def test_chunk_plan_checks_say_what_to_fix():
    bounds = [0, 10, 20]
    sel = torch.ones(1, 1, 20, 2, dtype=torch.bool)
    union = torch.zeros(1, 1, 1, 2, dtype=torch.bool)
    union[..., 0] = True  # chunk 1 is selected by rows but not visited
    plan = ChunkPlan.from_selection(union, R.pack_row_bits(sel), bounds, block_m=32, q_len=20, kv_len=20)
    with pytest.raises(ValueError, match="does not visit"):
        ChunkPlan(32, 20, 20, plan.chunk_bounds, plan.kv_indices, plan.kv_counts, plan.row_bits, 10)
    with pytest.raises(ValueError, match="rise strictly"):
        ChunkPlan(32, 20, 20, torch.tensor([0, 12, 12, 20], dtype=torch.int32), plan.kv_indices, plan.kv_counts,
                  torch.zeros(1, 1, 1, 20, dtype=torch.int32), 12)
    q = torch.randn(1, 1, 21, 16)
    with pytest.raises(ValueError, match="built for q_len=20"):
        chunk_sparse_attention(q, q, q, plan, backend="torch")
    with pytest.raises(ValueError, match="select must be"):
        chunk_gate(q, torch.zeros(1, 1, 2, 16), torch.tensor([0, 10, 21], dtype=torch.int32), select="top-p")


# -- the method ----------------------------------------------------------------------------------


def _chunk_ids(layout, tile):
    """Chunk of each frame-major video token, from its coordinates (independent of the
    method's token order): tiles in raster order."""
    coords = layout.video_coords()
    n = [-(-g // t) for g, t in zip(layout.grid, tile)]
    ct = [coords[:, i] // tile[i] for i in range(3)]
    return (ct[0] * n[1] + ct[1]) * n[2] + ct[2]


def _independent_rows(q, k, layout, tile, tau):
    """Per (head, query) of batch 0: the chunks the rule picks from fp64 gates computed from
    token coordinates, with the decision margin."""
    ids = _chunk_ids(layout, tile)
    nc = int(ids.max()) + 1
    qd, kd = q[0].double(), k[0].double()
    out = {}
    for h in range(q.shape[1]):
        means = torch.stack([kd[h, ids == c].mean(0) for c in range(nc)])
        gates = (qd[h] @ means.T).tolist()
        for i in range(q.shape[2]):
            out[h, i] = _loop_select(gates[i], int(ids[i]), "threshold", tau, 3)
    return out, ids


def _full_mask(m, q, k, layout, ctx):
    """The method's exact per-row mask over all tokens of the call (text rule included)."""
    vs = layout.video_slice
    masks = []
    for b in range(q.shape[0]):
        video = m.video_token_mask_of_call(layout, q[b:b + 1, :, vs], k[b:b + 1, :, vs], ctx)
        full = torch.ones(q.shape[1], layout.seq_len, layout.seq_len, dtype=torch.bool)
        full[:, vs, vs] = video
        masks.append(full)
    return torch.stack(masks)


FAMILIES = {
    "wan": (TokenLayout(5, 7, 9), None),
    "hunyuan": (TokenLayout(5, 7, 9, text_len=6), "pad"),
    "flux": (TokenLayout(1, 10, 9, text_len=5, text_first=True), None),
}


@pytest.mark.parametrize("layer", [0, 1, 2], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_method_equals_dense_attention_masked_by_its_chunks(seed, family, layer):
    layout, pad = FAMILIES[family]
    m = get_method("vmoba", chunks_1d=2, chunks_2d=(3, 4), chunks_3d=(2, 3, 4), tau=0.3, backend="torch")
    part = m.partition(layer)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16) for _ in range(3))
    kv_valid = torch.tensor([layout.seq_len, layout.seq_len - 4]) if pad else None
    ctx = AttentionContext(layer_index=layer, kv_valid=kv_valid)
    out = m.attention(q, k, v, layout, ctx)
    mask = _full_mask(m, q, k, layout, ctx)
    ref, _ = dense_masked_attention(q, k, v, mask, kv_valid=kv_valid)
    assert rel_err(out, ref) < 1e-5
    # the selection is the rule's, from an independent computation (chunks from coordinates)
    vs = layout.video_slice
    rows, ids = _independent_rows(q[:, :, vs], k[:, :, vs], TokenLayout(*layout.grid), m.chunk_tile(layout, part), 0.3)
    video = mask[0][:, vs, vs]
    checked = 0
    for (h, i), (want, margin) in rows.items():
        if margin < 1e-5:
            continue
        checked += 1
        assert set(ids[video[h, i]].tolist()) == want, (part, h, i)
    assert checked > 0.9 * len(rows)
    assert 0 < m.density(layout, 2) <= 1


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_triton_backend_equals_the_reference(seed, family):
    layout = TokenLayout(3, 5, 6) if family == "wan" else TokenLayout(3, 5, 6, text_len=4)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16) for _ in range(3))
    outs = {}
    for backend in ("torch", "triton"):
        m = get_method("vmoba", chunks_1d=2, chunks_2d=(3, 4), chunks_3d=(2, 3, 4), tau=0.4, backend=backend)
        outs[backend] = [m.attention(q, k, v, layout, AttentionContext(layer_index=layer)) for layer in (1, 2)]
    for a, b in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_tau_one_is_dense_and_topk_one_is_the_own_chunk(seed):
    layout = TokenLayout(4, 6, 8)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16) for _ in range(3))
    dense = dense_masked_attention(q, k, v, torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool))[0]
    ctx = AttentionContext(layer_index=2)
    m = get_method("vmoba", chunks_3d=(2, 3, 4), tau=1.0, backend="torch")
    assert rel_err(m.attention(q, k, v, layout, ctx), dense) < 1e-5
    own = get_method("vmoba", chunks_3d=(2, 3, 4), select="topk", topk=(1, 1, 1), backend="torch")
    ids = _chunk_ids(layout, (2, 3, 4))
    block = ids.view(-1, 1) == ids.view(1, -1)
    ref = dense_masked_attention(q, k, v, block)[0]
    assert rel_err(own.attention(q, k, v, layout, ctx), ref) < 1e-5
    glob = get_method("vmoba", chunks_3d=(2, 3, 4), mode="global", tau=0.3, backend="torch")
    out = glob.attention(q, k, v, layout, ctx)
    ref = dense_masked_attention(q, k, v, _full_mask(glob, q, k, layout, ctx))[0]
    assert rel_err(out, ref) < 1e-5


def test_chunks_of_the_authors_config_and_ragged_grids():
    m = get_method("vmoba", model="wan2.1-t2v-1.3b")
    fv = TokenLayout(20, 28, 52)  # FastVideo's stored config: 77 frames at 448x832
    for part, size, count in (("1d", 2912, 10), ("2d", 1040, 28), ("3d", 208, 140)):
        _, bounds, longest = m.chunking(fv, part)
        sizes = {b - a for a, b in zip(bounds[:-1], bounds[1:])}
        assert sizes == {size} and longest == size and len(bounds) - 1 == count
    native = TokenLayout(21, 30, 52)  # 480p, 81 frames: ragged edge chunks
    for part, count in (("1d", 11), ("2d", 32), ("3d", 192)):
        perm, bounds, _ = m.chunking(native, part)
        assert len(bounds) - 1 == count and bounds[-1] == native.video_len
        assert len({b - a for a, b in zip(bounds[:-1], bounds[1:])}) > 1
        # every chunk is a contiguous run of the order, holding exactly one tile's tokens
        ids = _chunk_ids(native, m.chunk_tile(native, part))
        order = torch.arange(native.video_len) if perm is None else perm.index
        in_order = ids[order]
        for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            assert (in_order[a:b] == c).all()
    assert chunk_bounds((3, 5, 5), (2, 2, 5)) == [0, 20, 40, 50, 60, 70, 75]
    for grid, tile in (((3, 5, 5), (2, 2, 5)), ((21, 30, 52), (4, 4, 13)), ((5, 7, 9), (5, 3, 4))):
        assert torch.equal(chunk_order(grid, tile).index, tile_order(grid, tile, pad=False).index)


def test_schedule_partition_cycle_and_presets():
    m = get_method("vmoba", first_full_layer=2, dense_layers=(7,))
    assert [m.is_dense_layer(i) for i in range(8)] == [True, True, False, False, False, False, False, True]
    assert [m.partition(i) for i in range(2, 8)] == ["1d", "2d", "3d", "1d", "2d", "3d"]
    assert get_method("vmoba", partitions="2d").partition(5) == "2d"
    wan = get_method("vmoba", model="wan2.1-t2v-1.3b").config
    assert (wan.chunks_1d, wan.chunks_2d, wan.chunks_3d, wan.select, wan.tau, wan.mode) == (
        2, (4, 13), (4, 4, 13), "threshold", 0.25, "query_head")
    assert get_method("vmoba", model="flux.1-dev", family="flux").config.partition_cycle == ("2d",)
    from gen.attention.methods.presets import PRESETS
    from gen.pipelines import MODELS

    for key in PRESETS["vmoba"]:
        spec = MODELS.get(key)
        meth = get_method("vmoba", model=key if spec else None, family=spec.family if spec else None,
                          **({} if spec else PRESETS["vmoba"][key]))
        if spec is not None:
            layout = TokenLayout(*spec.token_grid())
            for part in meth.config.partition_cycle:
                assert len(meth.chunking(layout, part)[1]) - 1 <= 1024  # the gate kernel's limit


@pytest.mark.parametrize("bad, match", [
    (dict(chunks_1d=0), "chunks_1d"), (dict(chunks_2d=(4,)), "chunks_2d"), (dict(chunks_3d=(4, 4, 0)), "chunks_3d"),
    (dict(select="topp"), "select must be"), (dict(tau=0), "tau must be"), (dict(topk=0), "topk must be"),
    (dict(mode="head"), "mode must be"), (dict(first_full_layer=-1), "first_full_layer"),
    (dict(partitions="1d,4d"), "partitions must"), (dict(query_block=48), "query_block"),
])
def test_config_errors_say_what_to_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        get_method("vmoba", **bad)
    assert VMoBAConfig(topk=[2, 6, 18]).topk == (2, 6, 18)


# -- pictures, bench, compile, GPU ---------------------------------------------------------------


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=pytest.mark.slow), "tiny-flux"])
def test_vmoba_on_tiny_pipelines(name):
    import numpy as np

    import gen
    from gen.pipelines import load

    from test_sparsify_pipelines import _run

    pipe = load(name)
    pipe.set_progress_bar_config(disable=True)
    stock = _run(pipe, name)
    with gen.sparse(pipe, "vmoba") as handle:
        out = _run(pipe, name)
        s = handle.summary()["transformers"][0]
        assert s["sparse_calls"] > 0
        assert all(0 < d < 1 for d in s["density"].values())
    assert np.isfinite(out).all() and np.abs(out - stock).max() > 1e-4
    assert np.array_equal(_run(pipe, name), stock)



def test_masks_command_draws_a_captured_call(tmp_path):
    from typer.testing import CliRunner

    from gen.capture import capture
    from gen.cli import app

    cap = tmp_path / "cap.safetensors"
    capture("tiny-hunyuan", "a cat", steps=[1], layers=[1], heads=[1], out=cap)
    out = tmp_path / "m.png"
    res = CliRunner().invoke(app, ["masks", "--method", "vmoba", "--capture", str(cap), "--step", "1", "--layer", "1",
                                   "--head", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 0 and (tmp_path / "m-tokens.png").stat().st_size > 0
    assert "video density" in res.output


def test_bench_kernels_times_the_method(seed):
    from gen.bench.kernels import run_kernel_bench
    from gen.cli import _method_plans

    shape, plans = _method_plans("vmoba", "tiny-wan")
    res = run_kernel_bench(shape, [1.0], dtype="fp32", device="cpu", backends=["auto", "torch", "gather"], reps=1,
                           plans=plans)
    rows = [r for r in res.rows if r.plan == "vmoba"]
    assert {r.impl for r in rows} == {"auto (torch)", "torch"}
    assert all(r.rel_err < 1e-5 and 0 < r.density < 1 and r.plan_ms is not None for r in rows)
    assert any("gather on vmoba" in s for s in res.meta["skipped"])


@pytest.mark.slow
def test_compiles_into_one_graph(seed):
    layout = TokenLayout(3, 5, 6, text_len=4)
    m = get_method("vmoba", chunks_1d=2, chunks_2d=(3, 4), chunks_3d=(2, 3, 4), backend="torch")
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16) for _ in range(3))
    ctx = AttentionContext(layer_index=2)
    eager = m.attention(q, k, v, layout, ctx)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: m.attention(a, b, c, layout, ctx), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_kernels_at_the_authors_shape(seed):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        pytest.skip("set TRITON_INTERPRET=0 to test the compiled kernels")
    layout = TokenLayout(20, 28, 52)  # FastVideo's Wan 1.3B config, 29120 tokens
    m = get_method("vmoba", model="wan2.1-t2v-1.3b")
    for part in ("1d", "2d", "3d"):
        _, bounds, _ = m.chunking(layout, part)
        q, k, v = (torch.randn(1, 4, layout.video_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        bt = torch.tensor(bounds, dtype=torch.int32, device="cuda")
        means = chunk_means(k, bt)
        torch.testing.assert_close(means, R.chunk_means(k, bt), atol=1e-4, rtol=1e-4)
        got = chunk_gate(q, means, bt)
        want = R.chunk_gate(q, means, bt)
        assert (got[0] != want[0]).float().mean() < 1e-3  # near-ties may flip
        plan = plan_chunks(q, k, bounds)
        out = chunk_sparse_attention(q, k, v, plan)
        ref = chunk_sparse_attention(q.double(), k.double(), v.double(), plan, backend="torch")
        low = chunk_sparse_attention(q, k, v, plan, backend="torch")
        assert rel_err(out, ref) <= 2 * rel_err(low, ref) + 1e-6, part


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_method_runs_without_host_sync(seed):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        pytest.skip("set TRITON_INTERPRET=0 to test the compiled kernels")
    layout = TokenLayout(21, 30, 52)  # Wan 2.1 1.3B 480p: ragged 2-D and 3-D chunks
    m = get_method("vmoba", model="wan2.1-t2v-1.3b")
    q, k, v = (torch.randn(1, 12, layout.video_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for layer in range(3):  # warm-up: compiles, autotunes, fills the per-device caches
        m.attention(q, k, v, layout, AttentionContext(layer_index=layer))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(3):
            out = m.attention(q, k, v, layout, AttentionContext(layer_index=layer))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()
    assert 0 < m.density(layout, 12) < 1
