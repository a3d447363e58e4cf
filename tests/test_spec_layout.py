"""``ModelSpec.layout(height, width, frames)`` is the layout gen's geometry hook reads
from a real render of that size, for every family (tiny offline pipelines, one step,
at the default size and at another one)."""

import pytest
import torch
from PIL import Image

import gen
from gen.attention import TokenLayout
from gen.pipelines import build_tiny_pipeline, get_spec, list_models
from gen.pipelines.tiny import TINY_NAMES
from gen.session import pipeline_kwargs

# a second size per model: other rows, columns and (video) frames than the default
OTHER_SIZE = {"tiny-wan": (64, 96, 9), "tiny-wan-i2v": (96, 64, 5), "tiny-hunyuan": (64, 112, 9),
              "tiny-flux": (128, 192, 1)}


def _layouts_of_a_render(pipe, spec, height, width, frames) -> set:
    image = Image.new("RGB", (width, height), (200, 40, 40)) if spec.task == "i2v" else None
    kwargs = pipeline_kwargs(spec, prompt="a red ball", negative_prompt=None, height=height, width=width,
                             frames=frames, steps=1, guidance=spec.guidance,
                             generator=torch.Generator().manual_seed(0), image=image)
    kwargs["output_type"] = "latent"  # the layout is read before any decoding
    with gen.sparse(pipe, "dense") as handle, torch.inference_mode():
        pipe(**kwargs)
        stats = handle.patches[0].run.stats
        assert not stats.fallback_calls
        return set(stats.layouts)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_spec_layout_is_what_the_hook_reads(name):
    spec = get_spec(name)
    pipe = build_tiny_pipeline(name)
    for height, width, frames in ((spec.height, spec.width, spec.frames), OTHER_SIZE[name]):
        expected = spec.layout(height, width, frames)
        assert _layouts_of_a_render(pipe, spec, height, width, frames) == {expected}, (height, width, frames)


def test_spec_layout_of_the_real_models():
    assert get_spec("wan2.1-t2v-1.3b").layout() == TokenLayout(21, 30, 52)
    assert get_spec("hunyuanvideo").layout(544, 960, 129) == TokenLayout(33, 34, 60, text_len=256, text_first=False)
    assert get_spec("flux.1-dev").layout(768, 1360, 1) == TokenLayout(1, 48, 85, text_len=512, text_first=True)
    spec = get_spec("wan2.1-t2v-14b")
    assert spec.latent_grid(720, 1280, 81) == (21, 90, 160) and spec.token_grid(720, 1280, 81) == (21, 45, 80)
    with pytest.raises(ValueError, match="frames must be 4k\\+1"):
        spec.layout(720, 1280, 80)


@pytest.mark.parametrize("name", [s.name for s, *_ in list_models()])
def test_negative_prompt_reaches_only_pipelines_that_guide_with_it(name):
    """``takes_negative_prompt`` against the diffusers pipeline's own signature: where gen
    passes a negative prompt, ``__call__`` takes one; FLUX's is dropped (it guides with
    one only under ``true_cfg_scale > 1``, which gen never sets)."""
    import inspect

    import diffusers

    spec = get_spec(name)
    call = inspect.signature(getattr(diffusers, spec.pipeline_class).__call__).parameters
    kw = pipeline_kwargs(spec, prompt="p", negative_prompt="blurry", height=spec.height, width=spec.width,
                         frames=spec.frames, steps=2, guidance=spec.guidance, generator=None,
                         image=Image.new("RGB", (spec.width, spec.height)) if spec.task == "i2v" else None)
    assert ("negative_prompt" in kw) == spec.takes_negative_prompt
    assert set(kw) <= set(call), set(kw) - set(call)
    if spec.family == "flux":
        assert not spec.takes_negative_prompt and "true_cfg_scale" not in kw
