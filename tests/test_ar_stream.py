"""Streaming decode across chunks, the long-video API and the `gen long` command."""

import pytest
import torch
from typer.testing import CliRunner

from gen.cli import app
from gen.long import long_video, long_video_frames, parse_switch
from gen.pipelines.ar.stream import StreamingWanDecoder
from gen.pipelines.tiny import build_tiny_pipeline


def test_chunked_decode_equals_one_decode(seed):
    vae = build_tiny_pipeline("tiny-wan").vae.eval()
    z = torch.randn(1, 16, 6, 4, 4)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        whole = vae.decode(z * std + mean, return_dict=False)[0]
    dec = StreamingWanDecoder(vae)
    parts = [dec.decode(z[:, :, :3]), dec.decode(z[:, :, 3:])]
    assert [p.shape[2] for p in parts] == [9, 12]  # 1 + 4*2, then 4*3 video frames
    assert torch.allclose(torch.cat(parts, 2), whole, atol=1e-5)


def test_parse_switch():
    assert parse_switch("2.5: a cat ") == (2.5, "a cat")
    for bad in ("a cat", "x:a cat", "3:"):
        with pytest.raises(ValueError, match="SECONDS:new prompt"):
            parse_switch(bad)


def test_bad_long_inputs_raise():
    with pytest.raises(ValueError, match="outside the video"):
        next(long_video_frames("a", seconds=2, switches=[(3.0, "b")]))
    with pytest.raises(ValueError, match="unknown schedule"):
        next(long_video_frames("a", schedule="nope"))
    # checked before the model loads, as the CLI checks them
    with pytest.raises(ValueError, match="seed must be between 0"):
        next(long_video_frames("a", seed=-1))
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        next(long_video_frames("a", device="gpu0"))
    with pytest.raises(ValueError, match="the prompt is empty"):
        next(long_video_frames("a", seconds=2, switches=[(1.0, "  ")]))


def test_long_video_streams_an_mp4(tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "long.mp4"
    res = long_video("a red ball", out, seconds=2.0, switches=[(1.0, "a blue ball")], height=64, width=64,
                     progress=False, device="cpu")
    assert out.is_file() and res.frames == 21  # 6 latent frames -> 1 + 4*5 video frames
    assert iio.imread(out).shape[0] == 21
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_cli_long(tmp_path):
    out = tmp_path / "c.mp4"
    r = CliRunner().invoke(app, ["long", "a cat", "--schedule", "chunk", "--seconds", "1", "--height", "64",
                                 "--width", "64", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file()
    r = CliRunner().invoke(app, ["long", "a cat", "--seconds", "1", "--switch", "5:a dog", "--out", str(out)])
    assert r.exit_code == 2 and "outside the video" in r.output
