"""`gen bench fidelity` on the CPU with tiny models: dense against itself is exactly 0,
a sparse method is not, every number is finite."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from gen.cli import app

runner = CliRunner()


def test_fidelity_quick_cli(tmp_path):
    out_json, out_md, out_png = tmp_path / "f.json", tmp_path / "f.md", tmp_path / "f.png"
    res = runner.invoke(app, ["bench", "fidelity", "--quick", "--attention", "dense,gna,sparse-vdit,mask",
                              "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png)])
    assert res.exit_code == 0, res.output
    data = json.loads(out_json.read_text())
    for key in ("device", "torch", "triton", "commit", "command", "date", "model", "reference"):
        assert key in data["meta"]
    assert data["meta"]["command"].startswith("gen bench fidelity") and data["meta"]["model"] == "shapes-wan"
    rows = {(r["level"], r["method"]): r for r in data["rows"]}
    att, vid = rows[("attention", "dense")], rows[("e2e", "dense")]
    assert att["rel_l2"] == 0.0 and att["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert vid["mse"] == 0.0 and vid["psnr"] is None and vid["ssim"] == pytest.approx(1.0)
    gna_a, gna_v = rows[("attention", "gna")], rows[("e2e", "gna")]
    assert 0 < gna_a["density"] < 1 and gna_a["rel_l2"] > 0 and math.isfinite(gna_a["rel_l2"])
    assert -1 <= gna_a["cosine"] < 1
    assert gna_v["mse"] > 0 and math.isfinite(gna_v["psnr"]) and gna_v["ssim"] <= 1
    for level in ("attention", "e2e"):
        assert rows[(level, "sparse-vdit")]["note"].startswith("skipped: sparse-vdit needs a calibrated plan")
        assert rows[(level, "mask")]["note"].startswith("skipped: mask needs a pattern")
    assert "| level | source | method |" in out_md.read_text()
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_fidelity_on_a_capture(tmp_path):
    from gen.bench.fidelity import run_fidelity_bench
    from gen.capture import capture

    path = tmp_path / "cap.safetensors"
    capture("tiny-hunyuan", "a red ball", steps=[1], layers=[0, 1], num_steps=2, out=path)
    res = run_fidelity_bench("tiny-hunyuan", "dense,radial", capture=path, synthetic=False, e2e=False)
    rows = {(r.source, r.method): r for r in res.rows}
    assert set(rows) == {(f"capture s1.l{i}", m) for i in (0, 1) for m in ("dense", "radial")}
    for i in (0, 1):
        assert rows[(f"capture s1.l{i}", "dense")].rel_l2 == 0.0
        radial = rows[(f"capture s1.l{i}", "radial")]
        assert radial.rel_l2 > 0 and math.isfinite(radial.rel_l2) and radial.density < 1
    with pytest.raises(ValueError, match="pass --model tiny-hunyuan"):
        run_fidelity_bench("tiny-wan", "dense", capture=path)


def test_synthetic_generator_is_video_like():
    from gen.attention import TokenLayout
    from gen.bench.fidelity import synthetic_qkv

    layout = TokenLayout(4, 6, 6)
    q, k, v = synthetic_qkv(layout, 2, 32, seed=3)
    assert q.shape == k.shape == v.shape == (1, 2, 144, 32)
    assert torch.equal(q, synthetic_qkv(layout, 2, 32, seed=3)[0])  # deterministic
    p = torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, dim=-1)[0]  # (H, S, S)
    frame = torch.arange(144) // 36
    same_frame = (frame[:, None] == frame[None, :]).float()
    pos = torch.arange(144) % 36
    same_pos = (pos[:, None] == pos[None, :]).float()
    # head 0 (spatial) keeps its mass in the query's frame, head 1 (temporal) on its position
    assert (p[0] * same_frame).sum(-1).mean() > 0.5 > (p[1] * same_frame).sum(-1).mean()
    assert (p[1] * same_pos).sum(-1).mean() > (p[0] * same_pos).sum(-1).mean()
    # the sinks (first 4 tokens) draw far more than their share of 4/144
    assert p[:, :, :4].sum(-1).mean() > 3 * 4 / 144


def test_ssim_and_psnr():
    from gen.bench.fidelity import psnr, ssim

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 24, 24, 3, generator=g)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == (0.0, None)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    c = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert 1 > ssim(a, b) > ssim(a, c) > -1
    mse, db = psnr(a, b)
    assert db == pytest.approx(10 * math.log10(1 / mse)) and 20 < db < 30
    assert ssim(a[0], b[0]) == pytest.approx(ssim(a[:1], b[:1]))  # one image = one frame
    with pytest.raises(ValueError, match="equal shapes"):
        ssim(a, a[:2])
