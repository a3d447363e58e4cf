"""Tiny offline pipelines: they run end to end, are reproducible, and load back exactly.

Everything is offline (HF_HUB_OFFLINE=1) and the tiny-model cache lives in a temp dir.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from gen.pipelines import build_tiny_pipeline, get_spec, load  # noqa: E402
from gen.pipelines.registry import tiny_cache_folder  # noqa: E402
from gen.pipelines.tiny import TINY_NAMES  # noqa: E402
from gen.pipelines.tokenizers import VOCAB_SIZE, build_tokenizer  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run the tiny models on one CPU thread, restoring the setting afterwards.

    They are too small to gain from intra-op threads, and on a shared, busy CPU the
    OpenMP barriers of a multi-threaded run stall (about 10x slower on 2 loaded cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """GEN_CACHE_DIR and the Hugging Face cache in temp dirs for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("GEN_CACHE_DIR", str(tmp_path_factory.mktemp("gen-cache")))
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
        mp.delenv("HF_HUB_CACHE", raising=False)
        yield


def _image(size: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


def _run(pipe, name: str, *, height=None, width=None, frames=None, output_type="np", image=None, seed=0):
    """2-step run at the spec's geometry unless given; returns frames (video) or images."""
    spec = get_spec(name)
    kw = dict(
        prompt="a red ball",
        height=height or spec.height,
        width=width or spec.width,
        num_inference_steps=2,
        guidance_scale=spec.guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    )
    if spec.is_video:
        kw["num_frames"] = frames or spec.frames
    if spec.task == "i2v":
        kw["image"] = image if image is not None else _image(kw["height"], 0)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kw)
    return out.frames if spec.is_video else out.images


def _attention_token_counts(pipe, name: str):
    """Hook the transformer's first attention module; returns (counts it fills, hook handle).

    ``counts["video"]``: tokens in ``hidden_states``; ``counts["text"]``: tokens in
    ``encoder_hidden_states`` (0 when the call has none).
    """
    family = get_spec(name).family
    module = pipe.transformer.blocks[0].attn1 if family == "wan" else pipe.transformer.transformer_blocks[0].attn
    seen: dict[str, int] = {}

    def hook(mod, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        seen.setdefault("video", hs.shape[1])
        seen.setdefault("text", 0 if ehs is None else ehs.shape[1])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("name", TINY_NAMES)
def test_default_geometry_runs_with_the_specs_token_counts(name):
    spec = get_spec(name)
    pipe = build_tiny_pipeline(name)
    assert type(pipe).__name__ == spec.pipeline_class
    seen, handle = _attention_token_counts(pipe, name)
    frames = _run(pipe, name)
    handle.remove()
    if spec.is_video:
        assert frames.shape == (1, spec.frames, spec.height, spec.width, 3)
    else:
        assert frames.shape == (1, spec.height, spec.width, 3)
    assert np.isfinite(frames).all() and frames.min() >= 0.0 and frames.max() <= 1.0
    assert frames.std() > 0  # not a constant picture
    t, h, w = spec.token_grid()
    assert seen["video"] == t * h * w >= 48
    # Wan's self-attention has no text; HunyuanVideo and FLUX attend jointly to the text.
    assert seen["text"] == (0 if spec.family == "wan" else spec.text_tokens)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_pil_output(name):
    spec = get_spec(name)
    pipe = build_tiny_pipeline(name)
    h, w = (64, 96) if spec.is_video else (128, 160)
    out = _run(pipe, name, height=h, width=w, frames=5, output_type="pil")
    if spec.is_video:
        assert len(out) == 1 and len(out[0]) == 5
        assert all(isinstance(f, Image.Image) and f.size == (w, h) for f in out[0])
    else:
        assert len(out) == 1 and isinstance(out[0], Image.Image) and out[0].size == (w, h)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_same_seed_same_weights_other_seed_other_weights(name):
    a, b, c = build_tiny_pipeline(name), build_tiny_pipeline(name), build_tiny_pipeline(name, seed=1)
    for comp, module in a.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        sa, sb = module.state_dict(), b.components[comp].state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), comp
    wa = torch.cat([p.flatten() for p in a.transformer.parameters()])
    wc = torch.cat([p.flatten() for p in c.transformer.parameters()])
    assert not torch.equal(wa, wc)


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_pipeline("tiny-flux")
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_load_reproduces_the_in_memory_pipeline_exactly(name, offline_env):
    spec = get_spec(name)
    h, w = (64, 64) if spec.is_video else (128, 128)
    expected = _run(build_tiny_pipeline(name), name, height=h, width=w, frames=5)
    loaded = load(name)
    folder = tiny_cache_folder(name)
    assert (folder / "model_index.json").is_file()
    assert type(loaded).__name__ == spec.pipeline_class
    # Went through from_pretrained on the saved folder.
    assert os.path.samefile(loaded.config._name_or_path, folder)
    np.testing.assert_array_equal(_run(loaded, name, height=h, width=w, frames=5), expected)
    # No temp dirs are left next to the published folder.
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_second_load_reuses_the_saved_folder(offline_env):
    load("tiny-wan")
    index = tiny_cache_folder("tiny-wan") / "model_index.json"
    before = index.stat().st_mtime_ns
    load("tiny-wan")
    assert index.stat().st_mtime_ns == before


def test_i2v_runs_the_image_context_branch():
    name = "tiny-wan-i2v"
    pipe = build_tiny_pipeline(name)
    attn2 = pipe.transformer.blocks[0].attn2
    assert attn2.add_k_proj is not None and attn2.add_v_proj is not None
    seen = []
    handle = attn2.add_k_proj.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    geo = dict(height=64, width=64, frames=5)
    base = _run(pipe, name, image=_image(64, 0), **geo)
    handle.remove()
    # 32x32 CLIP input in 8x8 patches -> 16 + 1 image tokens, model width 32.
    assert seen and seen[0][1:] == (17, 32)
    other_image = _run(pipe, name, image=_image(64, 1), **geo)
    assert np.abs(base - other_image).max() > 1e-3
    # The image branch contributes by itself: silence its values and the video changes.
    with torch.no_grad():
        for block in pipe.transformer.blocks:
            block.attn2.add_v_proj.weight.zero_()
            block.attn2.add_v_proj.bias.zero_()
    silenced = _run(pipe, name, image=_image(64, 0), **geo)
    assert np.abs(base - silenced).max() > 1e-4


def test_hunyuan_default_template_crop_lands_on_the_prompt():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    pipe = build_tiny_pipeline("tiny-hunyuan")
    tok = pipe.tokenizer
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert len(tok(prefix).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"]
    ids = tok(DEFAULT_PROMPT_TEMPLATE["template"].format("a red ball")).input_ids
    kept = tok.convert_ids_to_tokens(ids[DEFAULT_PROMPT_TEMPLATE["crop_start"] :])
    assert [t.lstrip("\u0120") for t in kept] == ["a", "red", "ball", "<|eot_id|>"]
    embeds, pooled, mask = pipe.encode_prompt("a red ball", max_sequence_length=256)
    assert embeds.shape == (1, 256, 32) and pooled.shape == (1, 32)
    assert mask.sum().item() == 4


@pytest.mark.parametrize("style", ["t5", "llama", "clip"])
def test_tokenizer_is_deterministic_and_pads_truncates_decodes(style):
    a, b = build_tokenizer(style), build_tokenizer(style)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == VOCAB_SIZE
    enc = a(
        ["a red ball", "The dog flibbertigibbets " + "over " * 40],
        padding="max_length",
        max_length=16,
        truncation=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert enc.input_ids.shape == (2, 16)
    words = {"t5": 3 + 1, "llama": 1 + 3, "clip": 1 + 3 + 1}[style]  # specials + 3 words
    assert enc.attention_mask[0].sum().item() == words
    assert enc.attention_mask[1].sum().item() == 16
    assert a.unk_token_id in enc.input_ids[1].tolist()  # the made-up word
    assert a.batch_decode(enc.input_ids[:1], skip_special_tokens=True) == ["a red ball"]


def test_low_precision_build_matches_from_pretrained_dtypes(offline_env):
    built = build_tiny_pipeline("tiny-wan", dtype=torch.bfloat16)
    loaded = load("tiny-wan", dtype=torch.bfloat16)
    for comp in ("transformer", "vae", "text_encoder"):
        a = {n: p.dtype for n, p in built.components[comp].named_parameters()}
        b = {n: p.dtype for n, p in loaded.components[comp].named_parameters()}
        assert a == b, comp
    # Wan keeps its time embedder and norms in float32, the rest is bfloat16.
    dtypes = {p.dtype for p in built.transformer.parameters()}
    assert dtypes == {torch.bfloat16, torch.float32}
