"""FLUX inputs beyond the plain text-to-image call (fp32, CPU, tiny offline models).

* ``img_ids`` that are not a 0-based grid: random floats (diffusers' own test inputs)
  run stock dense attention with one warning; FLUX Kontext ids (target grid plus a
  reference image with ``ids[:, 0] = 1``, same or other size) run the method on the
  target grid with the reference tokens dense, next to the text.
* a tiny ``FluxKontextPipeline`` from a checkpoint the test saves renders under every
  method that supports FLUX.
* IP-Adapter weights loaded before or after ``gen.sparsify``: the joint attention goes
  through the method, the image-prompt branch stays stock; ``restore`` keeps the adapter.
* the ids are read once per ids tensor, and the geometry survives ``torch.compile``.

Stock diffusers output is the reference throughout.
"""

import importlib
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxIPAdapterAttnProcessor,
)

import gen
from gen.attention.methods.registry import get_method, list_methods
from gen.attention.processors import (
    FluxSparseAttnProcessor,
    FluxSparseIPAdapterAttnProcessor,
    read_flux_img_ids,
)
from gen.attention.processors.runtime import GEOMETRY_HOOK

from tiny_transformers import flux_inputs, tiny_flux

runtime = importlib.import_module("gen.attention.processors.runtime")
flux_adapter = importlib.import_module("gen.attention.processors.flux")
install_module = importlib.import_module("gen.attention.processors.install")

H, W, TEXT = 4, 6, 5
ALL = lambda qt, qh, qw, kt, kh, kw: torch.ones((), dtype=torch.bool)


def _grid_ids(h, w, first=0.0, row0=0, col0=0):
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = first
    ids[..., 1] = row0 + torch.arange(h)[:, None]
    ids[..., 2] = col0 + torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def _kontext_inputs(ref=(H, W), batch=1, seed=1):
    """Kontext's transformer call: target tokens then reference tokens (``ids[:, 0] = 1``)."""
    x = flux_inputs(batch=batch, h=H, w=W, text=TEXT, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    n_ref = ref[0] * ref[1]
    x["hidden_states"] = torch.cat([x["hidden_states"], torch.randn(batch, n_ref, 4, generator=g)], dim=1)
    x["img_ids"] = torch.cat([_grid_ids(H, W), _grid_ids(*ref, first=1.0)])
    return x


def _run(t, x, **extra):
    with torch.no_grad():
        return t(**x, **extra)[0]


def _summary(handle):
    return handle.summary()["transformers"][0]


# -- reading the ids -------------------------------------------------------------------


def test_read_flux_img_ids():
    plain = read_flux_img_ids(_grid_ids(H, W))
    assert (plain.grid, plain.n_extra, plain.order) == ((H, W), 0, None)
    assert plain.layout(TEXT) == gen.attention.TokenLayout(1, H, W, text_len=TEXT, text_first=True)
    assert plain.sequence_order(TEXT, torch.device("cpu")) is None

    # Kontext: reference tokens (first axis 1) go first, as extra dense tokens
    kontext = read_flux_img_ids(torch.cat([_grid_ids(H, W), _grid_ids(3, 5, first=1.0)]))
    n = H * W
    assert (kontext.grid, kontext.n_extra) == ((H, W), 15)
    assert kontext.order.tolist() == list(range(n, n + 15)) + list(range(n))
    assert kontext.layout(TEXT) == gen.attention.TokenLayout(1, H, W, text_len=TEXT + 15, text_first=True)
    fwd, inv = kontext.sequence_order(TEXT, torch.device("cpu"))
    assert fwd.tolist() == list(range(TEXT)) + [TEXT + i for i in kontext.order.tolist()]
    assert torch.equal(fwd[inv], torch.arange(TEXT + n + 15))
    assert kontext.sequence_order(TEXT, torch.device("cpu"))[0] is fwd  # built once

    # offsets, a transposed token order and the deprecated (B, N, 3) form are still a grid
    shifted = read_flux_img_ids(_grid_ids(H, W, row0=7, col0=3))
    assert (shifted.grid, shifted.order) == ((H, W), None)
    cols_first = _grid_ids(H, W).reshape(H, W, 3).transpose(0, 1).reshape(-1, 3)
    transposed = read_flux_img_ids(cols_first[None].expand(2, -1, -1))
    assert transposed.grid == (H, W)
    assert torch.equal(cols_first[transposed.order], _grid_ids(H, W))

    # not a grid: random floats, duplicate positions, a grid with a hole
    for ids, why in [
        (torch.randn(H * W, 3), "not integer grid positions"),
        (torch.cat([_grid_ids(2, 2), _grid_ids(2, 2)]), "not a full grid"),
        (_grid_ids(H, W)[1:], "not a full grid"),
        (torch.zeros(H * W, 2), "not (N, 3) positions"),
    ]:
        found = read_flux_img_ids(ids)
        assert found.grid is None and found.layout(TEXT) is None and why in found.reason


# -- dense equals stock, methods under Kontext ids ---------------------------------------


def test_random_float_ids_run_dense_with_one_warning(caplog):
    t = tiny_flux()
    calls = [dict(flux_inputs(h=H, w=W, text=TEXT), img_ids=torch.randn(H * W, 3)) for _ in range(2)]
    stock = [_run(t, x) for x in calls]
    with caplog.at_level(logging.WARNING, logger="gen.attention"), gen.sparse(t, "gna", window=(3, 3), stride=1) as h:
        outs = [_run(t, x) for x in calls]
        s = _summary(h)
    for out, ref in zip(outs, stock):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert s["sparse_calls"] == 0 and s["fallback_calls"] == 2 * 2
    assert s["fallback_reasons"] == ["img_ids are not integer grid positions"]
    warnings = [r for r in caplog.records if "not integer grid positions" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("ref", [(H, W), (3, 5)], ids=["same_size", "other_size"])
def test_dense_with_kontext_ids_matches_stock(ref):
    t = tiny_flux()
    x = _kontext_inputs(ref)
    stock = _run(t, x)
    with gen.sparse(t, "dense") as h:
        out = _run(t, x)
        s = _summary(h)
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=0)
    assert s["sparse_calls"] == 2 and s["fallback_calls"] == 0
    assert list(s["density"]) == [str(gen.attention.TokenLayout(1, H, W, TEXT + ref[0] * ref[1], True))]


@pytest.mark.parametrize("method, config", [
    ("mask", {"pattern": ALL, "block_m": 16, "block_n": 16}),
    ("gna", {"window": -1, "stride": 1, "tile": (2, 2)}),
    ("rectified", {"p": 1.0, "block_size": 16, "dense_layers": 0}),
])
def test_all_keep_configurations_under_kontext_ids_match_stock(method, config):
    t = tiny_flux()
    x = _kontext_inputs((3, 5), batch=2)
    stock = _run(t, x)
    with gen.sparse(t, method, **config) as h:
        out = _run(t, x)
        assert _summary(h)["sparse_calls"] == 2
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=0)
    assert torch.equal(_run(t, x), stock)


class _MaskedReference(FluxSparseAttnProcessor):
    """Stock FLUX math with a boolean ``(H|1, S, S)`` mask over the joint sequence."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def _attend(self, query, key, value, attn_mask=None, kv_valid=None):
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=self.mask)
        return out.transpose(1, 2)


def test_sparse_method_under_kontext_ids_is_its_mask_on_the_target_grid():
    """GNA on the target grid, reference and text dense: equal to stock FLUX with the
    method's token mask (in its order text, reference, target) put back in sequence order."""
    t = tiny_flux()
    ref = (3, 5)
    x = _kontext_inputs(ref)
    stock = _run(t, x)
    with gen.sparse(t, "gna", window=(3, 3), stride=1, tile=(2, 2)) as h:
        out = _run(t, x)
        layout = next(iter(h.patches[0].run.stats.layouts))
        mask = h.method.token_mask(layout, 2)
    n, m = H * W, ref[0] * ref[1]
    assert layout.text_len == TEXT + m and 0.1 < mask.float().mean() < 0.95
    # method order -> sequence order [text, target, reference], written out by hand
    method_order = torch.tensor(list(range(TEXT)) + list(range(TEXT + n, TEXT + n + m)) + list(range(TEXT, TEXT + n)))
    where = torch.argsort(method_order)  # sequence position -> method position
    seq_mask = mask[:, where][:, :, where]
    t.set_attn_processor(_MaskedReference(seq_mask))
    expected = _run(t, x)
    t.set_attn_processor(FluxAttnProcessor())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert (out - stock).abs().max() > 1e-3  # the pattern really ran


def test_ids_are_read_once_per_tensor(monkeypatch):
    reads = []
    real = flux_adapter.read_flux_img_ids
    monkeypatch.setattr(flux_adapter, "read_flux_img_ids", lambda ids: reads.append(1) or real(ids))
    t = tiny_flux()
    x = _kontext_inputs()
    with gen.sparse(t, "dense"):
        for _ in range(3):
            _run(t, x)
        assert len(reads) == 1  # two attention layers, three calls: one read
        x["img_ids"].add_(0)  # changed in place: read again
        _run(t, x)
        assert len(reads) == 2
        _run(t, dict(x, img_ids=x["img_ids"].clone()))  # another tensor
        assert len(reads) == 3


def test_compiled_kontext_call_keeps_the_eager_geometry():
    """Inside torch.compile(fullgraph=True) the hook cannot read the ids; it takes the
    geometry an eager call found for ids of that shape: one graph, no recompile."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    t = tiny_flux()
    x = _kontext_inputs((3, 5))
    torch._dynamo.reset()
    counters.clear()
    with gen.sparse(t, "gna", window=(3, 3), stride=1, tile=(2, 2)) as h:
        eager = [_run(t, dict(x, timestep=torch.tensor([ts]))) for ts in (0.9, 0.6)]
        compiled = torch.compile(t, fullgraph=True, backend="eager")
        with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
            outs = [compiled(**dict(x, timestep=torch.tensor([ts])))[0] for ts in (0.9, 0.6)]
        assert _summary(h)["fallback_calls"] == 0
    assert counters["stats"]["unique_graphs"] == 1
    for out, ref in zip(outs, eager):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch._dynamo.reset()


# -- FluxKontextPipeline ---------------------------------------------------------------


@pytest.fixture(scope="module")
def kontext_pipe(tmp_path_factory):
    """``FluxKontextPipeline.from_pretrained`` on a tiny FLUX checkpoint saved here."""
    from diffusers import FluxKontextPipeline

    from gen.pipelines.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-flux-kontext")
    build_tiny_pipeline("tiny-flux").save_pretrained(folder)
    pipe = FluxKontextPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kontext_render(pipe, width=64):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, width, 3), dtype=np.uint8))
    out = pipe(image=image, prompt="make the ball red", height=64, width=64, max_area=64 * 64, _auto_resize=False,
               num_inference_steps=2, guidance_scale=2.5, max_sequence_length=32,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return np.asarray(out.images)


@pytest.fixture(scope="module")
def kontext_stock(kontext_pipe):
    return _kontext_render(kontext_pipe)


FLUX_METHODS = []
for _name in list_methods():
    _config = {"pattern": ALL} if _name == "mask" else {}
    try:
        get_method(_name, family="flux", **_config)
    except ValueError as exc:
        if "does not support flux" not in str(exc):
            raise
        continue
    FLUX_METHODS.append((_name, _config))


def test_flux_methods_are_found():
    assert {"dense", "gna", "rectified"} <= {name for name, _ in FLUX_METHODS}


@pytest.mark.parametrize("name, config", FLUX_METHODS, ids=[name for name, _ in FLUX_METHODS])
def test_kontext_pipeline_renders_under_every_flux_method(kontext_pipe, kontext_stock, name, config):
    stock = kontext_stock
    with gen.sparse(kontext_pipe, name, **config) as h:
        out = _kontext_render(kontext_pipe)
        s = _summary(h)
    assert out.shape == stock.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert s["sparse_calls"] + s["dense_calls"] == 2 * 2 and s["fallback_calls"] == 0
    # 4x4 target tokens; the 4x4 reference counts as text (32 prompt tokens)
    assert list(s["density"]) == [str(gen.attention.TokenLayout(1, 4, 4, 32 + 16, True))]
    if name in ("dense", "mask"):
        np.testing.assert_allclose(out, stock, atol=1e-4, rtol=0)
    assert np.array_equal(_kontext_render(kontext_pipe), stock)


def test_kontext_pipeline_with_a_reference_of_another_size(kontext_pipe):
    stock = _kontext_render(kontext_pipe, width=96)
    with gen.sparse(kontext_pipe, "dense") as h:
        out = _kontext_render(kontext_pipe, width=96)
        s = _summary(h)
    np.testing.assert_allclose(out, stock, atol=1e-4, rtol=0)
    assert list(s["density"]) == [str(gen.attention.TokenLayout(1, 4, 4, 32 + 4 * 6, True))]


# -- IP-Adapter ----------------------------------------------------------------------


def _ip_adapter_state(t, seed=0, image_dim=16):
    """Random weights in the layout ``_load_ip_adapter_weights`` reads: per dual block
    ``{i}.to_k_ip`` / ``{i}.to_v_ip`` (joint_attention_dim -> inner_dim), and an
    ``ImageProjection`` (``proj``: image_dim -> 4 tokens x joint_attention_dim, ``norm``)."""
    g = torch.Generator().manual_seed(seed)
    inner, dim = t.inner_dim, t.config.joint_attention_dim
    ip = {}
    for i in range(len(t.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            ip[f"{i}.{name}.weight"] = 0.2 * torch.randn(inner, dim, generator=g)
            ip[f"{i}.{name}.bias"] = 0.1 * torch.randn(inner, generator=g)
    proj = {"proj.weight": 0.2 * torch.randn(4 * dim, image_dim, generator=g),
            "proj.bias": 0.1 * torch.randn(4 * dim, generator=g),
            "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
    return {"image_proj": proj, "ip_adapter": ip}


def _load_ip_adapter(t):
    t._load_ip_adapter_weights(_ip_adapter_state(t), low_cpu_mem_usage=False)


def _ip_run(t, x, embeds):
    # the transformer pops ip_adapter_image_embeds from the dict: a new one per call
    return _run(t, x, joint_attention_kwargs={"ip_adapter_image_embeds": [embeds]})


@pytest.fixture(scope="module")
def ip_stock():
    """Stock FLUX with the adapter loaded: inputs, image embeddings and outputs."""
    t = tiny_flux()
    _load_ip_adapter(t)
    x = _kontext_inputs()
    embeds = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(5))
    out = _ip_run(t, x, embeds)
    assert (out - _run(tiny_flux(), x)).abs().max() > 1e-2  # the adapter matters
    return x, embeds, out, sorted(t.state_dict())


def _sparsified_with_ip(order, method="dense", **config):
    t = tiny_flux()
    if order == "ip_first":
        _load_ip_adapter(t)
        before = dict(t.attn_processors)
        handle = gen.sparsify(t, method, **config)
    else:
        handle = gen.sparsify(t, method, **config)
        before = None
        _load_ip_adapter(t)
    return t, handle, before


@pytest.mark.parametrize("order", ["ip_first", "sparsify_first"])
def test_ip_adapter_in_either_order_matches_stock_under_dense(ip_stock, order):
    x, embeds, stock, keys = ip_stock
    t, handle, before = _sparsified_with_ip(order)
    out = _ip_run(t, x, embeds)
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=0)
    procs = list(t.attn_processors.values())
    assert type(procs[0]) is FluxSparseIPAdapterAttnProcessor and type(procs[1]) is FluxSparseAttnProcessor
    assert isinstance(procs[0], FluxIPAdapterAttnProcessor)  # diffusers' checks still see an adapter
    assert sorted(t.state_dict()) == keys  # the adapter's weights under their own names
    assert _summary(handle)["sparse_calls"] == 2
    gen.restore(t)
    restored = t.attn_processors
    assert type(restored["transformer_blocks.0.attn.processor"]) is FluxIPAdapterAttnProcessor
    assert type(restored["single_transformer_blocks.0.attn.processor"]) is FluxAttnProcessor
    if before is not None:
        assert all(restored[k] is p for k, p in before.items())
    assert sorted(t.state_dict()) == keys
    assert torch.equal(_ip_run(t, x, embeds), stock)


def test_ip_adapter_order_does_not_change_a_sparse_run(ip_stock):
    x, embeds, stock, _ = ip_stock
    outs = []
    for order in ("ip_first", "sparsify_first"):
        t, handle, _ = _sparsified_with_ip(order, "gna", window=(3, 3), stride=1, tile=(2, 2))
        outs.append(_ip_run(t, x, embeds))
        assert _summary(handle)["sparse_calls"] == 2
        handle.restore()
    assert torch.equal(outs[0], outs[1])
    assert (outs[0] - stock).abs().max() > 1e-3


def test_ip_adapter_scale_and_unload_while_sparsified(ip_stock):
    x, embeds, _, _ = ip_stock
    stock = tiny_flux()
    _load_ip_adapter(stock)
    t, handle, _ = _sparsified_with_ip("sparsify_first")
    for model in (stock, t):  # what pipe.set_ip_adapter_scale(0.3) does
        next(iter(model.attn_processors.values())).scale = [0.3]
    torch.testing.assert_close(_ip_run(t, x, embeds), _ip_run(stock, x, embeds), atol=1e-5, rtol=0)
    # what pipe.unload_ip_adapter() does to the transformer: the next call adopts the
    # new stock processors
    t.encoder_hid_proj = None
    t.set_attn_processor({k: FluxAttnProcessor() if isinstance(p, FluxIPAdapterAttnProcessor) else type(p)()
                          for k, p in t.attn_processors.items()})
    plain = _run(tiny_flux(), x)
    torch.testing.assert_close(_run(t, x), plain, atol=1e-5, rtol=0)
    assert {type(p) for p in t.attn_processors.values()} == {FluxSparseAttnProcessor}
    handle.restore()
    assert {type(p) for p in t.attn_processors.values()} == {FluxAttnProcessor}
    assert torch.equal(_run(t, x), plain)


def test_failed_sparsify_with_ip_adapter_leaves_no_hook(ip_stock, monkeypatch):
    """The install fails after the adapter's module processor was swapped: the adapter's
    processor is back (as a submodule), no hook, no registry, nothing of gen's."""
    x, embeds, stock, keys = ip_stock
    t = tiny_flux()
    _load_ip_adapter(t)
    before = dict(t.attn_processors)
    real = install_module._set_processor
    calls = []

    def fail_second(module, processor):
        calls.append(processor)
        if len(calls) == 2:
            raise RuntimeError("boom")
        real(module, processor)

    monkeypatch.setattr(install_module, "_set_processor", fail_second)
    with pytest.raises(RuntimeError, match="boom"):
        gen.sparsify(t, "dense")
    monkeypatch.undo()
    assert all(t.attn_processors[k] is p for k, p in before.items())
    assert t.transformer_blocks[0].attn._modules["processor"] is before["transformer_blocks.0.attn.processor"]
    assert "_diffusers_hook" not in t.__dict__ and "forward" not in t.__dict__
    assert not any(k.startswith("_gen_sparse") for k in t.__dict__)
    assert sorted(t.state_dict()) == keys
    assert torch.equal(_ip_run(t, x, embeds), stock)
    with gen.sparse(t, "dense"):
        assert t._diffusers_hook.get_hook(GEOMETRY_HOOK) is not None
        torch.testing.assert_close(_ip_run(t, x, embeds), stock, atol=1e-5, rtol=0)
    assert "_diffusers_hook" not in t.__dict__
