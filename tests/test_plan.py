"""BlockPlan: construction, conversions, density, validation and pictures."""

import math

import pytest
import torch

from gen.attention import BlockPlan


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_from_block_mask_round_trip(seed, lead):
    nq, nk = 7, 9
    mask = torch.rand(*lead, nq, nk) < 0.4
    mask[..., 0, :] = False  # an empty row
    plan = BlockPlan.from_block_mask(mask, 64, 32, q_len=nq * 64 - 5, kv_len=nk * 32 - 31)
    full = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    assert torch.equal(plan.to_block_mask(), full)
    assert torch.equal(plan.kv_counts, full.sum(-1).int())
    assert plan.kv_indices.dtype == torch.int32 and plan.kv_counts.dtype == torch.int32
    used = torch.arange(plan.max_visits) < plan.kv_counts.unsqueeze(-1)
    for row, cnt in zip(plan.kv_indices.reshape(-1, plan.max_visits), plan.kv_counts.flatten()):
        vals = row[:cnt].tolist()
        assert vals == sorted(set(vals))
    assert (plan.kv_indices[~used] >= 0).all() and (plan.kv_indices < nk).all()


def test_token_mask_matches_blocks_with_ragged_edges(seed):
    mask = torch.rand(2, 4, 5) < 0.5
    plan = BlockPlan.from_block_mask(mask, 16, 8, q_len=50, kv_len=35)
    tok = plan.to_token_mask()
    assert tok.shape == (1, 2, 50, 35)
    for h in range(2):
        for i in range(50):
            for j in range(35):
                assert tok[0, h, i, j] == mask[h, i // 16, j // 8]


def test_density_is_token_weighted(seed):
    plan = BlockPlan.random(1000, 777, 0.3, batch=2, heads=3, block_m=128, block_n=64)
    expected = plan.to_token_mask().double().mean().item()
    assert math.isclose(plan.density(), expected, rel_tol=1e-12)
    assert plan.density_per_head().shape == (2, 3)
    assert BlockPlan.dense(1000, 777, block_m=128, block_n=64).density() == 1.0


def test_random_plan_visits_fixed_count(seed):
    plan = BlockPlan.random(1000, 1000, 0.25, heads=4, block_m=64, block_n=64)
    assert (plan.kv_counts == round(0.25 * 16)).all()
    assert BlockPlan.random(100, 100, 0.0, block_m=64, block_n=64).kv_counts.sum() == 0
    with pytest.raises(ValueError, match=r"density must lie in \[0, 1\]"):
        BlockPlan.random(100, 100, 1.5)


def test_visit_data_follows_visits(seed):
    mask = torch.rand(3, 4) < 0.6
    level = torch.arange(12).view(3, 4)
    plan = BlockPlan.from_block_mask(mask, 16, 16, 48, 64, visit_data={"level": level})
    got = plan.visit_data["level"]
    for i in range(3):
        n = int(plan.kv_counts[0, 0, i])
        assert got[0, 0, i, :n].tolist() == level[i, plan.kv_indices[0, 0, i, :n].long()].tolist()


def test_constructor_validation():
    idx = torch.zeros(1, 1, 2, 2, dtype=torch.int32)
    cnt = torch.ones(1, 1, 2, dtype=torch.int32)
    BlockPlan(64, 64, 100, 100, idx, cnt)
    with pytest.raises(ValueError, match="int32"):
        BlockPlan(64, 64, 100, 100, idx.long(), cnt)
    with pytest.raises(ValueError, match="needs 1"):
        BlockPlan(128, 64, 100, 100, idx, cnt)
    with pytest.raises(ValueError, match="positive int"):
        BlockPlan(0, 64, 100, 100, idx, cnt)
    with pytest.raises(ValueError, match="outside"):
        BlockPlan(64, 64, 100, 100, idx + 5, cnt)
    with pytest.raises(ValueError, match="strictly ascending"):
        BlockPlan(64, 64, 100, 100, torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.int32), cnt * 2)
    with pytest.raises(ValueError, match="made for another length"):
        BlockPlan.from_block_mask(torch.ones(3, 3, dtype=torch.bool), 64, 64, 100, 100)
    with pytest.raises(ValueError, match="bool"):
        BlockPlan.from_block_mask(torch.ones(2, 2), 64, 64, 100, 100)


def test_repr_and_ascii_picture(seed):
    mask = torch.eye(6, dtype=torch.bool) | torch.eye(6, dtype=torch.bool).roll(1, 1)
    plan = BlockPlan.from_block_mask(mask, 64, 64, 380, 380)
    r = repr(plan)
    assert "q_len=380" in r and "grid=6x6" in r and f"density={plan.density():.4f}" in r
    lines = plan.to_string().splitlines()
    assert len(lines) == 7
    assert lines[1:] == ["".join("█" if m else "░" for m in row) for row in mask.tolist()]


def test_ascii_picture_pools_large_grids(seed):
    plan = BlockPlan.random(128 * 200, 64 * 300, 0.5, block_m=128, block_n=64)
    lines = plan.to_string(max_cells=50).splitlines()
    assert "pooled" in lines[0]
    assert max(len(line) for line in lines[1:]) <= 50
    assert set("".join(lines[1:])) <= set(" ░▒▓█")


def test_png_picture(tmp_path, seed):
    plan = BlockPlan.random(1000, 1000, 0.3, heads=2, block_m=64, block_n=64)
    path = plan.save_png(tmp_path / "plans" / "p.png", head=1)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match="outside the plan"):
        plan.save_png(tmp_path / "q.png", head=5)


def test_to_device_keeps_plan():
    plan = BlockPlan.random(300, 300, 0.5, heads=2, block_m=64, block_n=64)
    moved = plan.to("cpu")
    assert torch.equal(moved.kv_indices, plan.kv_indices) and torch.equal(moved.kv_counts, plan.kv_counts)
    assert moved.is_validated
