"""The backend registry: every block-sparse backend equals the reference on the kernel
test grid, and the chooser's decisions for a set of calls."""

import pytest
import torch

from gen.attention import BlockPlan, block_sparse_attention, reference
from gen.attention.backends import Backend, Call, backends, choose, explain, register

from helpers import dense_masked_attention, rel_err

CPU = torch.device("cpu")


def _check(out, lse, q, k, v, plan, *, kv_valid=None, kv_mask=None):
    ref, ref_lse = dense_masked_attention(q, k, v, plan.to_token_mask(), kv_valid=kv_valid, kv_mask=kv_mask)
    low, _ = dense_masked_attention(q, k, v, plan.to_token_mask(), kv_valid=kv_valid, kv_mask=kv_mask, dtype=q.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= 2 * rel_err(low, ref) + 1e-6
    if lse is not None:
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isneginf(lse), empty)
        assert (out[empty.expand_as(lse)] == 0).all()
        torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seq", [(257, 257), (1000, 333), (64, 700)])
@pytest.mark.parametrize("masks", ["none", "valid", "valid+mask"])
def test_sdpa_backend_on_dense_plans(seed, dtype, seq, masks):
    sq, skv = seq
    q, k, v = torch.randn(2, 3, sq, 64).to(dtype), torch.randn(2, 3, skv, 64).to(dtype), torch.randn(2, 3, skv, 64).to(dtype)
    plan = BlockPlan.dense(sq, skv, 128, 64)
    kv_valid = torch.tensor([skv, 0]) if masks != "none" else None  # one sample sees nothing
    kv_mask = (torch.rand(skv) < 0.7) if masks == "valid+mask" else None
    out, lse = block_sparse_attention(q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask, return_lse=True, backend="sdpa")
    _check(out, lse, q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("seq", [(257, 257), (1000, 333)])
@pytest.mark.parametrize("blocks", [(64, 64), (128, 32)])
@pytest.mark.parametrize("backend", ["gather", "masked"])
def test_gather_and_masked_backends_match_reference(seed, dtype, density, seq, blocks, backend):
    sq, skv = seq
    b, h = 2, 2
    q = torch.randn(b, h, sq, 64).to(dtype)
    k, v = torch.randn(b, h, skv, 64).to(dtype), torch.randn(b, h, skv, 64).to(dtype)
    plan = BlockPlan.random(sq, skv, density, batch=b, heads=h, block_m=blocks[0], block_n=blocks[1])
    kv_valid = torch.tensor([skv, skv // 2])
    kv_mask = torch.rand(b, skv) < 0.8
    out, lse = block_sparse_attention(q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask, return_lse=True,
                                      backend=backend)
    _check(out, lse, q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask)


def test_gather_backend_chunks_exactly(seed):
    from gen.attention.backends.gather import gathered_attention

    q, k, v = (torch.randn(1, 2, 700, 32) for _ in range(3))
    plan = BlockPlan.random(700, 700, 0.4, heads=2, block_m=64, block_n=64)
    whole = gathered_attention(q, k, v, plan, return_lse=True)
    chunked = gathered_attention(q, k, v, plan, return_lse=True, budget=1)
    torch.testing.assert_close(whole[0], chunked[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(whole[1], chunked[1], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_flex_backend_matches_reference(seed):
    """Compiled flex_attention on the CPU (inference, no LSE: torch's limits), with a
    ragged end, padding and a key mask: partial blocks evaluate the mask, full ones not."""
    b, h, s = 2, 2, 333
    q, k, v = (torch.randn(b, h, s, 64) for _ in range(3))
    plan = BlockPlan.random(s, s, 0.4, batch=b, heads=h, block_m=64, block_n=64)
    kv_valid = torch.tensor([s, 200])
    kv_mask = torch.rand(s) < 0.8
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask, backend="flex")
    _check(out, None, q, k, v, plan, kv_valid=kv_valid, kv_mask=kv_mask)


def test_block_mask_marks_only_clean_blocks_full():
    from gen.attention.backends.flex import plan_to_block_mask

    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    plan = BlockPlan.from_block_mask(mask, 64, 64, 128, 250)  # last key block ragged (58 keys)
    key_ok = torch.ones(1, 250, dtype=torch.bool)
    key_ok[0, 70] = False  # one masked key in block 1
    bm = plan_to_block_mask(plan, 1, 1, key_ok)
    full = bm.full_kv_num_blocks[0, 0].tolist()
    part = bm.kv_num_blocks[0, 0].tolist()
    assert full == [1, 1] and part == [2, 2]  # block 0 / 2 full; block 1 (masked key), 3 (ragged) partial
    assert bm.full_kv_indices[0, 0, 0, 0].item() == 0 and bm.full_kv_indices[0, 0, 1, 0].item() == 2
    assert sorted(bm.kv_indices[0, 0, 0, :2].tolist()) == [1, 3]


def _call(**kw) -> Call:
    base = dict(device=CPU, dtype=torch.float32, batch=1, heads=12, q_len=4096, kv_len=4096, head_dim=64,
                full=False, density=0.25, return_lse=True)
    return Call(**{**base, **kw})


@pytest.mark.parametrize(
    "call, chosen",
    [
        (_call(full=True, density=1.0), "sdpa"),  # dense plan on the CPU: torch's fused attention
        (_call(), "gather"),  # sparse with LSE
        (_call(return_lse=False), "gather"),  # gather before flex
        (_call(q_len=320, kv_len=320, heads=4, density=0.865, block_m=16), "masked"),  # radial at 320 tokens
        (_call(q_len=320, kv_len=320, heads=4, density=0.15, block_m=16), "gather"),  # gna at 320 tokens
        (_call(q_len=1000, kv_len=1000, density=0.6, block_m=128), "gather"),  # big blocks: later crossover
        (_call(density=0.9, mask_heads=12), "gather"),  # a 12 x 4096^2 mask is too large to keep
        (_call(dtype=torch.float64), "torch"),  # only the reference takes fp64
        (_call(full=True, density=1.0, compiling=True), "sdpa"),  # in a graph, fullness recorded
        (_call(full=None, density=None, compiling=True), "torch"),  # in a graph: the reference
        (_call(device=torch.device("cuda"), dtype=torch.bfloat16, full=None, density=None), "triton"),
    ],
    ids=["dense", "sparse", "sparse-no-lse", "masked-small-dense-ish", "gather-small-sparse", "gather-big-blocks",
         "mask-too-large", "fp64", "compiling-full", "compiling-unknown", "cuda"],
)
def test_chooser_decisions(call, chosen):
    got = choose("block_sparse", call)
    assert got.name == chosen, explain("block_sparse", call)
    reasons = dict(explain("block_sparse", call))
    assert reasons[chosen] is None
    for name, why in got.skipped:  # every backend before the chosen one says why not
        assert why and reasons[name] == why


def test_automatic_choice_on_real_calls(seed, caplog):
    q, k, v = (torch.randn(1, 2, 300, 64) for _ in range(3))
    from gen.attention.backends import registry

    registry._logged.clear()  # decisions are logged once per process
    caplog.set_level("DEBUG", logger="gen.attention")
    dense = BlockPlan.dense(300, block_m=64, block_n=64)
    sparse = BlockPlan.random(300, 300, 0.5, heads=2, block_m=64, block_n=64)
    for plan in (dense, sparse):
        out, lse = block_sparse_attention(q, k, v, plan, return_lse=True)
        ref, ref_lse = reference.block_sparse_attention(q, k, v, plan, return_lse=True)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    text = caplog.text
    assert "block_sparse attention on cpu: sdpa" in text and "block_sparse attention on cpu: gather" in text
    assert "triton:" in text  # why the kernel was skipped is logged


def test_named_backends_refuse_with_reasons():
    q = torch.randn(1, 1, 100, 64, dtype=torch.float64)
    plan = BlockPlan.random(100, 100, 0.5, block_m=64, block_n=64)
    with pytest.raises(ValueError, match="the plan skips blocks"):
        block_sparse_attention(q.float(), q.float(), q.float(), plan, backend="sdpa")
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        block_sparse_attention(q, q, q, plan, backend="gather")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'.*triton, sdpa, masked, gather, flex, torch"):
        block_sparse_attention(q, q, q, plan, backend="cudnn")
    with pytest.raises(ValueError, match="log-sum-exp"):
        block_sparse_attention(q.float(), q.float(), q.float(), plan, backend="flex", return_lse=True)


def test_registry_rules():
    assert [b.name for b in backends("block_sparse")] == ["triton", "sdpa", "masked", "gather", "flex", "torch"]
    assert [b.name for b in backends("cache")] == ["triton", "torch"]
    with pytest.raises(ValueError, match="already registered"):
        register(Backend("torch", "block_sparse", lambda: None, lambda call: None))
    with pytest.raises(ValueError, match="unknown operation"):
        backends("pooling")
    assert choose("cache", _call()).name == "torch"


def test_gather_reuses_buffers_safely_and_keeps_gradients(seed):
    # the gather backend reuses its padded/gathered buffers between calls: alternating
    # shapes (ragged and whole, with and without key padding) must each stay exact, and a
    # call that autograd records must not use them
    from gen.attention import reference
    from gen.attention.backends.gather import gathered_attention

    cases = []
    for s, kv_valid in ((1000, None), (512, None), (1000, torch.tensor([900])), (512, torch.tensor([300]))):
        q, k, v = (torch.randn(1, 2, s, 32) for _ in range(3))
        plan = BlockPlan.random(s, s, 0.3, heads=2, block_m=128, block_n=64)
        cases.append((q, k, v, plan, kv_valid))
    outs = [gathered_attention(q, k, v, p, kv_valid=kv, return_lse=True) for q, k, v, p, kv in cases]
    for (q, k, v, p, kv), (o, lse) in zip(cases, outs):
        ref, ref_lse = reference.block_sparse_attention(q, k, v, p, kv_valid=kv, return_lse=True)
        torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    q, k, v, p, _ = cases[0]
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    gathered_attention(q, k, v, p).square().sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    reference.block_sparse_attention(q, k, v, p).square().sum().backward()
    for g, x in zip(got, (q, k, v)):
        torch.testing.assert_close(g, x.grad, atol=1e-4, rtol=1e-4)



@pytest.mark.parametrize("backend", ["gather", "masked", "torch", "sdpa"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("padded", [False, True], ids=["tiles", "padded-tiles"])
def test_token_order_path_equals_permuting_by_hand(seed, backend, layout, padded):
    # block_sparse_attention(..., token_order=perm): inputs and result in the original
    # order, the plan over the order's slots; each backend (native or permuted by the
    # dispatch) against the reference on permuted inputs, in fp64
    from gen.attention.token_order import tile_order

    perm = tile_order((3, 5, 7), (1, 4, 4)) if padded else tile_order((4, 8, 8), (1, 4, 4))
    n, slots = perm.n_in, perm.n_out
    density = 1.0 if backend == "sdpa" else 0.4
    plan = BlockPlan.random(slots, slots, density, batch=2, heads=3, block_m=16, block_n=16)
    if layout == "bhsd":
        q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    else:
        q, k, v = (torch.randn(2, n, 3, 16).transpose(1, 2) for _ in range(3))
    if backend == "sdpa" and padded:
        pytest.skip("a padded order's plan never visits every block as the sdpa backend needs")
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend=backend, token_order=perm)
    qs, ks, vs = (perm.apply(x.contiguous(), dim=2).double() for x in (q, k, v))
    ref, ref_lse = reference.block_sparse_attention(qs, ks, vs, plan, return_lse=True,
                                                    kv_mask=perm.valid if padded else None)
    ref, ref_lse = perm.invert(ref, dim=2), perm.invert(ref_lse.unsqueeze(-1), dim=2).squeeze(-1)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], ref_lse.double()[fin], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["gather", "masked"])
def test_kept_buffers_survive_switching_inference_mode(seed, backend):
    # buffers and per-plan tables made under torch.inference_mode() must not be written
    # or saved for backward outside it (a pipeline run in inference mode, then a call
    # with autograd or under no_grad)
    from gen.attention.token_order import tile_order

    perm = tile_order((3, 5, 7), (1, 4, 4))
    plan = BlockPlan.random(perm.n_out, perm.n_out, 0.4 if backend == "gather" else 0.9, heads=2,
                            block_m=16, block_n=16)
    q, k, v = (torch.randn(1, 2, perm.n_in, 16) for _ in range(3))
    with torch.inference_mode():
        first = block_sparse_attention(q, k, v, plan, backend=backend, token_order=perm)
        plain = block_sparse_attention(perm.apply(q), perm.apply(k), perm.apply(v), plan, backend=backend,
                                       kv_mask=perm.valid)
    with torch.no_grad():
        again = block_sparse_attention(q, k, v, plan, backend=backend, token_order=perm)
    torch.testing.assert_close(again, first.clone())
    qg = q.clone().requires_grad_()
    block_sparse_attention(qg, k, v, plan, backend=backend, token_order=perm).sum().backward()
    assert torch.isfinite(qg.grad).all()
    out = block_sparse_attention(perm.apply(q), perm.apply(k), perm.apply(v), plan, backend=backend, kv_mask=perm.valid)
    torch.testing.assert_close(out, plain.clone())
