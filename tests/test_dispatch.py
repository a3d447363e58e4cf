"""Backend choice: automatic on CPU is the reference, and the choice is logged."""

import logging

import torch

from gen.attention import BlockPlan, block_sparse_attention, dispatch, select_backend


def test_auto_picks_torch_on_cpu_and_logs_why(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.DEBUG, logger="gen.attention"):
        assert select_backend(torch.device("cpu")) == "torch"
    assert any("backend: torch" in r.getMessage() and "cpu" in r.getMessage() for r in caplog.records)


def test_auto_and_explicit_give_same_result(seed):
    q, k, v = (torch.randn(1, 2, 150, 64) for _ in range(3))
    plan = BlockPlan.random(150, 150, 0.5, heads=2, block_m=64, block_n=64)
    auto = block_sparse_attention(q, k, v, plan)
    torch.testing.assert_close(auto, block_sparse_attention(q, k, v, plan, backend="torch"), atol=0, rtol=0)
    torch.testing.assert_close(auto, block_sparse_attention(q, k, v, plan, backend="triton"), atol=2e-6, rtol=1e-5)


def test_top_level_names():
    import gen

    assert gen.BlockPlan is BlockPlan and gen.block_sparse_attention is block_sparse_attention
    assert "TokenLayout" in dir(gen)
