"""Block-sparse attention (Triton kernel and PyTorch reference) against an fp64 dense
masked reference on fresh random inputs.

Error rule (FlashAttention's): the backend's relative error against fp64 must be at
most twice what plain PyTorch attention at the input precision gets, plus a small
floor. Under the interpreter, bf16 dots are upcast to fp32 (see the kernel's docstring).
"""

import math

import pytest
import torch

from gen.attention import BlockPlan, block_sparse_attention

from helpers import dense_masked_attention, rel_err

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(b, h, sq, skv, d, dtype):
    q = torch.randn(b, h, sq, d).to(dtype)
    k = torch.randn(b, h, skv, d).to(dtype)
    v = torch.randn(b, h, skv, d).to(dtype)
    return q, k, v


def _check(out, lse, q, k, v, plan, *, kv_valid=None, kv_mask=None, scale=None):
    mask = plan.to_token_mask()
    ref, ref_lse = dense_masked_attention(q, k, v, mask, kv_valid=kv_valid, kv_mask=kv_mask, scale=scale)
    low, _ = dense_masked_attention(q, k, v, mask, kv_valid=kv_valid, kv_mask=kv_mask, scale=scale, dtype=q.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    bound = 2 * rel_err(low, ref) + 1e-6
    err = rel_err(out, ref)
    assert err <= bound, f"relative error {err:.3e} > bound {bound:.3e} ({plan})"
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isneginf(lse), empty), "rows seeing nothing must have lse = -inf"
        assert (out[empty.expand_as(lse)] == 0).all(), "rows seeing nothing must be zeros"
        torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq_len", [256, 257, 1000])
def test_matches_fp64_reference(seed, backend, seq_len, head_dim, dtype, density):
    b, h = 2, 2
    q, k, v = _inputs(b, h, seq_len, seq_len, head_dim, dtype)
    block_m = 128 if seq_len == 1000 else 64  # 128 exercises sub-tiling of a plan row
    plan = BlockPlan.random(seq_len, seq_len, density, batch=b, heads=h, block_m=block_m, block_n=64)
    if density == 1.0:
        assert plan.density() == 1.0
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend=backend)
    _check(out, lse, q, k, v, plan)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_broadcast_plan_and_padded_keys(seed, backend, dtype):
    """One plan for all heads and samples; per-sample key padding (one sample fully padded)."""
    b, h, s, d = 3, 2, 300, 64
    q, k, v = _inputs(b, h, s, s, d, dtype)
    mask = torch.rand(5, 10) < 0.6
    mask[:, 0] = True
    plan = BlockPlan.from_block_mask(mask, 64, 32, s, s)
    assert plan.kv_indices.shape[:2] == (1, 1)
    kv_valid = torch.tensor([s, 123, 0])
    out, lse = block_sparse_attention(q, k, v, plan, kv_valid=kv_valid, return_lse=True, backend=backend)
    _check(out, lse, q, k, v, plan, kv_valid=kv_valid)
    assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False])
def test_key_mask_anywhere_in_the_sequence(seed, backend, shared):
    """kv_mask drops keys anywhere (padding slots of a permuted order), with kv_valid too."""
    b, h, s, d = 2, 2, 333, 64
    q, k, v = _inputs(b, h, s, s, d, torch.float16)
    plan = BlockPlan.random(s, s, 0.6, batch=b, heads=h, block_m=64, block_n=64)
    kv_mask = torch.rand(s) < 0.7 if shared else torch.rand(b, s) < 0.7
    kv_mask[..., :64] = False  # a whole key block masked
    kv_valid = torch.tensor([s, 200])
    out, lse = block_sparse_attention(q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask, return_lse=True,
                                      backend=backend)
    _check(out, lse, q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "sq, skv, d, bm, bn",
    [(300, 520, 64, 64, 64), (77, 130, 96, 64, 32), (200, 200, 256, 64, 64), (129, 129, 16, 16, 16),
     (500, 500, 128, 128, 128)],
)
def test_shapes_and_block_sizes(seed, backend, sq, skv, d, bm, bn):
    """Cross-attention lengths, head dims that are not powers of two, and block sizes."""
    q, k, v = _inputs(1, 2, sq, skv, d, torch.float16)
    plan = BlockPlan.random(sq, skv, 0.5, heads=2, block_m=bm, block_n=bn)
    scale = 0.3
    out, lse = block_sparse_attention(q, k, v, plan, scale=scale, return_lse=True, backend=backend)
    _check(out, lse, q, k, v, plan, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_all_blocks_plan_equals_dense_sdpa(seed, backend, dtype):
    q, k, v = _inputs(2, 3, 333, 333, 64, dtype)
    plan = BlockPlan.dense(333, block_m=64, block_n=64)
    out = block_sparse_attention(q, k, v, plan, backend=backend)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel_err(out, ref) <= 2 * rel_err(low, ref) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(seed, backend):
    """diffusers hands (B, S, H, D) tensors transposed to (B, H, S, D): strided views."""
    b, s, h, d = 2, 200, 3, 64
    q, k, v = (torch.randn(b, s, h, d).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    plan = BlockPlan.random(s, s, 0.5, batch=b, heads=h, block_m=64, block_n=64)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend=backend)
    _check(out, lse, q, k, v, plan)


def test_backends_agree(seed):
    q, k, v = _inputs(1, 4, 700, 700, 128, torch.float32)
    plan = BlockPlan.random(700, 700, 0.3, heads=4, block_m=64, block_n=64)
    a, la = block_sparse_attention(q, k, v, plan, return_lse=True, backend="triton")
    b, lb = block_sparse_attention(q, k, v, plan, return_lse=True, backend="torch")
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(la, lb, atol=2e-6, rtol=1e-6)


def test_reference_chunking_is_exact(seed):
    """The reference's memory bound (query-block chunks) must not change the result."""
    from gen.attention import reference

    q, k, v = _inputs(1, 2, 1000, 1000, 32, torch.float32)
    plan = BlockPlan.random(1000, 1000, 0.4, heads=2, block_m=64, block_n=64)
    whole = reference.block_sparse_attention(q, k, v, plan, return_lse=True)
    chunked = reference.block_sparse_attention(q, k, v, plan, return_lse=True, score_budget=1)
    torch.testing.assert_close(whole[0], chunked[0], atol=0, rtol=0)
    torch.testing.assert_close(whole[1], chunked[1], atol=0, rtol=0)


def test_reference_memory_stays_linear_in_visits(seed):
    """A long sequence with a few visits per row runs without an S x S matrix (S=40000:
    S x S fp32 would be 6.4 GB per head)."""
    from gen.attention import reference

    s = 40000
    q, k, v = _inputs(1, 1, s, s, 16, torch.float32)
    plan = BlockPlan.random(s, s, 2 / math.ceil(s / 128), block_m=128, block_n=128)
    assert plan.max_visits == 2
    out = reference.block_sparse_attention(q, k, v, plan, score_budget=1 << 22)
    rows = torch.randint(0, s, (5,))
    for r in rows.tolist():
        qb = r // 128
        keys = torch.cat([torch.arange(j * 128, min(s, (j + 1) * 128)) for j in plan.kv_indices[0, 0, qb].tolist()])
        p = torch.softmax((q[0, 0, r].double() @ k[0, 0, keys].double().T) * 16**-0.5, -1)
        torch.testing.assert_close(out[0, 0, r].double(), p @ v[0, 0, keys].double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_key_splits_merge_to_the_same_result(seed, splits, dtype):
    """Splitting each row's visits over programs (few query rows, many keys: the text
    queries of a joint call) and merging by LSE equals the fp64 reference, with padding,
    a key mask, rows with no visits and more splits than some rows have visits."""
    from gen.kernels import block_sparse_attention as triton_bsa

    b, h, sq, skv, d = 2, 2, 150, 700, 64
    q, k, v = _inputs(b, h, sq, skv, d, dtype)
    plan = BlockPlan.random(sq, skv, 0.4, batch=b, heads=h, block_m=64, block_n=64)
    kv_valid = torch.tensor([skv, 301])
    kv_mask = torch.rand(skv) < 0.8
    out, lse = triton_bsa(q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask, return_lse=True, kv_splits=splits)
    _check(out, lse, q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask)
    plain = triton_bsa(q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask, kv_splits=splits)
    assert torch.equal(plain, out)


@pytest.mark.parametrize("valid", [128, 129, 127, 0, 1])
def test_valid_length_on_and_around_block_edges(seed, valid):
    """The whole/masked split of a row's visits (binary search on the valid length) at
    block edges: keys past ``kv_valid`` never count, whole blocks before it always do."""
    q, k, v = _inputs(1, 2, 100, 384, 32, torch.float32)
    plan = BlockPlan.random(100, 384, 0.7, heads=2, block_m=64, block_n=64)
    kv_valid = torch.tensor([valid])
    out, lse = block_sparse_attention(q, k, v, plan, kv_valid=kv_valid, return_lse=True, backend="triton")
    _check(out, lse, q, k, v, plan, kv_valid=kv_valid)


def test_key_split_choice(monkeypatch):
    """Automatic splits: only when a call launches fewer programs than the GPU has SMs."""
    import importlib

    m = importlib.import_module("gen.kernels.block_sparse_attention")
    cuda = torch.device("cuda", 0)
    assert m.choose_kv_splits(torch.device("cpu"), 1, 1, 1000) == 1
    monkeypatch.setattr(m, "sm_count", lambda device: 132)  # an H100 SXM
    # HunyuanVideo 720p text queries: 24 heads x 2 rows of 128 against ~932 key blocks
    assert m.choose_kv_splits(cuda, 24, 2, 932) == 3
    assert m.choose_kv_splits(cuda, 12, 256, 256) == 1  # Wan video: thousands of programs
    assert m.choose_kv_splits(cuda, 1, 1, 8) == 2  # at least 4 visits per split
    assert m.choose_kv_splits(cuda, 1, 1, 10000) == 16  # at most 16
    with pytest.raises(ValueError, match="kv_splits"):
        q = torch.randn(1, 1, 64, 16)
        m.block_sparse_attention(q, q, q, BlockPlan.dense(64, block_m=64, block_n=64), kv_splits=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_tensor_descriptor_loads_match_reference(seed, dtype):
    """The Hopper variant (K/V through tensor descriptors) under the interpreter: ragged
    ends, padding and a key mask; values of masked keys may hold nan and must not leak."""
    from gen.kernels import block_sparse_attention as triton_bsa

    b, h, s, d = 2, 2, 333, 64
    q, k, v = _inputs(b, h, s, s, d, dtype)
    plan = BlockPlan.random(s, s, 0.5, batch=b, heads=h, block_m=64, block_n=64)
    kv_valid = torch.tensor([s, 250])
    kv_mask = torch.rand(s) < 0.8
    v_bad = v.clone()
    v_bad[1, :, 250:] = float("nan")  # padding past the valid length
    v_bad[:, :, ~kv_mask] = float("nan")  # masked slots
    out, lse = triton_bsa(q, k, v_bad, plan, kv_valid=kv_valid, kv_mask=kv_mask, return_lse=True, tma=True)
    _check(out, lse, q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask)


def test_tensor_descriptor_loads_refuse_what_they_cannot_read():
    import importlib

    m = importlib.import_module("gen.kernels.block_sparse_attention")
    q = torch.randn(1, 2, 100, 80)  # head dim not a power of two
    assert not m.tma_usable(q, q, q)[0]
    plan = BlockPlan.dense(100, block_m=64, block_n=64)
    with pytest.raises(ValueError, match="power of two"):
        m.block_sparse_attention(q, q, q, plan, tma=True)
    q = torch.randn(1, 100, 2, 64).transpose(1, 2)  # (B, S, H, D) seen as (B, H, S, D): fine
    assert m.tma_usable(q, q, q)[0]
    wide = torch.randn(1, 2, 100, 128)[..., ::2]  # head dim strided
    assert "contiguous" in m.tma_usable(wide, wide, wide)[1]
