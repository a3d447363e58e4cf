"""The compiled Triton kernel at real shapes in bf16/fp16 on a GPU.

Skipped without CUDA. Run on a GPU machine with the interpreter off:

    TRITON_INTERPRET=0 python -m pytest tests/test_kernel_gpu.py -m gpu
"""

import os

import pytest
import torch

from gen.attention import BlockPlan, reference
from gen.kernels import block_sparse_attention

from helpers import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _compiled_only():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        pytest.skip("set TRITON_INTERPRET=0 to test the compiled kernel")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("density", [1.0, 0.25, 0.05])
@pytest.mark.parametrize("shape", [(1, 12, 32760, 128), (1, 24, 4608, 128), (2, 4, 10001, 64)])
@pytest.mark.parametrize("blocks", [(128, 64), (64, 128)])
def test_real_shapes_against_reference(seed, dtype, density, shape, blocks):
    b, h, s, d = shape
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
    plan = BlockPlan.random(s, s, density, batch=b, heads=h, block_m=blocks[0], block_n=blocks[1], device="cuda")
    kv_valid = torch.tensor([s - 17] * b, device="cuda")
    out, lse = block_sparse_attention(q, k, v, plan, kv_valid=kv_valid, return_lse=True)
    ref, ref_lse = reference.block_sparse_attention(q.double(), k.double(), v.double(), plan,
                                                    kv_valid=kv_valid, return_lse=True)
    # plain PyTorch at the input precision on the same plan, as the error yardstick
    low = reference.block_sparse_attention(q, k, v, plan, kv_valid=kv_valid)  # fp32 math, rounded output
    low_err = max(rel_err(low, ref), torch.finfo(dtype).eps / 2)
    assert rel_err(out, ref) <= 3 * low_err, (rel_err(out, ref), low_err)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin].double(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "tensor-descriptors"])
@pytest.mark.parametrize("case", ["wan-video", "hunyuan-text-queries"])
def test_hopper_paths_at_real_shapes(seed, tma, case):
    """Tensor-descriptor loads (sm_90) and key splits (few query rows: HunyuanVideo's
    text queries, 256 rows against 119,296 keys with padded text) against the fp64
    reference, bf16."""
    from gen.kernels.block_sparse_attention import tma_usable

    if case == "wan-video":
        b, h, sq, skv, density, blocks = 1, 12, 32760, 32760, 0.25, (128, 64)
    else:
        b, h, sq, skv, density, blocks = 1, 24, 256, 119296, 1.0, (128, 128)
    q = torch.randn(b, sq, h, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(b, skv, h, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    if tma and not tma_usable(q, k, v)[0]:
        pytest.skip(tma_usable(q, k, v)[1])
    plan = BlockPlan.random(sq, skv, density, heads=h, block_m=blocks[0], block_n=blocks[1], device="cuda")
    kv_valid = torch.tensor([skv - 200], device="cuda")
    out, lse = block_sparse_attention(q, k, v, plan, kv_valid=kv_valid, return_lse=True, tma=tma)
    ref, ref_lse = reference.block_sparse_attention(q.double(), k.double(), v.double(), plan, kv_valid=kv_valid,
                                                    return_lse=True)
    low = reference.block_sparse_attention(q, k, v, plan, kv_valid=kv_valid)  # fp32 math, rounded output
    low_err = max(rel_err(low, ref), torch.finfo(torch.bfloat16).eps / 2)
    assert rel_err(out, ref) <= 3 * low_err, (rel_err(out, ref), low_err)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("shape, text", [((1, 40, 75600, 128), 0), ((1, 24, 119040, 128), 256)],
                         ids=["wan14b-720p", "hunyuan-720p"])
def test_estimation_kernels_at_real_shapes(seed, shape, text):
    from gen.attention import estimate_reference as est_ref
    from gen.kernels import block_estimate as est

    b, h, s, d = shape
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    got = est.block_stats(q, 128)
    ref = est_ref.block_stats(q, 128)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=2e-5)
    nb = -(-s // 128)
    logits = torch.randn(b, h, nb, nb, device="cuda") * 3
    text_logit = torch.randn(b, h, nb, device="cuda") if text else None
    rect = torch.rand(b, h, nb, nb, device="cuda") < 0.5
    forced = torch.rand(nb, nb, device="cuda") < 0.02
    idx, cnt, r, w = est.select_blocks(logits, text_logit, rect, forced, 0.3, int(0.25 * nb))
    ridx, rcnt, rr, rw = est_ref.select_blocks(logits, text_logit, rect, forced, 0.3, int(0.25 * nb))
    # selections may differ only in rows whose threshold is a near-tie in fp32
    same = (cnt == rcnt).float().mean()
    assert same > 0.999, f"{1 - same:.4%} of rows select differently"
    torch.testing.assert_close(r, rr, atol=1e-4, rtol=1e-4)


def test_rectified_on_the_gpu_matches_its_cpu_path(seed):
    # Wan 2.1 1.3B 480p geometry, bf16: gen's kernels (estimation and attention) against
    # the same method on the PyTorch reference
    from gen.attention import AttentionContext, TokenLayout
    from gen.attention.methods import get_method

    layout = TokenLayout(21, 30, 52)
    q, k, v = (torch.randn(1, 12, layout.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = get_method("rectified", model="wan2.1-t2v-1.3b").attention(q, k, v, layout, AttentionContext())
    ref = get_method("rectified", model="wan2.1-t2v-1.3b", backend="torch").attention(
        q.float(), k.float(), v.float(), layout, AttentionContext())
    assert rel_err(out.float(), ref) < 2e-2
