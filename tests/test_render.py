"""`gen render`, `gen models`, `gen methods` on the tiny offline models (CPU)."""

import imageio.v3 as iio
import numpy as np
from PIL import Image
from typer.testing import CliRunner

from gen.cli import app

runner = CliRunner()


def _render(*args):
    return runner.invoke(app, ["render", *args])


def test_render_writes_a_playable_mp4(tmp_path):
    out = tmp_path / "clips" / "ball.mp4"
    res = _render("a red ball", "--out", str(out))
    assert res.exit_code == 0, res.output
    frames = iio.imread(out)
    assert frames.shape == (17, 128, 128, 3)
    assert "sparse" in res.output and "density" in res.output
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_render_default_names_are_unique(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert _render("a red ball", "--steps", "1").exit_code == 0
    files = sorted((tmp_path / "outputs").glob("*.mp4"))
    assert len(files) == 2 and files[0].name.startswith("shapes-wan-dense-a-red-ball-s0-")  # the built-in default


def test_render_image_model_and_sparse_method(tmp_path):
    out = tmp_path / "img.png"
    res = _render("a cat", "--model", "tiny-flux", "--out", str(out), "--seed", "3")
    assert res.exit_code == 0, res.output
    assert iio.imread(out).shape == (256, 256, 3)
    res = _render("a red ball", "--attention", "dense", "--set", "dense_steps=1", "--out", str(tmp_path / "b.mp4"))
    assert res.exit_code == 0, res.output
    assert "dense calls" in res.output


def test_render_image_to_video(tmp_path):
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "i2v.mp4"
    res = _render("a red ball", "--model", "tiny-wan-i2v", "--image", str(img), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert iio.imread(out).shape[0] == 17
    res = _render("a red ball", "--model", "tiny-wan-i2v", "--out", str(out))
    assert res.exit_code == 2 and "--image" in res.output


# bad inputs of gen render: tests/test_bad_inputs.py


def test_render_missing_real_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    res = _render("a red ball", "--model", "wan2.1-t2v-1.3b", "--steps", "1")
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in text and "--model-path" in text


def test_models_and_methods_listings():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    for name in ("tiny-wan", "tiny-flux", "wan2.1-t2v-14b", "flux.1-dev"):
        assert name in res.output
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0 and "dense" in res.output and "pattern" in res.output


def test_render_reads_the_prompt_from_a_file_or_stdin(tmp_path):
    (tmp_path / "one.txt").write_text("# the prompt\na red ball\n")
    out = tmp_path / "a.mp4"
    res = _render(f"@{tmp_path / 'one.txt'}", "--steps", "1", "--out", str(out))
    assert res.exit_code == 0, res.output
    stdin = runner.invoke(app, ["render", "-", "--steps", "1", "--out", str(tmp_path / "b.mp4")], input="a red ball\n")
    assert stdin.exit_code == 0, stdin.output
    assert np.array_equal(iio.imread(out), iio.imread(tmp_path / "b.mp4"))
