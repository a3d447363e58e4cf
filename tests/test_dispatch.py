"""Backend choice through the public entry point: automatic on the CPU is torch's fused
attention (dense plans) or the gathered-block path (sparse ones), never slower than the
reference, and every backend gives the reference's result."""

import pytest
import torch

from gen.attention import BACKENDS, BlockPlan, block_sparse_attention, select_backend


def test_select_backend_by_device():
    assert select_backend(torch.device("cpu")) == "gather"
    assert select_backend(torch.device("cpu"), "torch") == "torch"
    assert BACKENDS == ("triton", "sdpa", "masked", "gather", "flex", "torch")
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend(torch.device("cpu"), "xla")


@pytest.mark.parametrize("density", [0.5, 1.0])
def test_auto_and_explicit_give_same_result(seed, density):
    q, k, v = (torch.randn(1, 2, 150, 64) for _ in range(3))
    plan = BlockPlan.random(150, 150, density, heads=2, block_m=64, block_n=64)
    auto = block_sparse_attention(q, k, v, plan)
    for backend in ("torch", "triton", "gather"):
        torch.testing.assert_close(auto, block_sparse_attention(q, k, v, plan, backend=backend), atol=2e-6, rtol=1e-5)


def test_top_level_names():
    import gen

    assert gen.BlockPlan is BlockPlan and gen.block_sparse_attention is block_sparse_attention
    assert "TokenLayout" in dir(gen)
