"""Sparse-vDiT: every mode against masked dense attention (both backends), skip heads,
the plan file and its refusals, the offline search on the tiny Wan and the two
commands (`gen calibrate sparse-vdit`, `gen render --attention sparse-vdit`)."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gen
from gen.attention import AttentionContext, TokenLayout
from gen.attention.methods import get_method, parse_overrides
from gen.attention.methods.sparse_vdit import (
    DIAGONAL,
    FULL,
    SKIP,
    STRIPE,
    WINDOW,
    SparseVDiTConfig,
    SparseVDiTPlan,
    load_plan,
    select_modes,
)
from gen.calibrate import calibrate, read_prompts
from gen.cli import app
from gen.pipelines import load

from helpers import dense_masked_attention, rel_err

runner = CliRunner()

# 3 frames of 4x6 tokens = 72 video tokens: 16-token blocks leave a ragged last block
LAYOUTS = {"wan": TokenLayout(3, 4, 6), "hunyuan": TokenLayout(3, 4, 6, text_len=12)}
# layer 0: one head per mode; layer 1: groups of two (distinct stripe columns) and a
# skip; layer 2: every head multi-diagonal (one kernel call for the whole layer)
MODES = [[[FULL, SKIP, WINDOW, DIAGONAL, STRIPE],
          [STRIPE, STRIPE, WINDOW, WINDOW, SKIP],
          [DIAGONAL] * 5]]


def _plan(layout, generator):
    nb = -(-layout.video_len // 16)
    stripes = torch.stack([torch.randperm(nb, generator=generator)[:2].sort().values for _ in range(15)])
    return SparseVDiTPlan.from_modes(MODES, layout, stripes=stripes.view(1, 3, 5, 2), block_size=16,
                                     window=1, diagonal=1)


def _qkv(layout, heads=5, batch=2, dim=16):
    return [torch.randn(batch, heads, layout.seq_len, dim) for _ in range(3)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_every_mode_equals_masked_dense_attention(seed, backend, family):
    layout = LAYOUTS[family]
    plan = _plan(layout, torch.Generator().manual_seed(seed))
    method = get_method("sparse-vdit", plan=plan, backend=backend)
    q, k, v = _qkv(layout)
    kv_valid = torch.tensor([layout.seq_len, layout.seq_len - 5]) if layout.text_len else None
    for layer in range(3):
        ctx = AttentionContext(step_index=0, num_steps=1, layer_index=layer, kv_valid=kv_valid)
        out = method.attention(q, k, v, layout, ctx)
        mask = method.token_mask(layout, 5, ctx)
        ref, _ = dense_masked_attention(q, k, v, mask.unsqueeze(0), kv_valid=kv_valid)
        assert rel_err(out, ref) < 1e-5, (layer, rel_err(out, ref))


def test_mode_masks_have_the_papers_shapes(seed):
    layout = LAYOUTS["wan"]
    plan = _plan(layout, torch.Generator().manual_seed(seed))
    method = get_method("sparse-vdit", plan=plan)
    mask = method.video_token_mask(layout, 5, AttentionContext(step_index=0, layer_index=0))
    hw = layout.video_coords()[:, 1:]
    same_pos = (hw[:, None] == hw[None, :]).all(-1)
    assert mask[FULL].all() and not mask[SKIP].any()
    # window: a band around the diagonal (16-token blocks, +-1 block) in frame-major order
    pos = torch.arange(layout.video_len)
    assert mask[WINDOW][(pos[:, None] - pos[None, :]).abs() <= 16].all()
    assert not mask[WINDOW][(pos[:, None] - pos[None, :]).abs() >= 48].any()
    # multi-diagonal: every frame of the query's own spatial position, not most of the rest
    assert mask[DIAGONAL][same_pos].all() and mask[DIAGONAL].float().mean() < 0.75
    far = (pos[:, None] - pos[None, :]).abs() >= 48  # outside any window: other frames
    assert mask[DIAGONAL][far & same_pos].all() and not mask[DIAGONAL][far & ~same_pos].all()
    # stripe: the same key columns for every query
    assert (mask[STRIPE] == mask[STRIPE][0]).all() and 0 < mask[STRIPE][0].sum() <= 32
    d = method.plan(layout, 5, AttentionContext(step_index=0, layer_index=0)).density_per_head()[0]
    assert d[FULL] == 1 and d[SKIP] == 0 and all(0 < d[m] < 1 for m in (WINDOW, DIAGONAL, STRIPE))


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_skip_heads_give_exactly_zero(seed, family):
    layout = LAYOUTS[family]
    plan = SparseVDiTPlan.from_modes([[[SKIP, WINDOW, SKIP], [SKIP] * 3]], layout, block_size=16)
    method = get_method("sparse-vdit", plan=plan)
    q, k, v = _qkv(layout, heads=3)
    vs, ts = layout.video_slice, layout.text_slice
    for layer, skipped in ((0, [0, 2]), (1, [0, 1, 2])):
        out = method.attention(q, k, v, layout, AttentionContext(step_index=0, layer_index=layer))
        assert torch.equal(out[:, skipped, vs], torch.zeros_like(out[:, skipped, vs]))
        assert out[:, 1, vs].abs().sum() > 0 if layer == 0 else True
        if layout.text_len:  # text queries of a skipped head still attend every key
            ref = torch.softmax(q[:, skipped, ts] @ k[:, skipped].transpose(-1, -2) / 4, -1) @ v[:, skipped]
            assert rel_err(out[:, skipped, ts], ref) < 1e-5


def test_select_modes_is_algorithm_1():
    # losses err + 0.5 * (1 - S): row 0 skip 0.4, window 0.3, diagonal 0.55, stripe 2.05;
    # row 1 all above eps = 1 (stripe 2.05 lowest); row 2 window not measured, stripe 0.55
    errors = torch.tensor([[0.0, 0.4, 0.2, 0.3, 2.0],
                           [0.0, 3.0, 2.0, 2.0, 2.0],
                           [0.0, 0.9, float("nan"), 0.5, 0.5]])
    sparsity = torch.tensor([0.0, 1.0, 0.8, 0.5, 0.9]).expand(3, 5)
    assert select_modes(errors, sparsity, 0.5, 1.0).tolist() == [WINDOW, FULL, STRIPE]
    assert select_modes(errors, sparsity, 0.5, 10.0).tolist() == [WINDOW, STRIPE, STRIPE]  # larger eps: sparser
    assert select_modes(errors, sparsity, 0.0, 1.0).tolist() == [WINDOW, FULL, DIAGONAL]  # no cost term


def test_config_validation_and_overrides(tmp_path):
    assert parse_overrides("sparse-vdit", ["plan=/x/p.safetensors", "window=2", "lam=0.3"]) == {
        "plan": "/x/p.safetensors", "window": 2, "lam": 0.3}
    for bad, msg in [(dict(block_size=48), "power of two"), (dict(stripes=0), "stripes"),
                     (dict(window=-1), "window"), (dict(lam=-1.0), "lam"), (dict(plan=3), "plan must be")]:
        with pytest.raises(ValueError, match=msg):
            SparseVDiTConfig(**bad)
    with pytest.raises(ValueError, match="needs plan="):
        get_method("sparse-vdit")
    plan = SparseVDiTPlan.from_modes([[[FULL]]], LAYOUTS["wan"], block_size=16, window=1)
    with pytest.raises(ValueError, match="differs from the plan's window=1"):
        get_method("sparse-vdit", plan=plan, window=2)
    assert get_method("sparse-vdit", plan=plan, window=1).needs_step


def test_plan_file_round_trip_and_refusals(tmp_path):
    layout = LAYOUTS["hunyuan"]
    plan = _plan(layout, torch.Generator().manual_seed(0))
    plan = SparseVDiTPlan(plan.modes, plan.stripes, torch.rand(1, 3, 5, 5), plan.meta)
    path = plan.save(tmp_path / "p.safetensors")
    back = SparseVDiTPlan.load(path)
    assert back.meta == plan.meta and torch.equal(back.modes, plan.modes)
    assert torch.equal(back.stripes, plan.stripes) and torch.equal(back.errors, plan.errors)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 7])
    with pytest.raises(ValueError, match="truncated or corrupt.*gen calibrate"):
        SparseVDiTPlan.load(tmp_path / "cut.safetensors")
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt"):
        SparseVDiTPlan.load(tmp_path / "flip.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a Sparse-vDiT plan"):
        SparseVDiTPlan.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no Sparse-vDiT plan at"):
        SparseVDiTPlan.load(tmp_path / "missing.safetensors")
    # a plan used on another model's call: other heads, or text where the plan has none
    method = get_method("sparse-vdit", plan=str(path))
    q, k, v = _qkv(layout, heads=4)
    with pytest.raises(ValueError, match="calibrated for custom .*4 heads"):
        method.attention(q, k, v, layout, AttentionContext(step_index=0, layer_index=0))
    q, k, v = _qkv(LAYOUTS["wan"])
    with pytest.raises(ValueError, match="calibrated for custom"):
        method.attention(q, k, v, LAYOUTS["wan"], AttentionContext(step_index=0, layer_index=0))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One search on the tiny Wan (2 steps, CFG as two calls per step) with the defaults:
    64-token blocks, lam 0.5, eps 1."""
    pipe = load("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path_factory.mktemp("plans") / "tiny-wan.safetensors"
    result = calibrate("tiny-wan", ["a red ball"], steps=2, out=path, pipe=pipe)
    return pipe, result


def _render(pipe, steps=2, height=128):
    """The final latents of a run (the VAE decode is 80 % of a tiny-Wan run's CPU time and
    deterministic, so equal latents are equal videos)."""
    with torch.inference_mode():
        out = pipe(prompt="a red ball", height=height, width=128, num_frames=17, num_inference_steps=steps,
                   guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="latent")
    return out.frames[0].numpy()


def test_search_mixes_modes_and_the_saved_plan_reproduces_it(searched):
    pipe, result = searched
    plan = load_plan(result.path, model="tiny-wan", height=128, width=128, frames=17, steps=2)
    assert torch.equal(plan.modes, result.plan.modes) and torch.equal(plan.modes, result.pass_modes[0])
    assert len(set(plan.modes.flatten().tolist())) > 1, plan  # window and stripe heads on tiny-wan
    assert not torch.isnan(plan.errors).any() and (plan.errors[..., FULL] == 0).all()
    with gen.sparse(pipe, "sparse-vdit", plan=str(result.path)) as handle:
        first, second = _render(pipe), _render(pipe)
        summary = handle.summary()["transformers"][0]
    assert np.array_equal(first, second)
    # the calibration pass ran the chosen modes: the same video as a run with the plan
    assert np.array_equal(first, result.outputs[0])
    assert summary["sparse_calls"] == 2 * (2 * 2 * 2) and summary["dense_calls"] == 0  # 2 runs x steps x CFG x layers
    assert list(summary["density"].values()) == [pytest.approx(float(plan.video_density().mean()))]


def test_mismatched_runs_are_refused(searched):
    pipe, result = searched
    for check, message in [(dict(model="tiny-wan-i2v"), "calibrated for tiny-wan, not tiny-wan-i2v"),
                           (dict(height=96), "calibrated at 128x128 pixels, 17 frames"),
                           (dict(steps=3), "calibrated for 2 denoising steps")]:
        with pytest.raises(ValueError, match=message):
            load_plan(result.path, **check)
    # a pipeline loaded under another registry name is refused even with equal shapes
    pipe.__dict__["_gen_model_name"] = "tiny-wan-i2v"
    try:
        with pytest.raises(ValueError, match="calibrated for tiny-wan, not tiny-wan-i2v"):
            gen.sparsify(pipe, "sparse-vdit", plan=str(result.path))
    finally:
        pipe.__dict__["_gen_model_name"] = "tiny-wan"
    with gen.sparse(pipe, "sparse-vdit", plan=str(result.path)):
        with pytest.raises(ValueError, match="this call has 5x6x8 tokens"):
            _render(pipe, height=96)
        with pytest.raises(ValueError, match="2 denoising steps and this run has 3.*--steps 2"):
            _render(pipe, steps=3)


def test_cli_calibrate_then_render(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n# not a prompt\n\na blue cube\n")
    assert read_prompts(prompts) == ["a red ball", "a blue cube"]
    plan = tmp_path / "plans" / "tiny.safetensors"
    res = runner.invoke(app, ["calibrate", "sparse-vdit", "--model", "tiny-wan", "--prompts", str(prompts),
                              "--out", str(plan), "--steps", "1", "--set", "block_size=32"])
    assert res.exit_code == 0, res.output
    assert "modes" in res.output and "density" in res.output
    assert not [p for p in plan.parent.iterdir() if p.name.startswith(".")]  # written atomically
    loaded = SparseVDiTPlan.load(plan)
    assert loaded.meta.prompts == ("a red ball", "a blue cube") and loaded.meta.block_size == 32
    res = runner.invoke(app, ["render", "a red ball", "--model", "tiny-wan", "--steps", "1", "--attention", "sparse-vdit",
                              "--set", f"plan={plan}", "--out", str(tmp_path / "ball.mp4")])
    assert res.exit_code == 0, res.output
    assert "sparse" in res.output and (tmp_path / "ball.mp4").stat().st_size > 0
    (tmp_path / "bad.safetensors").write_bytes(plan.read_bytes()[:100])
    res = runner.invoke(app, ["render", "a red ball", "--model", "tiny-wan", "--steps", "1", "--attention", "sparse-vdit",
                              "--set", f"plan={tmp_path / 'bad.safetensors'}", "--out", str(tmp_path / "b.mp4")])
    assert res.exit_code == 2 and "truncated or corrupt" in res.output
    res = runner.invoke(app, ["calibrate", "sparse-vdit", "--model", "tiny-flux", "--prompts", str(prompts),
                              "--out", str(tmp_path / "f.safetensors")])
    assert res.exit_code == 2 and "supports wan, hunyuan" in res.output
