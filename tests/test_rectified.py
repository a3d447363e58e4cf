"""Rectified SpaAttn: exactness where pooling is exact, p=1 is dense, the plan and the R/C
terms against an independent fp64 implementation written block by block from the
formulas, joint text (HunyuanVideo padding, FLUX text first), and end-to-end use."""

import math

import numpy as np
import pytest
import torch

import gen
from gen.attention import AttentionContext, TokenLayout
from gen.attention.methods import get_method
from gen.attention.methods.rectified import RectifiedConfig

from helpers import dense_masked_attention, rel_err

CTX = AttentionContext()


def _blockwise_constant(x, perm, b):
    """x (B, H, S, D) made constant within every block of b tokens of perm's order."""
    y = perm.apply(x, dim=2)
    n = y.shape[2]
    y = y[:, :, ::b].repeat_interleave(b, dim=2)[:, :, :n]
    return perm.invert(y, dim=2)


def _joint(q, k, v, layout, kv_valid=None):
    mask = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool)
    return dense_masked_attention(q, k, v, mask, kv_valid=kv_valid)[0]


@pytest.mark.parametrize("order", ["hilbert", "frame"])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_blockwise_constant_inputs_give_dense_attention_at_any_p(seed, order, p):
    # pooling is exact and GAPR's error is 0: every dropped block is rectified exactly
    layout = TokenLayout(4, 8, 8)  # 256 tokens, 16 blocks of 16
    m = get_method("rectified", block_size=16, p=p, order=order, top_k=1, neighbours=False, first_frame=False)
    perm = m._perm(layout)
    q, k, v = (_blockwise_constant(torch.randn(2, 3, 256, 32), perm, 16) for _ in range(3))
    out = m.attention(q, k, v, layout, CTX)
    ref = _joint(q, k, v, layout)
    assert rel_err(out, ref) < 1e-5
    assert m.density(layout, 3) < 0.9  # blocks really were dropped


@pytest.mark.parametrize("family", ["hunyuan", "flux"])
def test_blockwise_constant_with_joint_text_is_exact(seed, family):
    # IPAR: text keys stay individual, so the pooled softmax is still exact
    if family == "hunyuan":
        layout = TokenLayout(3, 8, 8, text_len=9)
        kv_valid = torch.tensor([layout.video_len + 9, layout.video_len + 4])
    else:
        layout = TokenLayout(1, 8, 12, text_len=7, text_first=True)
        kv_valid = None
    m = get_method("rectified", block_size=16, p=0.2, top_k=1, neighbours=False, first_frame=False)
    perm = m._perm(layout)
    vs = layout.video_slice
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16) for _ in range(3))
    for x in (q, k, v):
        x[:, :, vs] = _blockwise_constant(x[:, :, vs], perm, 16)
    ctx = AttentionContext(kv_valid=kv_valid)
    out = m.attention(q, k, v, layout, ctx)
    ref = _joint(q, k, v, layout, kv_valid)
    assert rel_err(out, ref) < 1e-5
    # and not by accident: the plain sparse selection differs
    plain = get_method("rectified", block_size=16, p=0.2, top_k=1, neighbours=False, first_frame=False, rectify=False)
    assert rel_err(plain.attention(q, k, v, layout, ctx), ref) > 1e-3


@pytest.mark.parametrize("grid", [(3, 8, 8), (3, 5, 7)])  # (3, 5, 7): 105 tokens, ragged last block
def test_p_one_is_dense_on_random_inputs(seed, grid):
    layout = TokenLayout(*grid)
    m = get_method("rectified", block_size=16, p=1.0)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32) for _ in range(3))
    assert rel_err(m.attention(q, k, v, layout, CTX), _joint(q, k, v, layout)) < 1e-5


def _fp64_estimate(q, k, v, layout, cfg, perm, k_text=None, text_valid=None):
    """The method's estimate written out block by block in fp64 (loops, no shared code):
    returns (selected bool [B,H,nb,nb], R [B,H,nb], C [B,H,nb,D])."""
    q, k, v = (perm.apply(x, dim=2).double() for x in (q, k, v))
    bsz, heads, n, d = q.shape
    b = cfg.block_size
    nb = math.ceil(n / b)
    blocks = [range(i * b, min(n, (i + 1) * b)) for i in range(nb)]
    # neighbour / first-frame blocks from token coordinates
    coords = layout.video_coords()[perm.index]
    block_of = torch.arange(n) // b
    forced = np.eye(nb, dtype=bool)
    for i in range(n):
        for j in range(n):
            if (coords[i] - coords[j]).abs().max() <= 1 and cfg.neighbours:
                forced[block_of[i], block_of[j]] = True
            if cfg.first_frame and layout.frames > 1 and coords[i][0] == 0 and coords[j][0] == 0:
                forced[block_of[i], block_of[j]] = True
    top_k = cfg.top_k if cfg.top_k is not None else max(1, int((1 - cfg.drop_rate) * nb))
    sel = torch.zeros(bsz, heads, nb, nb, dtype=torch.bool)
    r = torch.zeros(bsz, heads, nb, dtype=torch.float64)
    c = torch.zeros(bsz, heads, nb, d, dtype=torch.float64)
    scale = 1 / math.sqrt(d)
    for bb in range(bsz):
        for h in range(heads):
            mean = lambda x, blk, bb=bb, h=h: torch.stack([x[bb, h, t] for t in blk]).mean(0)
            qm = [mean(q, blk) for blk in blocks]
            km = [mean(k, blk) for blk in blocks]
            vm = [mean(v, blk) for blk in blocks]
            dq = [torch.stack([(q[bb, h, t] - qm[i]).abs() for t in blk]).mean(0) for i, blk in enumerate(blocks)]
            dk = [torch.stack([(k[bb, h, t] - km[i]).abs() for t in blk]).mean(0) for i, blk in enumerate(blocks)]
            for i in range(nb):
                weights = [len(blocks[j]) * math.exp(float(qm[i] @ km[j]) * scale) for j in range(nb)]
                text = 0.0
                if k_text is not None:
                    tv = k_text.shape[2] if text_valid is None else int(text_valid[bb])
                    text = sum(math.exp(float(qm[i] @ k_text[bb, h, t].double()) * scale) for t in range(tv))
                total = sum(weights) + text
                prob = [w / total for w in weights]
                pt = text / total
                ranked = sorted(range(nb), key=lambda j: -prob[j])
                mass, keep = pt, []
                for j in ranked:  # while the mass so far is <= p, take one more
                    if mass <= cfg.p or len(keep) < top_k:
                        keep.append(j)
                        mass += prob[j]
                chosen = set(keep) | {j for j in range(nb) if forced[i, j]}
                r_i, c_i = pt, torch.zeros(d, dtype=torch.float64)
                for j in range(nb):
                    gain = abs(float(qm[i] @ km[j]))
                    err = abs(float(dq[i] @ km[j])) + abs(float(qm[i] @ dk[j]))
                    rectified = (gain > err) if cfg.gapr else True
                    if j in chosen or not rectified:
                        r_i += prob[j]
                    else:
                        c_i += prob[j] * vm[j]
                    sel[bb, h, i, j] = j in chosen
                r[bb, h, i], c[bb, h, i] = r_i, c_i
    return sel, r, c


@pytest.mark.parametrize("text", [False, True])
@pytest.mark.parametrize("gapr", [True, False])
def test_plan_r_and_c_equal_an_fp64_blockwise_computation(seed, text, gapr):
    layout = TokenLayout(3, 5, 6)  # 90 tokens: 6 blocks of 16, the last ragged
    cfg = RectifiedConfig(block_size=16, p=0.4, drop_rate=0.6, gapr=gapr)
    m = get_method(cfg)
    perm = m._perm(layout)
    q, k, v = (torch.randn(2, 2, layout.video_len, 8) for _ in range(3))
    k_text = torch.randn(2, 2, 5, 8) if text else None
    text_valid = torch.tensor([5, 2]) if text else None
    est = m.estimate(*(perm.apply(x, dim=2) for x in (q, k, v)), layout, k_text, text_valid)
    sel, r, c = _fp64_estimate(q, k, v, layout, cfg, perm, k_text, text_valid)
    assert torch.equal(est.plan.to_block_mask().expand_as(sel), sel)
    torch.testing.assert_close(est.r.double(), r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(est.c.double(), c, atol=1e-5, rtol=1e-5)
    assert est.r.max() <= 1 + 1e-6 and ((est.r < 1 - 1e-6) | (c.abs().sum(-1) == 0)).all()


def test_without_rectification_it_is_block_sparse_attention_over_the_plan(seed):
    layout = TokenLayout(4, 6, 8)
    m = get_method("rectified", block_size=16, p=0.3, rectify=False, order="frame")
    q, k, v = (torch.randn(1, 2, layout.video_len, 16) for _ in range(3))
    plan = m.plan(layout, 2, CTX, q=q, k=k)
    ref = dense_masked_attention(q, k, v, plan.to_token_mask())[0]
    assert rel_err(m.attention(q, k, v, layout, CTX), ref) < 1e-5
    assert 0 < plan.density() < 1


def test_estimation_reports_density_and_backends_agree(seed):
    layout = TokenLayout(3, 8, 8)
    q, k, v = (torch.randn(1, 2, layout.video_len, 16) for _ in range(3))
    outs = []
    # None is the PyTorch reference on the CPU; "triton" runs gen's estimation and
    # attention kernels (through the interpreter here)
    for backend in ("torch", None, "triton"):
        m = get_method("rectified", block_size=16, backend=backend)
        with pytest.raises(NotImplementedError, match="run a call first"):
            m.density(layout, 2)
        outs.append(m.attention(q, k, v, layout, CTX))
        assert 0 < m.density(layout, 2) <= 1
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (dict(p=0), "p must be"), (dict(drop_rate=1.0), "drop_rate"), (dict(top_k=-1), "top_k"),
    (dict(block_size=100), "block_size"), (dict(order="zigzag"), "order must be"), (dict(gapr="yes"), "gapr"),
])
def test_config_errors_say_what_to_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        get_method("rectified", **bad)


def test_presets_follow_the_authors():
    wan = get_method("rectified", model="wan2.1-t2v-14b").config
    assert (wan.p, wan.drop_rate, wan.dense_steps, wan.dense_layers) == (0.3, 0.75, 5, 2)
    hy = get_method("rectified", model="hunyuanvideo").config
    assert (hy.p, hy.drop_rate, hy.dense_steps) == (0.3, 0.8, 0)
    flux = get_method("rectified", model="flux.1-dev").config
    assert flux.drop_rate == 0.9 and flux.dense_layers == tuple(range(37, 57)) and not flux.first_frame


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-hunyuan", "tiny-flux"])
def test_rectified_on_tiny_pipelines(name):
    from gen.pipelines import load

    from test_sparsify_pipelines import _run

    pipe = load(name)
    pipe.set_progress_bar_config(disable=True)
    stock = _run(pipe, name)
    with gen.sparse(pipe, "rectified") as handle:
        out = _run(pipe, name)
        s = handle.summary()["transformers"][0]
        assert s["sparse_calls"] > 0
        assert all(0 < d < 1 for d in s["density"].values())
    assert np.isfinite(out).all()
    assert np.abs(out - stock).max() > 1e-4
    assert np.array_equal(_run(pipe, name), stock)


def test_masks_command_draws_the_plan_of_a_captured_call(tmp_path):
    from typer.testing import CliRunner

    from gen.capture import capture
    from gen.cli import app

    cap = tmp_path / "cap.safetensors"
    capture("tiny-hunyuan", "a cat", steps=[1], layers=[1], heads=[1], out=cap)
    runner = CliRunner()
    out = tmp_path / "m.png"
    res = runner.invoke(app, ["masks", "--method", "rectified", "--capture", str(cap), "--step", "1", "--layer", "1",
                              "--head", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 0 and (tmp_path / "m-tokens.png").stat().st_size > 0
    assert "video density" in res.output
    res = runner.invoke(app, ["masks", "--method", "rectified", "--capture", str(cap), "--step", "0", "--out", str(out)])
    assert res.exit_code == 2 and "step 1 layer 1" in res.output  # says which calls it has
    res = runner.invoke(app, ["masks", "--method", "rectified", "--capture", str(cap), "--step", "1", "--layer", "1",
                              "--head", "0", "--out", str(out)])
    assert res.exit_code == 2 and "kept heads" in res.output
