"""Radial Attention: the block mask against an independent, token-level implementation
of the reference semantics, the reference port's densities, and end-to-end use."""

import numpy as np
import pytest
import torch

import gen
from gen.attention import AttentionContext, TokenLayout
from gen.attention.methods import get_method
from gen.attention.methods.radial import RadialConfig, radial_block_mask

from helpers import dense_masked_attention, rel_err


def _reference_block_mask(frames, s, b, decay, sink):
    """The reference algorithm written out token by token: per frame pair, an s x s token
    mask (sink / full / decimated band), placed on the b-aligned canvas, then the
    column-density rule per block, OR-ed over pairs. Only for s a multiple of b."""
    assert s % b == 0
    nb = frames * s // b
    out = np.zeros((nb, nb), dtype=bool)
    rows = np.arange(s)[:, None]  # intra-frame query index k
    cols = np.arange(s)[None, :]  # intra-frame key index l
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if d <= 1 or (sink and j == 0):
                pair = np.ones((s, s), dtype=bool)
            else:
                l0 = 2 ** int(s).bit_length() / 2 ** int(d).bit_length()
                if l0 < b and d % int(b / l0) != 0:
                    continue
                pair = np.abs(rows - cols) <= max(l0 * decay, b)
            for bi in range(s // b):
                for bj in range(s // b):
                    blk = pair[bi * b:(bi + 1) * b, bj * b:(bj + 1) * b]
                    dens = blk.sum(0) / b
                    nonempty = (dens > 0).sum()
                    if nonempty and (dens > 1 / 3).sum() > 0.6 * nonempty:
                        out[i * s // b + bi, j * s // b + bj] = True
    return out


@pytest.mark.parametrize("frames, s, b, decay", [
    (6, 64, 16, 0.2), (12, 64, 16, 0.2), (12, 64, 16, 0.95), (5, 128, 32, 0.5), (9, 96, 32, 0.2),
])
@pytest.mark.parametrize("sink", [True, False], ids=["wan", "hunyuan"])
def test_block_mask_equals_reference_semantics(frames, s, b, decay, sink):
    cfg = RadialConfig(decay=decay, block_size=b, sink=sink)
    ours = radial_block_mask(frames, s, cfg).numpy()
    ref = _reference_block_mask(frames, s, b, decay, sink)
    assert ours.shape == ref.shape
    assert (ours == ref).all(), f"{(ours != ref).sum()} blocks differ"
    assert 0 < ours.mean() < 1


@pytest.mark.parametrize("frames, s, decay, sink, density", [
    (21, 1560, 0.2, True, 0.339), (21, 1560, 1.0, True, 0.445), (18, 3840, 0.2, True, 0.287),
    (18, 3840, 1.0, True, 0.431), (21, 3600, 0.2, True, 0.262), (32, 3600, 0.95, False, 0.275),
])
def test_native_densities_match_the_reference_port(frames, s, decay, sink, density):
    """Block densities of the reference's own mask builder at real sizes (Wan 480p/720p,
    Radial's 768x1280x69 setting, HunyuanVideo), ragged frames included."""
    mask = radial_block_mask(frames, s, RadialConfig(decay=decay, sink=sink))
    print(f"radial {frames}x{s} γ={decay} sink={sink}: block density {mask.float().mean():.3f}")
    assert abs(mask.float().mean().item() - density) < 5e-4


def test_any_token_count_and_density_trend():
    """Frames not multiples of the block and a ragged last block run; longer videos get
    sparser (O(n log n))."""
    dens = []
    for frames in (4, 8, 16, 32):
        m = get_method("radial", decay=0.2, block_size=32)
        plan = m.plan(TokenLayout(frames, 7, 9), 1)  # 63-token frames
        assert plan.q_len == frames * 63
        dens.append(plan.density())
    assert all(a > b for a, b in zip(dens, dens[1:])), dens


def test_presets_and_native_densities():
    from gen.pipelines import get_spec

    for name, expect in (("wan2.1-t2v-1.3b", 0.339), ("wan2.1-t2v-14b", 0.262), ("hunyuanvideo", 0.270)):
        spec = get_spec(name)
        m = get_method("radial", model=name, family=spec.family)
        d = m.plan(TokenLayout(*spec.token_grid()), 1).density()
        print(f"radial preset {name} at {spec.token_grid()}: density {d:.3f}")
        assert abs(d - expect) < 1e-3
    assert get_method("radial", model="hunyuanvideo").config.sink is False
    assert get_method("radial", model="wan2.1-t2v-14b").config.dense_steps == 12
    with pytest.raises(ValueError, match="does not support flux"):
        get_method("radial", family="flux")
    with pytest.raises(ValueError, match="power of two"):
        get_method("radial", block_size=100)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("text", [0, 5])
def test_attention_equals_reference_with_token_mask(seed, backend, text):
    layout = TokenLayout(6, 4, 8, text_len=text)  # 32-token frames, HunyuanVideo-like text last
    m = get_method("radial", decay=0.5, block_size=16, sink=text == 0, backend=backend)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32) for _ in range(3))
    kv_valid = torch.tensor([layout.seq_len - 2]) if text else None
    out = m.attention(q, k, v, layout, AttentionContext(kv_valid=kv_valid))
    mask = m.token_mask(layout, 2)
    assert mask[:, layout.video_slice, layout.video_slice].float().mean() < 1
    ref, _ = dense_masked_attention(q, k, v, mask, kv_valid=kv_valid)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-hunyuan", "tiny-wan-i2v"])
def test_radial_on_tiny_pipelines(name):
    from gen.pipelines import load

    from test_sparsify_pipelines import _run

    pipe = load(name)
    pipe.set_progress_bar_config(disable=True)
    stock = _run(pipe, name)
    with gen.sparse(pipe, "radial") as handle:
        out = _run(pipe, name)
        s = handle.summary()["transformers"][0]
        assert s["sparse_calls"] > 0 and list(s["density"].values())[0] < 1
    assert np.abs(out - stock).max() > 1e-4
    assert np.array_equal(_run(pipe, name), stock)


def test_render_radial(tmp_path):
    from typer.testing import CliRunner

    from gen.cli import app

    res = CliRunner().invoke(app, ["render", "a red ball", "--attention", "radial", "--out", str(tmp_path / "r.mp4")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.mp4").stat().st_size > 0


def test_masks_command_and_preset_densities(tmp_path):
    from typer.testing import CliRunner

    from gen.cli import app

    runner = CliRunner()
    out = tmp_path / "radial.png"
    res = runner.invoke(app, ["masks", "--method", "radial", "--model", "tiny-hunyuan", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "radial-tokens.png").exists()
    assert "video density 0.920" in res.output
    res = runner.invoke(app, ["masks", "--method", "radial", "--model", "wan2.1-t2v-1.3b", "--out", str(out)])
    assert res.exit_code == 0 and "video density 0.339" in res.output
    assert not (tmp_path / "radial-tokens.png").stat().st_size == 0
    res = runner.invoke(app, ["masks", "--method", "radial", "--model", "tiny-flux", "--out", str(out)])
    assert res.exit_code == 2 and "does not support flux" in res.output
    res = runner.invoke(app, ["masks", "--method", "radial", "--model", "tiny-wan", "--head", "7", "--out", str(out)])
    assert res.exit_code == 2 and "2 heads" in res.output
    res = runner.invoke(app, ["methods"])
    assert "density 0.339 at 21x30x52" in " ".join(res.output.split())
