"""Baselines of `gen bench kernels`: the flex BlockMask is the plan; skips are recorded."""

import warnings

import torch

from gen.attention import BlockPlan
from gen.attention import reference as ref_mod


def test_flex_block_mask_matches_the_plan(seed):
    from torch.nn.attention.flex_attention import flex_attention

    from gen.bench.baselines import plan_to_block_mask

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))  # ragged last blocks
    plan = BlockPlan.random(300, 300, 0.4, batch=1, heads=2, block_m=64, block_n=32, generator=g)
    mask = plan_to_block_mask(plan, 1, 2)
    assert torch.equal(mask.to_dense().bool(), plan.to_block_mask())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        out = flex_attention(q, k, v, block_mask=mask)
    torch.testing.assert_close(out, ref_mod.block_sparse_attention(q, k, v, plan), atol=1e-5, rtol=1e-5)


def test_kernel_bench_records_skipped_baselines():
    from gen.bench.kernels import QUICK_SHAPE, run_kernel_bench

    res = run_kernel_bench(QUICK_SHAPE, [0.5], dtype="fp32", device="cpu", backends=["torch"], reps=1)
    assert any(s.startswith("flex: ") for s in res.meta["skipped"])  # CUDA only
    assert all(r.plan_ms is None for r in res.rows)  # static plans: no estimation time


def test_kernel_bench_times_a_dynamic_methods_estimation_apart(tmp_path):
    import json

    from typer.testing import CliRunner

    from gen.cli import app

    out = tmp_path / "k.json"
    res = CliRunner().invoke(app, ["bench", "kernels", "--quick", "--method", "rectified", "--density", "1",
                                   "--backend", "torch", "--reps", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    rect = [r for r in rows if r["plan"] == "rectified"]
    assert rect and all(r["plan_ms"] > 0 and 0 < r["density"] < 1 for r in rect)
    assert all(r["plan_ms"] is None for r in rows if r["plan"] != "rectified")
