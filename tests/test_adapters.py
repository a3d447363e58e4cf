"""One adapter per model family: what each patches and leaves stock, its layout rule,
its light import, and a new family added as one adapter (no change elsewhere)."""

import subprocess
import sys

import pytest
import torch

from gen.attention import TokenLayout
from gen.attention.methods import get_method
from gen.attention.processors import SparseAttnProcessorBase, install
from gen.attention.processors.adapter import (
    _ADAPTERS,
    FAMILY_MODULES,
    FamilyAdapter,
    adapter_for_layout,
    adapter_of,
    all_adapters,
    get_adapter,
    register_adapter,
)
from gen.attention.processors.parallel import gathered_order

from tiny_transformers import FAMILIES


def _stock_attention(transformer):
    """Every attention module with a processor: name -> processor object."""
    return {name: m.processor for name, m in transformer.named_modules() if hasattr(m, "processor")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_patches_its_modules_and_leaves_the_others_stock(family):
    build, inputs = FAMILIES[family]
    t = build()
    adapter = adapter_of(t)
    assert adapter is get_adapter(family) and adapter.name == family
    before = _stock_attention(t)
    patched = dict(adapter.attention_modules(t))
    assert patched and all(isinstance(before[name], adapter.loaded().stock) for name in patched)
    stock = set(before) - set(patched)
    if family == "wan":
        assert stock == {f"blocks.{i}.attn2" for i in range(len(t.blocks))}
    elif family == "hunyuan":
        assert stock and all(name.startswith("context_embedder.token_refiner") for name in stock)
    else:
        assert not stock
    patch = install(t, get_method("dense"))
    try:
        after = _stock_attention(t)
        assert all(isinstance(after[name], adapter.loaded().sparse) for name in patched)
        assert all(after[name] is before[name] for name in stock)  # the same objects, untouched
        with torch.no_grad():
            t(**inputs())
        assert patch.run.stats.sparse_calls and not patch.run.stats.fallback_calls
    finally:
        patch.remove()
    assert all(_stock_attention(t)[name] is proc for name, proc in before.items())


def test_layout_rule_and_gathered_order_follow_the_text_placement():
    for adapter in all_adapters():
        layout = adapter.layout((2, 3, 4), 5)
        assert (layout.frames, layout.height, layout.width) == (2, 3, 4)
        assert layout.text_len == (0 if adapter.text == "none" else 5)
        assert layout.text_first == (adapter.text == "first")
        order = gathered_order(adapter, 24 + 4, 4, 2, torch.device("cpu"))
        assert (order is None) == (adapter.text == "none")
    assert {a.name: a.text for a in all_adapters()} == {"wan": "none", "hunyuan": "last", "flux": "first"}
    for adapter in all_adapters():
        assert adapter_for_layout(adapter.layout((1, 2, 2), 3)) is adapter
    assert list(FAMILY_MODULES) == [a.name for a in all_adapters()]


def test_unknown_family_and_class_are_refused_with_the_supported_ones():
    with pytest.raises(ValueError, match="unknown model family 'sdxl'.*wan, hunyuan, flux"):
        get_adapter("sdxl")
    with pytest.raises(ValueError, match="Linear is not supported.*WanTransformer3DModel"):
        adapter_of(torch.nn.Linear(2, 2))


def test_adapters_and_spec_layouts_import_no_diffusers():
    code = ("import sys\n"
            "from gen.pipelines import MODELS\n"
            "from gen.attention.processors.adapter import all_adapters\n"
            "all_adapters(); [s.layout() for s in MODELS.values()]\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers'))[:5])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_new_family_is_one_adapter():
    """A family gen does not know, added by registering one adapter: install, the
    geometry hook, the per-run state and restore need nothing else (a method states the
    families it supports; here dense is told it supports the new one). The family is a
    Wan subclass whose adapter records each call's layout in its per-run state."""
    from diffusers import WanTransformer3DModel

    class RecordingWan(WanTransformer3DModel):
        pass

    wan = get_adapter("wan")

    def read_call(module, args, kwargs, seen):
        geometry = wan.read_call(module, args, kwargs, None)
        seen.append(geometry.layout)
        return geometry

    adapter = register_adapter(FamilyAdapter(
        name="recording-wan", label="RecordingWan", transformer_classes=("RecordingWan",), text="none",
        attention_modules=wan.attention_modules, stays_stock=wan.stays_stock, read_call=read_call,
        timestep_arg=wan.timestep_arg, processors=wan.processors, new_call_state=list))
    try:
        build, inputs = FAMILIES["wan"]
        base = build()
        t = RecordingWan.from_config(base.config).eval()
        t.load_state_dict(base.state_dict())
        assert adapter_of(t) is adapter and adapter_of(base).name == "wan"  # the most specific class wins
        method = get_method("dense")
        method.families = (*method.families, "recording-wan")
        with torch.no_grad():
            stock = t(**inputs())[0]
            patch = install(t, method)
            try:
                out = t(**inputs())[0]
                assert patch.family == "recording-wan" and patch.run.adapter is adapter
                assert patch.run.call_state == [TokenLayout(3, 8, 8)]
                assert all(isinstance(m.processor, SparseAttnProcessorBase) for _, m in adapter.attention_modules(t))
            finally:
                patch.remove()
        torch.testing.assert_close(out, stock, atol=1e-4, rtol=0)
        assert not any(isinstance(p, SparseAttnProcessorBase) for p in t.attn_processors.values())
    finally:
        _ADAPTERS.pop("recording-wan", None)
