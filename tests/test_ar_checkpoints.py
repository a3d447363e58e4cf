"""Causal checkpoint converters: state dicts with the public checkpoints' key layouts (built
here from a tiny Wan with the original Wan module names) convert to the diffusers model."""

import pytest
import torch
from diffusers import WanTransformer3DModel
from typer.testing import CliRunner

from gen.cli import app
from gen.pipelines.ar.checkpoints import (
    convert_causal_checkpoint,
    load_causal_checkpoint,
    merge_lora,
)
from gen.pipelines.tiny import build_tiny_pipeline

# diffusers name -> original Wan name, written from the Wan module names (independent of the converter)
_TO_WAN = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.", "self_attn."), ("attn2.", "cross_attn."),
    (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),  # diffusers' cross-attention norm is Wan's norm3
]


def _to_wan(key):
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return key.replace("proj_out.", "head.head.")
    for a, b in _TO_WAN:
        key = key.replace(a, b)
    return key.replace(".scale_shift_table", ".modulation")


@pytest.fixture(scope="module")
def model():
    return build_tiny_pipeline("tiny-wan").transformer.eval()


@pytest.fixture()
def wan_sd(model):
    torch.manual_seed(0)
    return {_to_wan(k): torch.randn_like(v) for k, v in model.state_dict().items()}


def _fresh(model):
    return WanTransformer3DModel.from_config(model.config).eval()


def _expected(model, wan_sd):
    inv = {_to_wan(k): k for k in model.state_dict()}
    return {inv[k]: v for k, v in wan_sd.items()}


@pytest.mark.parametrize("layout", ["self_forcing", "causvid", "rolling"])
def test_public_layouts_convert(model, wan_sd, layout):
    if layout == "self_forcing":
        ckpt = {"generator_ema": {f"model.{k}": v for k, v in wan_sd.items()}, "generator": {}}
    elif layout == "causvid":
        ckpt = {"generator": {f"model.{k}": v for k, v in wan_sd.items()}}
    else:  # FSDP-wrapped EMA keys
        wrap = "_fsdp_wrapped_module."
        ckpt = {"generator_ema": {f"model.{wrap}{k}".replace("self_attn.", f"{wrap}self_attn."): v
                                  for k, v in wan_sd.items()}}
    sd, name = convert_causal_checkpoint(ckpt)
    if layout == "rolling":
        assert name.startswith("Rolling Forcing")
    exp = _expected(model, wan_sd)
    assert sd.keys() == exp.keys()
    assert all(torch.equal(sd[k], exp[k]) for k in exp)
    m = _fresh(model)
    m.load_state_dict(sd, strict=True)


def test_longlive_lora_merge_and_file_loading(model, wan_sd, tmp_path):
    r = 4
    lora = {}
    for k, v in wan_sd.items():
        if ".self_attn." in k and k.endswith(".weight") and v.dim() == 2:
            base = k[: -len(".weight")]
            lora[f"base_model.model.{base}.lora_A.default.weight"] = torch.randn(r, v.shape[1])
            lora[f"base_model.model.{base}.lora_B.default.weight"] = torch.randn(v.shape[0], r)
    base = {"generator": {f"model.{k}": v for k, v in wan_sd.items()}}
    torch.save(base, tmp_path / "longlive_base.pt")
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    m = _fresh(model)
    layout = load_causal_checkpoint(m, tmp_path / "lora.pt", tmp_path / "longlive_base.pt")
    assert layout.startswith("LongLive base + LoRA")
    a = lora["base_model.model.blocks.0.self_attn.q.lora_A.default.weight"]
    b = lora["base_model.model.blocks.0.self_attn.q.lora_B.default.weight"]
    want = wan_sd["blocks.0.self_attn.q.weight"] + b @ a
    assert torch.allclose(m.blocks[0].attn1.to_q.weight, want, atol=1e-5)
    assert torch.equal(m.blocks[0].attn2.to_q.weight, wan_sd["blocks.0.cross_attn.q.weight"])  # not adapted
    with pytest.raises(ValueError, match="only"):
        merge_lora(dict(wan_sd), {k: v for k, v in lora.items() if "lora_A" in k})


def test_unknown_and_mismatched_checkpoints(model, wan_sd, tmp_path):
    with pytest.raises(ValueError, match="not a recognised causal Wan checkpoint(.|\n)*Rolling Forcing"):
        convert_causal_checkpoint({"generator": {"unet.conv_in.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="LoRA file"):
        convert_causal_checkpoint({"x.lora_A.weight": torch.zeros(1)})
    big = dict(wan_sd)
    big["patch_embedding.weight"] = torch.zeros(7, 16, 1, 2, 2)
    torch.save({"generator_ema": {f"model.{k}": v for k, v in big.items()}}, tmp_path / "big.pt")
    with pytest.raises(ValueError, match="does not fit this transformer.*patch_embedding"):
        load_causal_checkpoint(_fresh(model), tmp_path / "big.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_causal_checkpoint(_fresh(model), tmp_path / "nope.pt")


def test_cli_long_checkpoint(wan_sd, tmp_path):
    ckpt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in wan_sd.items()}}, ckpt)
    out = tmp_path / "c.mp4"
    args = ["long", "a cat", "--model", "tiny-wan", "--schedule", "chunk", "--seconds", "1", "--height", "32", "--width", "32",
            "--device", "cpu", "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--checkpoint", str(ckpt)])
    assert r.exit_code == 0, r.output
    assert out.is_file()
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, bad)
    r = CliRunner().invoke(app, [*args, "--checkpoint", str(bad)])
    assert r.exit_code == 2 and "not a recognised causal Wan checkpoint" in r.output
