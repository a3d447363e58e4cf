"""The calibrated-plan file format (gen.attention.plan_file): round trip, the checksum,
and every refusal (missing, truncated, flipped, tampered, another kind of file, damaged
meta, newer format, another model/geometry/steps), for a format of its own, for PARO's
plans and for Sparse-vDiT's (whose files keep their format)."""

import dataclasses
import hashlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gen.attention import AttentionContext, TokenLayout
from gen.attention.methods.paro import ParoPlan
from gen.attention.methods.sparse_vdit import FULL, SparseVDiTPlan
from gen.attention.methods.sparse_vdit import PLAN_FORMAT as SVDIT_FORMAT
from gen.attention.plan_file import (
    PlanFormat,
    check_call,
    check_run,
    checksum,
    load_plan_file,
    meta_from_json,
    save_plan_file,
)

FMT = PlanFormat("demo-method", "demo plan", 2, ("a", "b"), per_step="the demo is per step")


@dataclasses.dataclass(frozen=True)
class Meta:
    model: str
    family: str
    grid: tuple[int, int, int]
    text_len: int
    text_first: bool
    steps: int
    layers: int
    heads: int
    head_dim: int | None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    prompts: tuple[str, ...] = ()
    format_version: int = 2


META = Meta("tiny-wan", "wan", (5, 8, 8), 0, False, 3, 2, 4, 16, 128, 128, 17, ("a ball",))


def _parse(text):
    return meta_from_json(Meta, text)


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randint(0, 9, (5,), generator=g, dtype=torch.int32)}


def test_round_trip_and_checksum(tmp_path, seed):
    tensors = _tensors(seed)
    path = save_plan_file(tmp_path / "p.safetensors", FMT, tensors, META)
    back, meta = load_plan_file(path, FMT, _parse)
    assert meta == META and set(back) == {"a", "b"}
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert header["format"] == "gen.demo-method" and header["sha256"] == checksum(tensors, FMT.tensors)
    # the checksum covers names, shapes and bytes, in the format's order
    assert checksum(tensors, ("a", "b")) != checksum(tensors, ("b", "a"))
    reshaped = dict(tensors, a=tensors["a"].reshape(4, 3))
    assert checksum(reshaped, FMT.tensors) != checksum(tensors, FMT.tensors)


def test_refusals_say_what_to_do(tmp_path, seed):
    tensors = _tensors(seed)
    path = save_plan_file(tmp_path / "p.safetensors", FMT, tensors, META)
    data = path.read_bytes()
    hint = "gen calibrate demo-method"
    cases = {}
    cases["missing"] = (tmp_path / "nope.safetensors", "no demo plan at")
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 5])
    cases["truncated"] = (tmp_path / "cut.safetensors", "truncated or corrupt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.safetensors", "truncated or corrupt")
    flipped = bytearray(data)
    flipped[-2] ^= 0x40
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    cases["flipped"] = (tmp_path / "flip.safetensors", "checksum mismatch")
    # tampered: other data under the original header and checksum
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    save_file({"a": tensors["a"] + 1, "b": tensors["b"]}, str(tmp_path / "tamper.safetensors"), metadata=header)
    cases["tampered"] = (tmp_path / "tamper.safetensors", "checksum mismatch")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    cases["other kind"] = (tmp_path / "other.safetensors", "not a demo plan")
    save_file(tensors, str(tmp_path / "meta.safetensors"), metadata={**header, "meta": "{not json"})
    cases["damaged meta"] = (tmp_path / "meta.safetensors", "meta header is damaged")
    newer = dataclasses.replace(META, format_version=3)
    save_plan_file(tmp_path / "newer.safetensors", FMT, tensors, newer)
    cases["newer"] = (tmp_path / "newer.safetensors", "plan format 3; this gen reads up to 2")
    save_file({"a": tensors["a"]}, str(tmp_path / "lacks.safetensors"), metadata=header)
    cases["lacks a tensor"] = (tmp_path / "lacks.safetensors", r"lacks \['b'\]")
    for what, (p, message) in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            load_plan_file(p, FMT, _parse)
        if what != "newer":
            assert hint in str(err.value), what


def test_run_and_call_checks():
    check_run(META, FMT, "p", model="tiny-wan", height=128, width=128, frames=17, steps=3)
    for kw, message in [(dict(model="tiny-hunyuan"), "calibrated for tiny-wan, not tiny-hunyuan.*--model tiny-hunyuan"),
                        (dict(height=96), "calibrated at 128x128 pixels, 17 frames.*--height 96"),
                        (dict(frames=9), "calibrated at 128x128 pixels, 17 frames"),
                        (dict(steps=4), "3 denoising steps and this run has 4: the demo is per step.*--steps 3")]:
        with pytest.raises(ValueError, match=message):
            check_run(META, FMT, "p", **kw)
    layout = TokenLayout(5, 8, 8)
    assert check_call(META, FMT, "p", layout, 4, 16, AttentionContext(step_index=2, num_steps=3, layer_index=1)) == (2, 1)
    bad = [((TokenLayout(5, 6, 8), 4, AttentionContext(step_index=0, layer_index=0)), "this call has 5x6x8 tokens"),
           ((layout, 2, AttentionContext(step_index=0, layer_index=0)), "this model is wan with 2 heads"),
           ((TokenLayout(5, 8, 8, text_len=3), 4, AttentionContext(step_index=0, layer_index=0)), "this model is hunyuan"),
           ((layout, 4, AttentionContext(step_index=0, layer_index=2)), "covers 2 attention layers"),
           ((layout, 4, AttentionContext(layer_index=0)), "demo-method needs the denoising step"),
           ((layout, 4, AttentionContext(step_index=3, layer_index=0)), "reached step 4"),
           ((layout, 4, AttentionContext(step_index=0, num_steps=5, layer_index=0)), "this run has 5")]
    for (lay, heads, ctx), message in bad:
        with pytest.raises(ValueError, match=message):
            check_call(META, FMT, "p", lay, heads, 16, ctx)


def test_sparse_vdit_files_keep_their_format(tmp_path):
    layout = TokenLayout(3, 4, 6)
    plan = SparseVDiTPlan.from_modes([[[FULL, "window"]]], layout, block_size=16, window=1)
    path = plan.save(tmp_path / "sv.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    assert header["format"] == "gen.sparse-vdit" == SVDIT_FORMAT.tag
    # the checksum as Sparse-vDiT always wrote it: modes, stripes, errors in that order
    h = hashlib.sha256()
    for name in ("modes", "stripes", "errors"):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    assert header["sha256"] == h.hexdigest()
    assert SparseVDiTPlan.load(path).meta == plan.meta


def test_paro_plan_file_round_trip_and_refusals(tmp_path, seed):
    layout = TokenLayout(3, 4, 6, text_len=5)
    g = torch.Generator().manual_seed(seed)
    nb = -(-layout.video_len // 16)
    masks = torch.rand(2, 3, 4, nb, nb, generator=g) < 0.4
    orders = torch.randint(0, 6, (3, 4), generator=g)
    empty = torch.rand(3, 4, generator=g) < 0.3
    plan = ParoPlan.from_masks(orders, masks, layout, empty=empty, block_size=16, steps=5, model="tiny-hunyuan",
                               height=64, width=96, frames=9)
    path = plan.save(tmp_path / "paro.safetensors")
    back = ParoPlan.load(path)
    assert back.meta == plan.meta and back.source == str(path)
    for name in ("orders", "empty", "masks", "vv_mass"):
        assert torch.equal(getattr(back, name), getattr(plan, name)), name
    assert back.kept_mass.isnan().all()  # hand-made: not measured
    assert torch.equal(back.all_masks()[..., :-1, :-1], masks[..., :-1, :-1])  # last row/col forced on
    assert back.all_masks()[..., -1, :].all() and back.all_masks()[..., :, -1].all()
    assert torch.allclose(back.m_sparse, plan.m_sparse, equal_nan=True)
    back.check(model="tiny-hunyuan", height=64, width=96, frames=9, steps=5)
    for kw, message in [(dict(model="tiny-wan"), "calibrated for tiny-hunyuan, not tiny-wan.*gen calibrate paro"),
                        (dict(width=128), "calibrated at 96x64 pixels, 9 frames"),
                        (dict(steps=4), "5 denoising steps and this run has 4.*timestep bin")]:
        with pytest.raises(ValueError, match=message):
            back.check(**kw)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt.*gen calibrate paro"):
        ParoPlan.load(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="not a PARO plan"):
        ParoPlan.load(SparseVDiTPlan.from_modes([[[FULL]]], TokenLayout(3, 4, 6), block_size=16).save(
            tmp_path / "sv.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tampered = back.tensors()
    tampered["orders"] = (tampered["orders"] + 1) % 6
    save_file(tampered, str(tmp_path / "tamper.safetensors"), metadata=header)
    with pytest.raises(ValueError, match="checksum mismatch"):
        ParoPlan.load(tmp_path / "tamper.safetensors")
