"""INT8 block-sparse attention (PARO): the Triton kernels (interpreted here) and the
PyTorch emulation against each other and against fp64 attention on fresh random inputs.

Quantization is compared bit for bit. Attention is compared (1) with the emulation,
tightly: both compute the same integer logits, so ``int8`` agrees to fp32 rounding, and
(2) with exact fp64 attention on the *unquantized* inputs, against an error predicted
from the quantization steps (see :func:`_predicted_qk_error`).

Measured relative L2 errors against fp64 (random normal q, k, v, S 150-193, plans of
density 0.6, fp32): ``int8`` 1.1-1.25e-2 at D=64 and D=128 (predicted 1.1-1.23e-2, within
3 %), ``int8-pv`` 1.75-2.06e-2 (predicted 1.77-1.98e-2), the Triton kernel within 2e-7 of
the emulation for ``int8`` (4e-3 in bf16: P·V in bf16) and 1-8e-3 for ``int8-pv`` (its
P grid follows the running max). Random normal inputs give flat softmaxes, the hard case
for the fixed 1/127 step of P.
The paper reports INT8 QK+PV on CogVideoX at PSNR 29.01 against 29.14 for sparse
attention alone (and SageAttention's INT8 QK at 29.58): INT8 QK costs little; an error of
about 1 % in each attention output is of that order.
"""

import math
import os

import pytest
import torch

from gen.attention import BlockPlan
from gen.attention.backends import backends, choose
from gen.attention.quant import quantize_qk, quantized_block_sparse_attention
from gen.attention.quant_reference import (
    dequantize,
    quant_block_sparse_attention_reference,
    quantize_qk_reference,
    quantize_v_reference,
)
from gen.kernels.quant_attention import quantize_qkv

from helpers import dense_masked_attention, rel_err

BACKENDS = ["triton", "torch"]
_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _bshd(b, h, s, d, dtype):
    # diffusers' (B, S, H, D) seen as (B, H, S, D): non-contiguous strides, as in real calls
    return torch.randn(b, s, h, d).to(dtype).transpose(1, 2)


# ------------------------------------------------------------------ quantization, bit-exact


@pytest.mark.parametrize("dtype", list(_IDS), ids=_IDS.get)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq_len", [1, 45, 161])
def test_quantize_bit_exact(seed, seq_len, head_dim, dtype):
    """Q per 32 tokens, K per 64, V per 64 tokens and channel: the Triton kernel equals the
    emulation bit for bit (ints and scales), ragged last groups included."""
    b, h = 1, 2
    q, k, v = (_bshd(b, h, seq_len, head_dim, dtype) * 3 for _ in range(3))
    got = quantize_qkv(q, k, v)
    want = (*quantize_qk_reference(q, k), *quantize_v_reference(v))
    shapes = [(b, h, seq_len, head_dim), (b, h, -(-seq_len // 32)), (b, h, seq_len, head_dim),
              (b, h, -(-seq_len // 64)), (b, h, seq_len, head_dim), (b, h, -(-seq_len // 64), head_dim)]
    for name, g, w, shape in zip(("q_int8", "q_scale", "k_int8", "k_scale", "v_int8", "v_scale"), got, want, shapes):
        assert tuple(g.shape) == shape and g.dtype == w.dtype, (name, g.shape, g.dtype)
        assert torch.equal(g, w), f"{name} differs in {(g != w).sum()} places"
    # the entry point gives the same bits on both backends
    for backend in BACKENDS:
        for g, w in zip(quantize_qk(q, k, backend=backend), want[:4]):
            assert torch.equal(g, w)
    # scale = amax/127 per group; ints within [-127, 127], the amax element at +-127
    qs = q.float().abs().reshape(b, h, -1, head_dim)
    amax = torch.stack([qs[:, :, i:i + 32].amax(dim=(2, 3)) for i in range(0, seq_len, 32)], dim=2)
    assert torch.equal(want[1], torch.where(amax == 0, 1.0, amax / 127))
    assert int(want[0].abs().max()) == 127
    # dequantized, every element is within half a step of the input
    for xi, xs, group, x in ((want[0], want[1], 32, q), (want[2], want[3], 64, k), (want[4], want[5], 64, v)):
        step = dequantize(torch.ones_like(xi), xs, group)
        slack = 4 * torch.finfo(torch.float32).eps * x.float().abs()  # x/scale rounds in fp32
        assert ((dequantize(xi, xs, group) - x.float()).abs() <= step / 2 + slack).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounding_ties_zero_groups_and_padding(backend):
    """Ties round half to even (torch.round), an all-zero group gets scale 1 and ints 0,
    keys past kv_valid or masked off are left out of the scale and quantize to 0."""
    d = 64
    q = torch.zeros(1, 1, 70, d)
    # group 0: amax 127 -> scale exactly 1, so x/scale are the ties themselves
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5, 4.5, 127.0])
    q[0, 0, 0, : ties.numel()] = ties
    q[0, 0, 40, 0] = 2.0  # group 1 (rows 32..63): amax 2; group 2 (64..69): all zero
    k = torch.zeros(1, 1, 150, d)
    k[0, 0, :, 0] = torch.arange(150.0)  # group amax grows with the position
    k[0, 0, 10, 1] = -1000.0  # an outlier in a masked-off key
    kv_valid = torch.tensor([140])
    kv_mask = torch.ones(150, dtype=torch.bool)
    kv_mask[10] = False
    qi, qs, ki, ks = quantize_qk(q, k, kv_valid=kv_valid, kv_mask=kv_mask, backend=backend)
    assert qi[0, 0, 0, : ties.numel()].tolist() == [0, 2, 2, 0, -2, -2, 126, -126, 4, 4, 127]
    f32 = lambda x: (torch.tensor(x) / 127).item()  # noqa: E731  (fp32 division, as the kernels)
    assert qs[0, 0].tolist() == [1.0, f32(2.0), 1.0]
    assert int(qi[0, 0, 40, 0]) == 127 and not qi[0, 0, 64:].any()
    # key group 0 ignores the masked outlier; group 2 (128..149) sees keys up to 139 only
    assert ks[0, 0].tolist() == [f32(63.0), f32(127.0), f32(139.0)]
    assert not ki[0, 0, 10].any() and not ki[0, 0, 140:].any()
    ref = quantize_qk_reference(q, k, kv_valid=kv_valid, kv_mask=kv_mask)
    for g, w in zip((qi, qs, ki, ks), ref):
        assert torch.equal(g, w)


# ------------------------------------------------------------------ attention


def _predicted_qk_error(q, k, v, token_mask, scale, kv_valid=None, kv_mask=None):
    """Predicted relative L2 error of attention with INT8 Q and K, from the quantization
    steps, to first order.

    Rounding to a step ``s`` errs by ``e`` with ``|e| <= s/2``, uniform: variance
    ``s^2/12`` (``s_q`` per 32 query rows, ``s_k`` per 64 keys). The logit error of (i, j)
    is ``delta_ij = scale · (q_i · e_kj + e_qi · k_j)`` (the ``e_q · e_k`` term is ``s_q s_k
    D / 4`` at worst, second order). To first order the output moves by ``delta o_i =
    sum_j P_ij (delta_ij - mean) (v_j - o_i)``, where the mean drops out because ``sum_j
    P_ij (v_j - o_i) = 0``. The ``e_kj`` are independent over keys and the ``e_qi`` shared by
    a row, so per output element

        E[delta o_id^2] = scale^2 · ( |q_i|^2 · sum_j P_ij^2 (v_jd - o_id)^2 s_kj^2 / 12
                                      + s_qi^2 / 12 · sum_c C_i[c, d]^2 ),
        C_i = sum_j P_ij k_j (v_j - o_i)^T.

    Returns ``sqrt(sum E[delta o^2]) / |o|`` over the valid rows. (A worst-case bound, all
    errors aligned, ``|delta_ij| <= scale (|q_i|_1 s_k/2 + |k_j|_1 s_q/2 + D s_q s_k/4)``, is
    ~0.2 in logits at D=128 and would allow errors of tens of percent: it proves nothing.)
    """
    qi, qs, ki, ks = quantize_qk_reference(q, k, kv_valid=kv_valid, kv_mask=kv_mask)
    s_q = qs.double().repeat_interleave(32, dim=2)[:, :, : q.shape[2]]
    s_k = ks.double().repeat_interleave(64, dim=2)[:, :, : k.shape[2]]
    qd, kd, vd = q.double(), k.double(), v.double()
    s = (qd @ kd.transpose(-1, -2)) * scale
    mask = token_mask.expand(s.shape)
    if kv_valid is not None:
        mask = mask & (torch.arange(k.shape[2]) < kv_valid.view(-1, 1, 1, 1))
    if kv_mask is not None:
        mask = mask & kv_mask.view(-1, 1, 1, k.shape[2])
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # (B, H, Sq, Skv)
    o = p @ vd
    dv = vd.unsqueeze(2) - o.unsqueeze(3)  # (B, H, Sq, Skv, D): v_j - o_i
    key_term = (qd.square().sum(-1)[..., None] * torch.einsum("bhij,bhijd->bhid", p.square() * s_k[:, :, None].square(),
                                                              dv.square()) / 12)
    c = torch.einsum("bhij,bhjc,bhijd->bhicd", p, kd, dv)
    q_term = s_q.square()[..., None] / 12 * c.square().sum(-2)
    var = scale**2 * (key_term + q_term)
    return float(var.sum().sqrt() / o.norm())


def _inputs(b, h, s, d, dtype):
    return (_bshd(b, h, s, d, dtype) for _ in range(3))


def _check_empty(out, lse, ref_lse):
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows seeing nothing must have lse = -inf"
    assert (out[empty] == 0).all(), "rows seeing nothing must be zeros"


@pytest.mark.parametrize("seq_len,head_dim,dtype,density", [
    (100, 64, torch.float32, 0.5),
    (193, 128, torch.float32, 0.6),
    (150, 64, torch.bfloat16, 0.7),
    (77, 128, torch.float16, 1.0),
], ids=["s100-d64-fp32", "s193-d128-fp32", "s150-d64-bf16", "s77-d128-fp16-dense"])
def test_int8_matches_emulation_and_fp64(seed, seq_len, head_dim, dtype, density):
    """``quant="int8"``, both backends on the same inputs: equal to the emulation up to
    fp32 (and output) rounding; against exact fp64 attention on the unquantized inputs,
    within twice the first-order prediction of :func:`_predicted_qk_error` plus twice what
    plain attention at the input precision errs (the P·V product runs in the input dtype
    on a GPU), and not far below the prediction (the inputs really are quantized)."""
    b, h = 2, 1
    q, k, v = _inputs(b, h, seq_len, head_dim, dtype)
    plan = BlockPlan.random(seq_len, seq_len, density, batch=b, heads=h, block_m=64, block_n=64)
    kv_valid = torch.tensor([seq_len, seq_len - 11])
    emu, emu_lse = quant_block_sparse_attention_reference(q, k, v, plan, kv_valid=kv_valid, return_lse=True)
    mask = plan.to_token_mask()
    ref, ref_lse = dense_masked_attention(q, k, v, mask, kv_valid=kv_valid)
    low, _ = dense_masked_attention(q, k, v, mask, kv_valid=kv_valid, dtype=dtype)
    predicted = _predicted_qk_error(q, k, v, mask, head_dim**-0.5, kv_valid=kv_valid)
    bound = 2 * predicted + 2 * rel_err(low, ref) + 1e-6
    tight = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    for backend in BACKENDS:
        out, lse = quantized_block_sparse_attention(q, k, v, plan, kv_valid=kv_valid, return_lse=True,
                                                    backend=backend)
        assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
        assert rel_err(out, emu) <= tight, (backend, rel_err(out, emu))
        fin = torch.isfinite(emu_lse)
        torch.testing.assert_close(lse[fin], emu_lse[fin], atol=1e-5, rtol=1e-5)
        err = rel_err(out, ref)
        assert err <= bound, f"{backend}: relative error {err:.3e} > bound {bound:.3e} (predicted {predicted:.3e})"
        assert err >= 0.3 * predicted, f"{backend}: error {err:.3e} far below the prediction {predicted:.3e}"
        _check_empty(out, lse, ref_lse)


def _p_quant_bound(q, k, v, token_mask, scale):
    """Worst-case relative L2 effect of quantizing P with the fixed step 1/127 (exact
    logits and V): with ``p_j <= 1`` relative to the row max, a weight errs by at most
    ``min(p_j, 1/254)`` (weights below 1/254 become 0), the kernel's running-max grid
    included (its step shrinks with the rescale). As the output divides by the quantized
    sum ``l' >= 1``, ``|delta o_id| <= sum_j min(p_j, 1/254) |v_jd - o_id| / l'``."""
    qd, kd, vd = q.double(), k.double(), v.double()
    s = ((qd @ kd.transpose(-1, -2)) * scale).masked_fill(~token_mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))
    o = (p @ vd) / p.sum(-1, keepdim=True).clamp_min(1e-300)
    err_w = torch.minimum(p, torch.full_like(p, 1 / 254))
    l_low = (p.sum(-1) - err_w.sum(-1)).clamp_min(1.0)
    dv = (vd.unsqueeze(2) - o.unsqueeze(3)).abs()
    bound = torch.einsum("bhij,bhijd->bhid", err_w, dv) / l_low[..., None]
    return float(bound.norm() / o.norm())


def _predicted_pv_error(q, k, v, token_mask, scale):
    """Predicted relative L2 error added by ``int8-pv``, to first order: ``(P, V)`` parts.

    P (relative to the row max, so ``p_j <= 1``) is rounded to the step 1/127: a weight
    errs by ``e_j`` with ``E[e_j^2] = 1/(12·127^2)`` when it spans steps, and by exactly
    ``-p_j`` when it rounds to 0 (``p_j < 1/254``), so ``E[e_j^2] <= min(p_j^2,
    1/(12·127^2))``. The output divides by the quantized sum, so ``delta o_i = sum_j e_j
    (v_j - o_i) / l_i``. V is rounded to a step ``s_v`` per 64 keys and channel (variance
    ``s_v^2/12``), averaged by the normalized weights: ``delta o_id = sum_j P_ij e_vjd``."""
    qd, kd, vd = q.double(), k.double(), v.double()
    s = ((qd @ kd.transpose(-1, -2)) * scale).masked_fill(~token_mask, -math.inf)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m)).nan_to_num(0.0)
    l_sum = p.sum(-1, keepdim=True).clamp_min(1e-300)
    o = (p @ vd) / l_sum
    w = torch.minimum(p.square(), torch.full_like(p, 1 / (12 * 127**2)))
    p_var = torch.einsum("bhij,bhijd->bhid", w, (vd.unsqueeze(2) - o.unsqueeze(3)).square()) / l_sum.square()
    _, vs = quantize_v_reference(v)
    s_v = vs.double().repeat_interleave(64, dim=2)[:, :, : v.shape[2]]
    v_var = (p / l_sum).square() @ (s_v.square() / 12)
    return float(p_var.sum().sqrt() / o.norm()), float(v_var.sum().sqrt() / o.norm())


@pytest.mark.parametrize("seq_len,head_dim,dtype", [(130, 64, torch.float32), (161, 128, torch.bfloat16)],
                         ids=["s130-d64-fp32", "s161-d128-bf16"])
def test_int8_pv(seed, seq_len, head_dim, dtype):
    """``quant="int8-pv"``, both backends on the same inputs: against fp64 attention within
    twice the combined first-order prediction (QK, P and V steps:
    :func:`_predicted_qk_error`, :func:`_predicted_pv_error`; measured within a few percent
    of it), against the emulation within the worst-case P bound of :func:`_p_quant_bound`
    (the kernel's P grid follows its running max); V constant over the keys comes back
    exactly (the output averages V under the quantized weights)."""
    b, h = 1, 1
    q, k, v = _inputs(b, h, seq_len, head_dim, dtype)
    plan = BlockPlan.random(seq_len, seq_len, 0.6, batch=b, heads=h, block_m=64, block_n=64)
    emu = quant_block_sparse_attention_reference(q, k, v, plan, quant="int8-pv")
    mask = plan.to_token_mask()
    scale = head_dim**-0.5
    p_bound = _p_quant_bound(q, k, v, mask, scale)
    ref, ref_lse = dense_masked_attention(q, k, v, mask)
    p_pred, v_pred = _predicted_pv_error(q, k, v, mask, scale)
    predicted = math.sqrt(_predicted_qk_error(q, k, v, mask, scale) ** 2 + p_pred**2 + v_pred**2)
    const = torch.full_like(v, 0.37)
    seen = ~torch.isinf(ref_lse)
    fin = torch.isfinite(ref_lse)
    for backend in BACKENDS:
        out, lse = quantized_block_sparse_attention(q, k, v, plan, quant="int8-pv", return_lse=True,
                                                    backend=backend)
        assert rel_err(out, emu) <= 2 * p_bound + torch.finfo(dtype).eps
        _check_empty(out, lse, ref_lse)
        err = rel_err(out, ref)
        assert 0.3 * predicted <= err <= 2 * predicted + 2 * torch.finfo(dtype).eps, (backend, err, predicted)
        # lse is the log of the quantized mass: close to the exact one
        assert float((lse[fin].double() - ref_lse[fin]).abs().max()) < 0.05
        # a value constant over the keys comes back exactly (up to rounding)
        out_c = quantized_block_sparse_attention(q, k, const, plan, quant="int8-pv", backend=backend)
        torch.testing.assert_close(out_c[seen].float(), torch.full_like(out_c[seen], 0.37).float(), atol=0,
                                   rtol=max(2 * torch.finfo(dtype).eps, 16 * torch.finfo(torch.float32).eps))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", ["int8", "int8-pv"])
def test_rows_visiting_nothing_and_padded_samples(seed, backend, quant):
    """Query blocks with no visits, a sample with no valid key and masked keys: zeros and
    lse = -inf where nothing is seen; elsewhere equal to the emulation."""
    b, h, s, d = 2, 1, 140, 64
    q, k, v = _inputs(b, h, s, d, torch.float32)
    mask = torch.rand(3, 3) < 0.7
    mask[1] = False  # query block 1 visits nothing
    mask[0, 0] = mask[2, 2] = True
    plan = BlockPlan.from_block_mask(mask, 64, 64, s, s)
    kv_valid = torch.tensor([s, 0])
    kv_mask = torch.rand(s) < 0.8
    out, lse = quantized_block_sparse_attention(q, k, v, plan, quant=quant, kv_valid=kv_valid, kv_mask=kv_mask,
                                                return_lse=True, backend=backend)
    assert (out[:, :, 64:128] == 0).all() and torch.isneginf(lse[:, :, 64:128]).all()
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    emu, emu_lse = quant_block_sparse_attention_reference(q, k, v, plan, quant=quant, kv_valid=kv_valid,
                                                          kv_mask=kv_mask, return_lse=True)
    assert torch.equal(torch.isinf(lse), torch.isinf(emu_lse))
    assert rel_err(out, emu) <= (1e-5 if quant == "int8" else 0.05)


def test_all_visits_plan_is_close_to_dense(seed):
    """An all-visits plan with ``quant="int8"`` is dense attention within the INT8
    prediction (Triton, interpreted), LSE included."""
    b, h, s, d = 1, 2, 160, 64
    q, k, v = _inputs(b, h, s, d, torch.float32)
    plan = BlockPlan.dense(s, s, 64, 64)
    out, lse = quantized_block_sparse_attention(q, k, v, plan, return_lse=True, backend="triton")
    full = torch.ones(1, 1, s, s, dtype=torch.bool)
    ref, ref_lse = dense_masked_attention(q, k, v, full)
    predicted = _predicted_qk_error(q, k, v, full, d**-0.5)
    assert rel_err(out, ref) <= 2 * predicted + 1e-6
    assert float((lse.double() - ref_lse).abs().max()) < 0.05
    # quant="none" is the plain block-sparse attention
    plain = quantized_block_sparse_attention(q, k, v, plan, quant="none", backend="torch")
    assert rel_err(plain, ref) < 1e-5


def test_kernel_splits_and_broadcast_plans(seed):
    """Key splits merged by log-sum-exp and a plan shared by all heads give the unsplit
    result."""
    from gen.kernels.quant_attention import quant_block_sparse_attention

    b, h, s, d = 1, 2, 140, 64
    q, k, v = _inputs(b, h, s, d, torch.float32)
    plan = BlockPlan.random(s, s, 0.8, batch=1, heads=1, block_m=64, block_n=64)
    for quant in ("int8", "int8-pv"):
        one, lse1 = quant_block_sparse_attention(q, k, v, plan, quant=quant, return_lse=True, kv_splits=1)
        three, lse3 = quant_block_sparse_attention(q, k, v, plan, quant=quant, return_lse=True, kv_splits=3)
        emu = quant_block_sparse_attention_reference(q, k, v, plan, quant=quant)
        if quant == "int8":
            assert rel_err(three, one) < 1e-6 and rel_err(one, emu) < 1e-5
        else:  # the P grid follows each split's own running max
            assert rel_err(three, one) < 0.05
        fin = torch.isfinite(lse1)
        torch.testing.assert_close(lse3[fin], lse1[fin], atol=0.05 if quant == "int8-pv" else 1e-5, rtol=0)


def test_other_block_sizes(seed):
    """Plans of 32 x 128 and 128 x 32 blocks (the kernel tiles them) match the emulation;
    the last key block is always visited (PARO forces it), so with 128-key blocks a 64-key
    sub-tile lies wholly past the 150 keys."""
    b, h, s, d = 1, 1, 150, 64
    q, k, v = _inputs(b, h, s, d, torch.float32)
    for bm, bn in ((32, 128), (128, 32)):
        mask = torch.rand(-(-s // bm), -(-s // bn)) < 0.6
        mask[:, -1] = True
        plan = BlockPlan.from_block_mask(mask, bm, bn, s, s)
        out = quantized_block_sparse_attention(q, k, v, plan, backend="triton")
        emu = quant_block_sparse_attention_reference(q, k, v, plan)
        assert rel_err(out, emu) < 1e-5, (bm, bn)


# ------------------------------------------------------------------ choice and errors


def test_backends_registered_and_chosen():
    from gen.attention.backends.quant import describe

    for op in ("quantize_qk", "quant_block_sparse"):
        assert [be.name for be in backends(op)] == ["triton", "torch"]
    q = torch.zeros(1, 1, 64, 64)
    chosen = choose("quant_block_sparse", describe(q, q, BlockPlan.dense(64, 64, 64, 64)))
    assert chosen.name == "torch"
    assert any(name == "triton" for name, _ in chosen.skipped)


def test_bad_inputs_say_what_to_fix():
    q = torch.randn(1, 2, 70, 64)
    plan = BlockPlan.dense(70, 70, 64, 64)
    with pytest.raises(ValueError, match="unknown quant 'int4'"):
        quantized_block_sparse_attention(q, q, q, plan, quant="int4")
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        quantized_block_sparse_attention(q.double(), q.double(), q.double(), plan)
    with pytest.raises(ValueError, match="dtype torch.int8 is not supported"):
        quantize_qk(q.to(torch.int8), q.to(torch.int8))
    with pytest.raises(ValueError, match="head dims differ"):
        quantized_block_sparse_attention(q, q[..., :32], q, plan)
    with pytest.raises(ValueError, match="built for q_len=70"):
        quantized_block_sparse_attention(q[:, :, :60], q[:, :, :60], q[:, :, :60], plan)
    with pytest.raises(ValueError, match="multiples of 16 in \\[32, 256\\]"):
        quantized_block_sparse_attention(q[..., :16], q[..., :16], q[..., :16], plan, backend="triton")
    with pytest.raises(ValueError, match="power of two in \\[32, 256\\]"):
        quantized_block_sparse_attention(q, q, q, BlockPlan.dense(70, 70, 16, 16), backend="triton")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        quantize_qk(q, q, backend="cuda")
    with pytest.raises(ValueError, match="kv_valid"):
        quantize_qk(q, q, kv_valid=torch.tensor([1.5]))
    # the emulation takes any head dim
    out = quantized_block_sparse_attention(q[..., :16], q[..., :16], q[..., :16], plan)
    assert out.shape == (1, 2, 70, 16)


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "int8-pv"])
@pytest.mark.parametrize("shape", [(1, 12, 32760, 128), (2, 4, 10001, 64)])
def test_gpu_real_shapes_match_emulation(seed, quant, shape):
    """Compiled kernels in bf16 at Wan 480p size with PARO's 64 x 64 plans: quantization
    bit-exact with the emulation on the same device, attention within the tolerances of
    the CPU tests."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        pytest.skip("set TRITON_INTERPRET=0 to test the compiled kernels")
    b, h, s, d = shape
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    plan = BlockPlan.random(s, s, 0.3, batch=b, heads=h, block_m=64, block_n=64, device="cuda")
    kv_valid = torch.tensor([s - 17] * b, device="cuda")
    got = quantize_qk(q, k, kv_valid=kv_valid, backend="triton")
    for g, w in zip(got, quantize_qk_reference(q, k, kv_valid=kv_valid)):
        assert torch.equal(g, w)
    out, lse = quantized_block_sparse_attention(q, k, v, plan, quant=quant, kv_valid=kv_valid, return_lse=True,
                                                backend="triton")
    emu, emu_lse = quant_block_sparse_attention_reference(q, k, v, plan, quant=quant, kv_valid=kv_valid,
                                                          return_lse=True)
    assert rel_err(out, emu) <= (2e-2 if quant == "int8" else 6e-2), rel_err(out, emu)
    fin = torch.isfinite(emu_lse)
    assert torch.equal(torch.isinf(lse), torch.isinf(emu_lse))
    assert float((lse[fin] - emu_lse[fin]).abs().max()) < (1e-3 if quant == "int8" else 0.05)
