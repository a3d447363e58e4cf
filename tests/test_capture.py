"""`gen capture`: q, k, v of chosen calls of a tiny pipeline run, to safetensors and back."""

import torch
from typer.testing import CliRunner

from gen.cli import app

runner = CliRunner()


def test_capture_cli_roundtrip(tmp_path):
    from gen.capture import load_capture

    out = tmp_path / "cap.safetensors"
    res = runner.invoke(app, ["capture", "--model", "tiny-hunyuan", "--prompt", "a red ball", "--steps", "0,1",
                              "--layers", "1", "--heads", "1", "--num-steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cap = load_capture(out)
    assert cap.meta["model"] == "tiny-hunyuan" and cap.meta["steps"] == [0, 1] and cap.meta["layers"] == [1]
    assert cap.meta["heads"] == [1] and cap.meta["num_steps"] == 2
    assert [(c.step, c.layer) for c in cap.calls] == [(0, 1), (1, 1)]
    for c in cap.calls:
        # 5x8x8 video tokens + 256 text tokens after them, one head of 16 channels
        assert (c.layout.frames, c.layout.height, c.layout.width, c.layout.text_len) == (5, 8, 8, 256)
        assert not c.layout.text_first
        for x in (c.q, c.k, c.v):
            assert x.shape == (1, 1, 576, 16) and torch.isfinite(x).all()
        assert c.kv_valid is not None and c.kv_valid.shape == (1,)
    assert not torch.equal(cap.calls[0].q, cap.calls[1].q)  # two steps, two different inputs


def test_capture_records_what_the_method_receives():
    """The capture holds exactly the q, k, v a method gets; the run stays dense."""
    import gen
    from gen.capture import CaptureConfig, CaptureMethod
    from gen.pipelines import load

    pipe = load("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    seen = {}
    dense = gen.get_method("dense")
    orig = dense.attention

    def spy(q, k, v, layout, ctx):
        seen.setdefault((ctx.step_index, ctx.layer_index), (q.clone(), k.clone(), v.clone()))
        return orig(q, k, v, layout, ctx)

    method = CaptureMethod(CaptureConfig(steps=(1,), layers=(0,)))
    kw = dict(prompt="a cat", num_inference_steps=2, height=128, width=128, num_frames=17, output_type="latent")
    with gen.sparse(pipe, method) as handle:
        handle.method.inner.attention = spy
        pipe(**kw, generator=torch.Generator().manual_seed(0))
        calls = handle.method.calls
    assert list(calls) == [(1, 0)]
    c = calls[(1, 0)]
    assert c.branch == "cond"
    for got, want in zip((c.q, c.k, c.v), seen[(1, 0)]):
        assert torch.equal(got, want)


def test_capture_rejects_bad_input(tmp_path):
    out = tmp_path / "x.safetensors"
    res = runner.invoke(app, ["capture", "--model", "tiny-wan", "--prompt", "a", "--steps", "5", "--num-steps", "2",
                              "--out", str(out)])
    assert res.exit_code == 2 and "outside the run" in res.output
    res = runner.invoke(app, ["capture", "--model", "tiny-wan", "--prompt", "a", "--layers", "7", "--num-steps", "1",
                              "--out", str(out)])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["capture", "--model", "tiny-wan", "--prompt", "a", "--steps", "x", "--out", str(out)])
    assert res.exit_code != 0 and "comma-separated integers" in res.output
    assert not out.exists()
