"""The block-estimation kernels (``gen.kernels.block_estimate``) against their PyTorch
oracle (``gen.attention.estimate_reference``) on fresh random inputs, through the
interpreter on the CPU; an fp64 check of the rectification terms from the formulas; the
input validation; and the launchers inside ``torch.compile(fullgraph=True)``.

Selection is discrete: the kernel and the oracle compute the same fp32 probabilities up
to rounding (exp, summation order), so a row whose decision sits within rounding of a
boundary (mass before a block within 1e-5 of ``p``, or two probabilities within 1e-5 of
each other at the threshold) may legitimately go either way. Such rows are left out of
the exact comparisons; with random logits there are almost never any.
"""

import pytest
import torch

from gen.attention import estimate_reference as ref
from gen.kernels.block_estimate import MAX_KEY_BLOCKS, block_stats, select_blocks

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _dname(d):
    return str(d).removeprefix("torch.")


# ----------------------------------------------------------------------- block_stats


def _check_stats(x, block, valid, deviation):
    mean, absdev, count = block_stats(x, block, valid, deviation)
    r_mean, r_absdev, r_count = ref.block_stats(x, block, valid, deviation)
    nb = -(-x.shape[2] // block)
    assert mean.shape == (*x.shape[:2], nb, x.shape[3]) and mean.dtype == torch.float32
    assert count.shape == (nb,) and count.dtype == torch.float32
    assert mean.is_contiguous() and count.is_contiguous()
    torch.testing.assert_close(mean, r_mean, rtol=1e-5, atol=1e-5)
    assert torch.equal(count, r_count)
    if deviation:
        assert absdev.shape == mean.shape and absdev.dtype == torch.float32
        torch.testing.assert_close(absdev, r_absdev, rtol=1e-5, atol=1e-5)
    else:
        assert absdev is None
    return mean, absdev, count


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_stats_match_reference(seed, dtype, head_dim, layout):
    b, h, s, block = 2, 3, 77, 16  # 5 blocks, the last one 13 tokens
    if layout == "bshd":  # diffusers' layout seen as (B, H, S, D): read in place
        x = torch.randn(b, s, h, head_dim).to(dtype).transpose(1, 2)
        assert not x.is_contiguous()
    else:
        x = torch.randn(b, h, s, head_dim).to(dtype)
    valid = torch.rand(s) > 0.25
    valid[16:32] = False  # a block with no valid token: mean 0, absdev 0, count 0
    _check_stats(x, block, None, True)
    mean, absdev, count = _check_stats(x, block, valid, True)
    assert count[1] == 0 and (mean[:, :, 1] == 0).all() and (absdev[:, :, 1] == 0).all()
    _check_stats(x, block, valid, False)


@pytest.mark.parametrize("block,seq_len", [(128, 300), (160, 300), (7, 50), (64, 64), (1, 5), (500, 37)])
def test_stats_block_sizes(seed, block, seq_len):
    # 160 > the rows one program holds: the block is read in chunks, twice; 500 > S: one
    # short block; 1: every token its own block
    x = torch.randn(1, 2, seq_len, 80)  # head dim not a power of two: a masked chunk
    _check_stats(x, block, None, True)
    _check_stats(x, block, torch.rand(seq_len) > 0.5, True)


def test_stats_head_dim_256_and_empty_batch(seed):
    x = torch.randn(1, 1, 40, 256, dtype=torch.bfloat16)
    _check_stats(x, 16, torch.rand(40) > 0.3, True)
    # no batch x heads: nothing to launch, the counts still defined
    empty = torch.randn(0, 2, 40, 64)
    for valid in (None, torch.rand(40) > 0.3):
        mean, absdev, count = block_stats(empty, 16, valid)
        assert mean.shape == (0, 2, 3, 64) and absdev.shape == (0, 2, 3, 64)
        assert torch.equal(count, ref.block_stats(empty, 16, valid)[2])


# --------------------------------------------------------------------- select_blocks


def _select_inputs(b, h, nq, nk, *, text=True, dead_rows=True):
    logits = torch.randn(b, h, nq, nk) * 2.0
    logits[torch.rand(b, h, nq, nk) < 0.1] = float("-inf")  # key blocks with no valid token
    text_logit = torch.randn(b, h, nq) * 2.0 + 1.0 if text else None
    if dead_rows:
        logits[0, 0, 0] = float("-inf")  # a row with no key at all: P = 0 everywhere
        if text:
            text_logit[0, 0, 0] = float("-inf")
            logits[0, -1, -1] = float("-inf")  # only the text column: P_text = 1
    rect = torch.rand(b, h, nq, nk) > 0.4
    forced = torch.rand(nq, nk) > 0.85
    return logits, text_logit, rect, forced


def _fragile_rows(logits, text_logit, p, top_k, tol=1e-5):
    """Rows whose selection sits within rounding of a boundary (see the module docstring)."""
    nk = logits.shape[-1]
    full = torch.cat([logits, (text_logit if text_logit is not None
                               else torch.full(logits.shape[:-1], float("-inf"))).unsqueeze(-1)], -1)
    prob = torch.softmax(full.double(), -1).nan_to_num(0.0)
    pv, pt = prob[..., :nk], prob[..., nk]
    ordered = pv.sort(-1, descending=True).values
    before = pt.unsqueeze(-1) + ordered.cumsum(-1) - ordered
    fragile = torch.zeros(logits.shape[:-1], dtype=torch.bool)
    if p < 1:  # the mass before a block within rounding of p: kept by one side only
        fragile |= ((before - p).abs() < tol).any(-1)
    # the blocks just inside and just outside the threshold within rounding of each other
    kept = (before <= p).sum(-1) if p < 1 else torch.full(logits.shape[:-1], nk)
    count = kept.clamp(min=min(top_k, nk))
    inside = ordered.gather(-1, (count - 1).clamp(0, nk - 1).unsqueeze(-1)).squeeze(-1)
    outside = ordered.gather(-1, count.clamp(0, nk - 1).unsqueeze(-1)).squeeze(-1)
    fragile |= (count > 0) & (count < nk) & (inside > 0) & (inside - outside <= tol * inside)
    return fragile


def _check_structure(idx, cnt, nk):
    # ascending selected indices, then the last one repeated (0 for an empty row)
    pos = torch.arange(nk)
    used = pos < cnt.unsqueeze(-1).long()
    assert ((idx >= 0) & (idx < nk)).all()
    steps = idx[..., 1:] - idx[..., :-1]
    assert (steps[used[..., 1:]] > 0).all()
    last = idx.gather(-1, (cnt.long() - 1).clamp(min=0).unsqueeze(-1))
    last = torch.where(cnt.unsqueeze(-1) > 0, last, torch.zeros_like(last))
    assert torch.equal(torch.where(used, idx, last), idx)


def _check_select(logits, text_logit, rect, forced, p, top_k, *, exact_ties=False):
    out = select_blocks(logits, text_logit, rect, forced, p, top_k)
    expect = ref.select_blocks(logits, text_logit, rect, forced, p, top_k)
    b, h, nq, nk = logits.shape
    for t, shape, dtype in zip(out, [(b, h, nq, nk), (b, h, nq), (b, h, nq), (b, h, nq, nk)],
                               [torch.int32, torch.int32, torch.float32, torch.float32]):
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    idx, cnt, r, w = out
    r_idx, r_cnt, r_r, r_w = expect
    _check_structure(idx, cnt, nk)
    # exact_ties: the inputs make equal probabilities on purpose (bitwise equal in both)
    ok = torch.ones_like(cnt, dtype=torch.bool) if exact_ties else ~_fragile_rows(logits, text_logit, p, top_k)
    assert ok.float().mean() > 0.5, "too many near-tie rows for a meaningful comparison"
    assert torch.equal(idx[ok], r_idx[ok])
    assert torch.equal(cnt[ok], r_cnt[ok])
    torch.testing.assert_close(r[ok], r_r[ok], rtol=0, atol=1e-5)
    torch.testing.assert_close(w[ok], r_w[ok], rtol=0, atol=1e-5)
    return out


@pytest.mark.parametrize("text", [False, True], ids=["no_text", "text"])
@pytest.mark.parametrize("p", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("top_k", [0, 3, 37])
def test_select_matches_reference(seed, text, p, top_k):
    nk = 37  # not a power of two: the row is padded in the kernel
    logits, text_logit, rect, forced = _select_inputs(1, 2, 3, nk, text=text)
    idx, cnt, r, w = _check_select(logits, text_logit, rect, forced, p, top_k)
    if top_k == nk or p >= 1:
        assert (cnt == nk).all()
    # the row with no key at all: P = 0, so every block is kept (mass before 0 <= p)
    assert cnt[0, 0, 0] == nk and r[0, 0, 0] == 0 and (w[0, 0, 0] == 0).all()


def test_select_ties_at_the_threshold_are_all_kept(seed):
    # 8 equal blocks of P = 1/8 (exact): p = 0.3 keeps 3 by mass, the ties keep all 8;
    # the second row has 2 distinct values, 4 blocks each
    logits = torch.zeros(1, 1, 2, 8)
    logits[0, 0, 1, :4] = 1.0
    rect = torch.zeros(1, 1, 2, 8, dtype=torch.bool)
    forced = torch.zeros(2, 8, dtype=torch.bool)
    idx, cnt, r, w = _check_select(logits, None, rect, forced, 0.3, 0, exact_ties=True)
    assert cnt.tolist() == [[[8, 4]]]
    assert idx[0, 0, 1].tolist() == [0, 1, 2, 3, 3, 3, 3, 3]


def test_select_forced_only_and_empty_rows(seed):
    # p small and the text column heavy: nothing is kept by mass, top_k 0, so a row
    # selects its forced blocks only, and a row with none selects nothing (indices 0)
    nk = 12
    logits = torch.randn(1, 2, 4, nk)
    text_logit = torch.full((1, 2, 4), 20.0)
    rect = torch.rand(1, 2, 4, nk) > 0.5
    forced = torch.zeros(4, nk, dtype=torch.bool)
    forced[1, [2, 7]] = True
    forced[2, 11] = True
    idx, cnt, r, w = _check_select(logits, text_logit, rect, forced, 0.05, 0)
    assert cnt[:, :, 0].eq(0).all() and idx[:, :, 0].eq(0).all()
    assert cnt[:, :, 1].eq(2).all() and idx[0, 0, 1].tolist() == [2] + [7] * (nk - 1)
    assert idx[0, 1, 2].tolist() == [11] * nk


@pytest.mark.parametrize("nk", [1, 2, 300])
def test_select_row_lengths(seed, nk):
    # a single key block; a row padded from 300 to 512 (one program: the interpreter
    # sorts slowly)
    logits, text_logit, rect, forced = _select_inputs(1, 1, 1 if nk == 300 else 3, nk, dead_rows=False)
    _check_select(logits, text_logit, rect, forced, 0.5, 2)


def test_select_non_contiguous_inputs(seed):
    logits, text_logit, rect, forced = _select_inputs(2, 3, 5, 9, dead_rows=False)
    # views with other strides: the kernel reads them in place
    logits_t = logits.transpose(2, 3).contiguous().transpose(2, 3)
    rect_t = rect.transpose(0, 1).contiguous().transpose(0, 1)
    forced_t = forced.t().contiguous().t()
    text_t = text_logit.transpose(0, 2).contiguous().transpose(0, 2)
    assert not (logits_t.is_contiguous() or rect_t.is_contiguous() or forced_t.is_contiguous())
    got = select_blocks(logits_t, text_t, rect_t, forced_t, 0.4, 1)
    want = select_blocks(logits, text_logit, rect, forced, 0.4, 1)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_select_r_and_weights_against_fp64_formulas(seed):
    """r and weights from the definitions in fp64, not through the oracle."""
    b, h, nq, nk, p, top_k = 1, 2, 4, 23, 0.35, 2
    logits, text_logit, rect, forced = _select_inputs(b, h, nq, nk, dead_rows=False)
    idx, cnt, r, w = select_blocks(logits, text_logit, rect, forced, p, top_k)

    # P = softmax over [logits, text] in fp64
    z = torch.cat([logits.double(), text_logit.double().unsqueeze(-1)], -1)
    z = z - z.amax(-1, keepdim=True)
    prob = z.exp() / z.exp().sum(-1, keepdim=True)
    pv, pt = prob[..., :nk], prob[..., nk]

    # the selection from its definition: blocks by P descending, kept while the mass
    # before them (text first) is <= p, at least top_k; then forced ones
    order = pv.argsort(-1, descending=True)
    sorted_p = pv.gather(-1, order)
    before = pt.unsqueeze(-1) + sorted_p.cumsum(-1) - sorted_p
    n_keep = torch.maximum((before <= p).sum(-1), torch.tensor(min(top_k, nk)))
    rank = order.argsort(-1)  # each block's place in the descending order
    want_sel = (rank < n_keep.unsqueeze(-1)) | forced

    # the kernel's selection as a mask (padding slots repeat the last index: add, not set)
    used = (torch.arange(nk) < cnt.unsqueeze(-1).long()).long()
    got_sel = torch.zeros(b, h, nq, nk, dtype=torch.long).scatter_add_(-1, idx.long(), used) > 0
    ok = ~((before - p).abs() < 1e-5).any(-1)
    assert torch.equal(got_sel[ok], want_sel[ok])

    # r and weights from the kernel's own selection: the arithmetic on its own
    in_e = got_sel | ~rect
    r64 = pt + (pv * in_e).sum(-1)
    w64 = torch.where(in_e, 0.0, pv)
    torch.testing.assert_close(r.double(), r64, rtol=0, atol=2e-6)
    torch.testing.assert_close(w.double(), w64, rtol=0, atol=2e-6)
    assert torch.allclose(r64 + w64.sum(-1), torch.ones_like(r64))  # the row's mass is all there


# ----------------------------------------------------------------------- validation


def _raises(fn, *args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_stats_refuses_bad_inputs():
    x = torch.randn(1, 2, 10, 16)
    _raises(block_stats, x[0], 4, match="4-dim")
    _raises(block_stats, x.double(), 4, match="dtype")
    _raises(block_stats, x.int(), 4, match="dtype")
    for block in (0, -3, 2.0, True):
        _raises(block_stats, x, block, match="block must be a positive int")
    _raises(block_stats, x, 4, torch.ones(9, dtype=torch.bool), match=r"valid must be a bool tensor of shape \(10,\)")
    _raises(block_stats, x, 4, torch.ones(10), match="valid must be a bool")
    _raises(block_stats, x, 4, torch.ones(10, dtype=torch.bool, device="meta"), match="valid lives on meta")
    _raises(block_stats, torch.randn(1, 2, 10, 0), 4, match="head_dim 0")


def test_select_refuses_bad_inputs():
    logits, text_logit, rect, forced = _select_inputs(1, 2, 3, 5, dead_rows=False)
    good = (logits, text_logit, rect, forced, 0.5, 2)

    def bad(i, value, match):
        args = list(good)
        args[i] = value
        _raises(select_blocks, *args, match=match)

    bad(0, logits[0], "4-dim")
    bad(0, logits.double(), "float32")
    bad(0, logits[..., :0], "no key blocks")
    bad(1, text_logit[..., :2], r"text_logit must be \(1, 2, 3\)")
    bad(1, text_logit.half(), "text_logit has dtype")
    bad(2, rect.float(), "rectifiable must be a bool tensor")
    bad(2, rect[:, :1], "rectifiable must be a bool tensor")
    bad(3, forced[:2], r"forced must be a bool tensor of shape \(3, 5\)")
    bad(3, forced.to("meta"), "forced lives on meta")
    for p in (0.0, -0.1, float("nan"), "0.5", None, True):
        bad(4, p, "p must be a float > 0")
    for k in (-1, 2.0, None, False):
        bad(5, k, "top_k must be an int >= 0")
    wide = torch.zeros(1, 1, 1, MAX_KEY_BLOCKS + 1)
    _raises(select_blocks, wide, None, wide.bool(), torch.zeros(1, MAX_KEY_BLOCKS + 1, dtype=torch.bool), 0.5, 1,
            match="larger block size")


def test_refuses_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, text_logit, rect, forced = _select_inputs(1, 1, 2, 4, dead_rows=False)
    _raises(block_stats, torch.randn(1, 1, 8, 16), 4, match="CUDA")
    _raises(select_blocks, logits, text_logit, rect, forced, 0.5, 1, match="CUDA")


# -------------------------------------------------------------------- torch.compile


def test_launchers_run_inside_a_compiled_graph(seed):
    """Both launchers trace as opaque custom ops: fullgraph (no graph break), the same
    results as eager, no recompile on new values."""
    import torch._dynamo

    def estimate(x, valid, logits, text_logit, rect, forced):
        mean, absdev, count = block_stats(x.transpose(1, 2), 8, valid)
        idx, cnt, r, w = select_blocks(logits * 1.0, text_logit, rect, forced, 0.3, 2)
        return mean * 2, absdev, count, idx, cnt, r + 0, w

    def inputs():
        x = torch.randn(1, 20, 2, 16)
        logits, text_logit, rect, forced = _select_inputs(1, 2, 3, 6, dead_rows=False)
        return x, torch.rand(20) > 0.3, logits, text_logit, rect, forced

    torch._dynamo.reset()
    compiled = torch.compile(estimate, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            args = inputs()
            for got, want in zip(compiled(*args), estimate(*args)):
                assert torch.equal(got, want)
    torch._dynamo.reset()
