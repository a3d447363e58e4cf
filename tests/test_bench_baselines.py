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
    assert all(r.plan_ms is None for r in res.rows)  # no dynamic method yet
