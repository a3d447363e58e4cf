"""A failed ``gen.sparsify`` leaves the model exactly as it found it; statistics outlive
``with gen.sparse(...)``; ``gen.attention.get_method``; ``BlockPlan`` size checks.

Failures are forced at several points of the install (before and after the geometry
hook is attached, half-way through the processor swap, on the second transformer of a
pipeline, after every install succeeded) on tiny offline models (fp32, CPU). After each
one the processors must be the same objects as before, the diffusers hook registry the
same as before, ``forward`` and the module's own hooks untouched, no ``_gen_*``
attribute left, and a later ``sparsify`` + ``restore`` must work and give back the
stock output bit for bit.
"""

import copy
import importlib
import subprocess
import sys
import types

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import gen
import gen.api
from gen.attention import BlockPlan
from gen.attention.processors import WanSparseAttnProcessor, attach_run_state
from gen.attention.processors.runtime import GEOMETRY_HOOK
from gen.pipelines import load

from tiny_transformers import FAMILIES, flux_inputs, tiny_flux, tiny_wan, wan_inputs

# the module (the package re-exports its `install` function under the same name)
install_module = importlib.import_module("gen.attention.processors.install")


class Boom(RuntimeError):
    pass


def _run(t, inputs):
    with torch.no_grad():
        return t(**inputs)[0]


def _snapshot(t):
    """Everything an install may touch on one transformer."""
    registry = t.__dict__.get("_diffusers_hook")
    return {
        "processors": dict(t.attn_processors),
        "registry": registry,
        "hooks": None if registry is None else dict(registry.hooks),
        "order": None if registry is None else list(registry._hook_order),
        "fn_refs": None if registry is None else list(registry._fn_refs),
        "forward": t.__dict__.get("forward"),
        "torch_hooks": (dict(t._forward_hooks), dict(t._forward_pre_hooks)),
        "gen_attrs": sorted(k for k in t.__dict__ if k.startswith("_gen_sparse")),
    }


def _assert_untouched(t, before):
    after = _snapshot(t)
    assert after["processors"].keys() == before["processors"].keys()
    changed = [k for k, p in before["processors"].items() if after["processors"][k] is not p]
    assert not changed, f"processors not put back: {changed}"
    assert after["registry"] is before["registry"], "hook registry added or replaced"
    for key in ("hooks", "order", "fn_refs", "torch_hooks", "gen_attrs"):
        assert after[key] == before[key], key
    assert after["forward"] is before["forward"], "forward not restored"
    assert not any(isinstance(p, WanSparseAttnProcessor) for p in t.attn_processors.values())


class _OtherHook(ModelHook):
    """Someone else's diffusers hook, registered before gen's."""


# -- one transformer -------------------------------------------------------------


def _fail_after_attach(monkeypatch):
    real = install_module.attach_run_state

    def attach(*args, **kwargs):
        real(*args, **kwargs)
        raise Boom("after the hook was attached")

    monkeypatch.setattr(install_module, "attach_run_state", attach)


def _fail_in_attach(monkeypatch):
    real = HookRegistry.register_hook

    def register(self, hook, name):
        real(self, hook, name)
        if name == GEOMETRY_HOOK:
            raise Boom("inside register_hook, after forward was wrapped")

    monkeypatch.setattr(HookRegistry, "register_hook", register)


def _fail_mid_swap(monkeypatch):
    """The second attention module refuses its new processor: the first one was already
    swapped and must be put back."""
    real = install_module.attention_modules

    class Refuses:
        processor = None

        def __setattr__(self, name, value):
            if isinstance(value, WanSparseAttnProcessor):
                raise Boom("processor swap refused")
            object.__setattr__(self, name, value)

    def modules(transformer, family=None):
        mods = real(transformer, family)
        return [mods[0], ("refuses", Refuses()), *mods[1:]]

    monkeypatch.setattr(install_module, "attention_modules", modules)


def _fail_in_processor(monkeypatch):
    real = WanSparseAttnProcessor.__init__

    def init(self, method, run, layer_index):
        if layer_index == 1:
            raise Boom("processor construction")
        real(self, method, run, layer_index)

    monkeypatch.setattr(WanSparseAttnProcessor, "__init__", init)


def _fail_making_handle(monkeypatch):
    def handle(*args, **kwargs):
        raise Boom("after every install")

    monkeypatch.setattr(gen.api, "SparseHandle", handle)


INJECTED = {
    "after_attach": _fail_after_attach,
    "in_attach": _fail_in_attach,
    "mid_swap": _fail_mid_swap,
    "in_processor": _fail_in_processor,
    "making_handle": _fail_making_handle,
}


@pytest.fixture(scope="module")
def wan():
    t, x = tiny_wan(), wan_inputs(frames=2, size=8, text=4)
    return t, x, _run(t, x)


@pytest.mark.parametrize("other_hook", [False, True], ids=["no_registry", "foreign_hook"])
@pytest.mark.parametrize("point", list(INJECTED))
def test_failed_install_leaves_transformer_as_found(wan, monkeypatch, point, other_hook):
    t, x, stock = wan
    if other_hook:
        HookRegistry.check_if_exists_or_initialize(t).register_hook(_OtherHook(), "other")
    try:
        before = _snapshot(t)
        with monkeypatch.context() as m:
            INJECTED[point](m)
            with pytest.raises(Boom):
                gen.sparsify(t, "dense")
        _assert_untouched(t, before)
        # nothing left behind: sparsify works again and restore is exact
        handle = gen.sparsify(t, "dense")
        torch.testing.assert_close(_run(t, x), stock, atol=1e-4, rtol=0)
        assert handle.summary()["transformers"][0]["sparse_calls"] > 0
        gen.restore(t)
        _assert_untouched(t, before)
        assert torch.equal(_run(t, x), stock)
    finally:
        if other_hook:
            t._diffusers_hook.remove_hook("other", recurse=False)
            del t._diffusers_hook
            t.__dict__.pop("forward", None)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method, overrides, message", [
    ("no-such-method", {}, "unknown attention method"),
    ("dense", {"no_such_option": 1}, "has no field"),
    ("mask", {}, "needs pattern"),
])
def test_bad_method_or_option_changes_nothing(family, method, overrides, message):
    make, inputs = FAMILIES[family]
    t, x = make(), inputs()
    stock = _run(t, x)
    before = _snapshot(t)
    with pytest.raises(ValueError, match=message):
        gen.sparsify(t, method, **overrides)
    _assert_untouched(t, before)
    with gen.sparse(t, "dense"):
        pass
    _assert_untouched(t, before)
    assert torch.equal(_run(t, x), stock)


def test_unsupported_family_changes_nothing():
    t, x = tiny_flux(), flux_inputs()
    stock = _run(t, x)
    before = _snapshot(t)
    with pytest.raises(ValueError, match="does not support flux"):
        gen.sparsify(t, "radial")
    _assert_untouched(t, before)
    # the install-level check too (a method instance built for another family)
    method = gen.attention.get_method("radial", family="wan")
    with pytest.raises(ValueError, match="does not support flux"):
        install_module.install(t, method)
    _assert_untouched(t, before)
    gen.restore(gen.sparsify(t, "dense").target)
    _assert_untouched(t, before)
    assert torch.equal(_run(t, x), stock)


def test_second_transformer_unsupported_undoes_the_first():
    """Two transformers where the method supports only the first one's family."""
    wan_t, flux_t = tiny_wan(), tiny_flux()
    pipe = types.SimpleNamespace(components={"transformer": wan_t, "transformer_2": flux_t})
    before = [_snapshot(wan_t), _snapshot(flux_t)]
    with pytest.raises(ValueError, match="does not support flux"):
        gen.sparsify(pipe, "radial")
    _assert_untouched(wan_t, before[0])
    _assert_untouched(flux_t, before[1])
    assert not hasattr(pipe, "_gen_sparse_handle")


def test_restore_detaches_a_hook_left_without_a_patch():
    t, x = tiny_wan(), wan_inputs(frames=2, size=8, text=4)
    stock = _run(t, x)
    attach_run_state(t, "wan")  # e.g. processors installed by hand, never undone
    with pytest.raises(ValueError, match="gen.restore"):
        gen.sparsify(t, "dense")
    assert t._diffusers_hook.get_hook(GEOMETRY_HOOK) is not None
    gen.restore(t)
    assert t._diffusers_hook.get_hook(GEOMETRY_HOOK) is None and "forward" not in t.__dict__
    with gen.sparse(t, "dense"):
        torch.testing.assert_close(_run(t, x), stock, atol=1e-4, rtol=0)
    assert torch.equal(_run(t, x), stock)


def test_transformer_patch_remove_twice_does_not_undo_a_later_install():
    t = tiny_wan()
    first = gen.sparsify(t, "dense")
    patch = first.patches[0]
    gen.restore(t)
    second = gen.sparsify(t, "dense")
    patch.remove()  # stale: must not touch the second install
    assert t._gen_sparse_patch is second.patches[0]
    assert all(isinstance(p, WanSparseAttnProcessor) for k, p in t.attn_processors.items() if ".attn1." in k)
    gen.restore(t)


# -- a pipeline with two transformers --------------------------------------------


def _pipe_run(pipe):
    out = pipe(prompt="a red ball", num_inference_steps=2, height=32, width=32, num_frames=5,
               guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.frames


def test_failure_on_second_transformer_of_a_pipeline():
    """Wan 2.2 style: ``transformer`` for the high-noise step, ``transformer_2`` for the
    low-noise one. Every failure leaves both as they were and the pipeline without a handle."""
    pipe = load("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    t2 = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in t2.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    pipe.register_modules(transformer_2=t2)
    pipe.register_to_config(boundary_ratio=0.8)  # timesteps 999 → transformer, 750 → transformer_2
    stock = _pipe_run(pipe)
    t1 = pipe.transformer
    before = [_snapshot(t1), _snapshot(t2)]

    def on_second(fail):
        real = install_module.install

        def install(transformer, method):
            if transformer is t2:
                with pytest.MonkeyPatch.context() as m:
                    fail(m)
                    return real(transformer, method)
            return real(transformer, method)

        return install

    def raising_install(transformer, method):
        if transformer is t2:
            raise Boom("install of the second transformer")
        return real_install(transformer, method)

    real_install = install_module.install
    failures = [lambda m: m.setattr(gen.api, "install", raising_install)]
    failures += [lambda m, f=f: m.setattr(gen.api, "install", on_second(f))
                 for name, f in INJECTED.items() if name != "making_handle"]
    failures.append(_fail_making_handle)
    for fail in failures:
        with pytest.MonkeyPatch.context() as m:
            fail(m)
            with pytest.raises(Boom):
                gen.sparsify(pipe, "dense")
        _assert_untouched(t1, before[0])
        _assert_untouched(t2, before[1])
        assert "_gen_sparse_handle" not in pipe.__dict__
    with pytest.raises(ValueError, match="has no field"):
        gen.sparsify(pipe, "dense", no_such_option=1)
    _assert_untouched(t1, before[0])
    _assert_untouched(t2, before[1])

    with gen.sparse(pipe, "dense") as handle:
        dense = _pipe_run(pipe)
        inside = handle.summary()
    assert [t["sparse_calls"] > 0 for t in inside["transformers"]] == [True, True]
    assert handle.summary() == inside
    assert abs(dense - stock).max() < 1e-4
    _assert_untouched(t1, before[0])
    _assert_untouched(t2, before[1])
    assert (_pipe_run(pipe) == stock).all(), "restore must give back the stock output bit for bit"


# -- statistics after the block ----------------------------------------------------


def test_summary_after_with_block_equals_summary_before_exit(wan):
    t, x, _ = wan
    with gen.sparse(t, "dense", dense_steps=1) as handle:
        _run(t, x)
        _run(t, {**x, "timestep": torch.full((1,), 400)})
        inside = handle.summary()
    after = handle.summary()
    assert after == inside
    assert after["transformers"][0]["sparse_calls"] > 0 and after["transformers"][0]["dense_calls"] > 0
    assert not handle.active and not hasattr(t, "_gen_sparse_patch")
    handle.restore()  # idempotent, keeps the statistics
    assert handle.summary() == inside
    with gen.sparse(t, "dense") as other:  # a later run has its own statistics
        pass
    assert other.summary()["transformers"][0]["sparse_calls"] == 0
    assert handle.summary() == inside


# -- gen.attention.get_method ------------------------------------------------------


def test_get_method_is_exported_from_gen_attention():
    from gen.attention import get_method
    from gen.attention.methods import get_method as registry_get_method

    assert get_method is registry_get_method and gen.attention.get_method is registry_get_method
    assert "get_method" in gen.attention.__all__
    assert get_method("dense").name == "dense"
    code = ("from gen.attention import get_method; import gen.attention.methods as m; "
            "assert get_method is m.get_method; print(get_method('radial').name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "radial", out.stderr


# -- BlockPlan size checks ---------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    ({"block_m": 0}, "block_m"),
    ({"block_n": -64}, "block_n"),
    ({"block_m": 64.0}, "block_m"),
    ({"block_n": True}, "block_n"),
    ({"q_len": 0}, "q_len"),
    ({"kv_len": 0}, "kv_len"),
    ({"q_len": "128"}, "q_len"),
])
@pytest.mark.parametrize("make", ["dense", "random"])
def test_plan_constructors_validate_sizes(make, kwargs, name):
    args = {"q_len": 128, "block_m": 64, "block_n": 64, **kwargs}
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        getattr(BlockPlan, make)(**args)


@pytest.mark.parametrize("kwargs, name", [({"batch": 0}, "batch"), ({"heads": -1}, "heads")])
def test_random_plan_validates_batch_and_heads(kwargs, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        BlockPlan.random(128, 128, 0.5, block_m=64, block_n=64, **kwargs)


def test_dense_with_block_m_zero_is_a_value_error():
    with pytest.raises(ValueError, match="block_m must be a positive int, got 0"):
        BlockPlan.dense(128, block_m=0)
