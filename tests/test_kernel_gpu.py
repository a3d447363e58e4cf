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
