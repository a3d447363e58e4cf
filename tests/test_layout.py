"""TokenLayout: counts, where video and text sit, coordinates, validation."""

import pytest
import torch

from gen.attention import TokenLayout


def test_counts_and_slices():
    wan = TokenLayout(21, 30, 52)
    assert wan.video_len == wan.seq_len == 32760 and wan.text_len == 0
    flux = TokenLayout(1, 64, 64, text_len=512, text_first=True)
    assert flux.seq_len == 4608 and flux.text_slice == slice(0, 512) and flux.video_slice == slice(512, 4608)
    hy = TokenLayout(33, 45, 80, text_len=256)
    assert hy.video_slice == slice(0, 118800) and hy.text_slice == slice(118800, 119056)
    assert "text (last)" in str(hy)


def test_video_coords_are_frame_major():
    lay = TokenLayout(3, 4, 5)
    c = lay.video_coords()
    assert c.shape == (60, 3)
    idx = c[:, 0] * 20 + c[:, 1] * 5 + c[:, 2]
    assert torch.equal(idx, torch.arange(60))


@pytest.mark.parametrize("kwargs", [dict(frames=0, height=2, width=2), dict(frames=1, height=2.0, width=2),
                                    dict(frames=1, height=2, width=2, text_len=-1)])
def test_validation(kwargs):
    with pytest.raises(ValueError, match="TokenLayout"):
        TokenLayout(**kwargs)
