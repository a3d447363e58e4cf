"""Triton cache attention (interpreter) against the PyTorch reference and an fp64 oracle."""

import pytest
import torch

from gen.attention.cache_reference import cache_attention_reference
from gen.kernels.cache_attention import cache_attention

from helpers import rel_err


def _tables(n_pos, d, rotated):
    ang = torch.rand(n_pos, d // 2, dtype=torch.float64) * 6
    ang[:, rotated // 2 :] = 0  # cos 1 / sin 0 past the rotated dims
    ang = ang.repeat_interleave(2, -1)
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("tpf", [7, 45])
def test_kernel_matches_reference(seed, d, dtype, rope, tpf):
    # awkward: 7 tokens/frame (a key tile spans many frames, 28 keys: one ragged tile) or
    # 45 (a tile spans at most two frames: per-frame cos/sin vectors; 180 keys: whole
    # tiles then a ragged one); 19 queries; head dim 80 is padded to 128 in the kernel
    b, h, n_slots, sq = 1, 2, 5, 19
    q = torch.randn(b, sq, h, d)
    k, v = torch.randn(b, n_slots * tpf, h, d), torch.randn(b, n_slots * tpf, h, d)
    slots = torch.tensor([0, 3, 1, 4], dtype=torch.int32)  # out of order, one slot skipped
    kw = {"tokens_per_frame": tpf}
    if rope:
        cos, sin = _tables(9, d, rotated=d // 3 * 2 // 2 * 2)
        kw.update(key_pos=torch.tensor([0, 5, 6, 8], dtype=torch.int32), rope_cos=cos, rope_sin=sin)
    ref = cache_attention_reference(q.double(), k.double(), v.double(), slots, **kw)
    base = cache_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), slots, **kw)
    out = cache_attention(q.to(dtype), k.to(dtype), v.to(dtype), slots, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    bound = 1e-5 if dtype == torch.float32 else 5e-3 if dtype == torch.float16 else 3e-2
    assert rel_err(out, ref) < max(bound, 4 * rel_err(base, ref))


def test_reference_rope_at_read_equals_roped_keys(seed):
    """Rotating keys at read == attending keys rotated beforehand (plain attention)."""
    d, tpf = 64, 3
    q, k, v = torch.randn(1, 4, 2, d), torch.randn(1, 4 * tpf, 2, d), torch.randn(1, 4 * tpf, 2, d)
    cos, sin = _tables(6, d, rotated=d)
    slots, pos = torch.tensor([2, 0]), torch.tensor([5, 1])
    out = cache_attention_reference(q, k, v, slots, tokens_per_frame=tpf, key_pos=pos, rope_cos=cos, rope_sin=sin)
    rows = torch.cat([torch.arange(s * tpf, (s + 1) * tpf) for s in slots.tolist()])
    p = pos.repeat_interleave(tpf)
    kk = k[:, rows].double()
    x1, x2 = kk[..., 0::2], kk[..., 1::2]
    c, s = cos[p][None, :, None, 0::2], sin[p][None, :, None, 0::2]
    kr = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    ref = torch.softmax(q.double().transpose(1, 2) @ kr.permute(0, 2, 3, 1) / d**0.5, -1) @ v[:, rows].double().transpose(1, 2)
    assert rel_err(out, ref.transpose(1, 2)) < 1e-6


def test_bad_inputs_raise():
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 12, 2, 16)
    with pytest.raises(ValueError, match="frame_slots must lie"):
        cache_attention_reference(q, k, k, torch.tensor([3]), tokens_per_frame=4)
    with pytest.raises(ValueError, match="whole number of frames"):
        cache_attention(q, k, k, torch.tensor([0]), tokens_per_frame=5)
    with pytest.raises(ValueError, match="together"):
        cache_attention(q, k, k, torch.tensor([0]), tokens_per_frame=4, key_pos=torch.tensor([0]))
