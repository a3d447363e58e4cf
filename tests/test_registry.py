"""Model registry: names, geometry rules, offline loading and its errors.

Offline throughout (HF_HUB_OFFLINE=1); the gen and Hugging Face caches are temp dirs.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from gen.pipelines import (  # noqa: E402
    MODELS,
    ModelNotAvailableError,
    ModelSpec,
    build_tiny_pipeline,
    check_geometry,
    get_spec,
    list_models,
    load,
)
from gen.pipelines.registry import hf_cache_dir  # noqa: E402

REAL = {
    "wan2.1-t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "wan2.1-t2v-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "wan2.1-i2v-14b-480p": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    "wan2.1-i2v-14b-720p": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
    "hunyuanvideo": "hunyuanvideo-community/HunyuanVideo",
    "flux.1-dev": "black-forest-labs/FLUX.1-dev",
    "flux.1-schnell": "black-forest-labs/FLUX.1-schnell",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread for the tiny runs (see test_pipelines_tiny.py), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty gen and Hugging Face caches under tmp_path; returns the HF hub cache dir."""
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GEN_CACHE_DIR", str(tmp_path / "gen"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return hub


@pytest.fixture(scope="module")
def tiny_wan_folder(tmp_path_factory):
    """A tiny Wan pipeline saved with save_pretrained (a stand-in for a real download)."""
    folder = tmp_path_factory.mktemp("tiny-wan-saved")
    build_tiny_pipeline("tiny-wan").save_pretrained(folder)
    return folder


def _fake_hub_snapshot(hub, repo_id, source, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay out ``source`` as the cached snapshot of ``repo_id``, as huggingface_hub does."""
    repo_dir = hub / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    shutil.copytree(source, snapshot)
    return snapshot


def _wan_video(pipe):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="a red ball",
        height=64,
        width=64,
        num_frames=5,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.frames


# -- names and specs --------------------------------------------------------------------------


def test_models_hold_the_tiny_and_real_entries():
    tiny = [name for name, spec in MODELS.items() if spec.is_tiny]
    assert tiny == ["tiny-wan", "tiny-wan-i2v", "tiny-hunyuan", "tiny-flux"]
    bundled = [name for name, spec in MODELS.items() if spec.is_bundled]
    assert bundled == ["shapes-wan", "shapes-wan-causal"]
    assert all(MODELS[n].is_local and not MODELS[n].is_tiny and MODELS[n].repo_id is None for n in bundled)
    assert {name: spec.repo_id for name, spec in MODELS.items() if spec.repo_id} == REAL
    for name, spec in MODELS.items():
        assert isinstance(spec, ModelSpec) and spec.name == name
        assert spec.family in ("wan", "hunyuan", "flux") and spec.task in ("t2v", "i2v", "t2i")
        check_geometry(spec, spec.height, spec.width, spec.frames)  # defaults are valid
        assert (spec.frames == 1) == (spec.task == "t2i")
    wan = MODELS["wan2.1-t2v-1.3b"]
    assert (wan.height, wan.width, wan.frames, wan.steps, wan.guidance, wan.fps) == (480, 832, 81, 50, 5.0, 16)
    assert MODELS["wan2.1-t2v-14b"].height == 720 and MODELS["wan2.1-t2v-14b"].width == 1280
    hy = MODELS["hunyuanvideo"]
    assert (hy.height, hy.width, hy.frames, hy.steps, hy.fps, hy.guidance) == (720, 1280, 129, 50, 24, 6.0)
    assert hy.guidance_embedded
    assert (MODELS["flux.1-dev"].steps, MODELS["flux.1-dev"].guidance) == (28, 3.5)
    assert (MODELS["flux.1-schnell"].steps, MODELS["flux.1-schnell"].guidance) == (4, 0.0)
    with pytest.raises(AttributeError):
        wan.steps = 10  # frozen


def test_token_grid_matches_the_known_latent_sizes():
    # Wan 480x832x81: latent 21x60x104, patchified 21x30x52 = 32,760 tokens.
    assert MODELS["wan2.1-t2v-1.3b"].token_grid() == (21, 30, 52)
    assert MODELS["hunyuanvideo"].token_grid() == (33, 45, 80)
    assert MODELS["flux.1-dev"].token_grid() == (1, 64, 64)


def test_unknown_name_lists_valid_names_and_suggests():
    with pytest.raises(ValueError) as err:
        get_spec("wan2.1-t2v-1.3")
    msg = str(err.value)
    assert "Did you mean 'wan2.1-t2v-1.3b'" in msg
    assert all(name in msg for name in MODELS)
    with pytest.raises(ValueError, match="Valid names: tiny-wan"):
        get_spec("stable-diffusion")
    assert get_spec(" Tiny-Wan ") is MODELS["tiny-wan"]


# -- geometry -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, size, expected",
    [
        ("tiny-wan", (128, 128, 10), "frames must be 4k+1 for Wan (got 10); try 9 or 13"),
        ("hunyuanvideo", (720, 1280, 128), "frames must be 4k+1 for HunyuanVideo (got 128); try 125 or 129"),
        ("wan2.1-t2v-1.3b", (100, 832, 81), "height must be a positive multiple of 16 pixels for Wan (got 100); try 96 or 112"),
        ("flux.1-dev", (1024, 1000, 1), "width must be a positive multiple of 16 pixels for FLUX (got 1000); try 992 or 1008"),
        ("flux.1-dev", (1024, 1024, 5), "frames must be 1 (got 5)"),
        ("tiny-wan", (8, 64, 0), "height must be a positive multiple of 16 pixels for Wan (got 8); try 16"),
    ],
)  # fmt: skip
def test_check_geometry_says_what_fits(name, size, expected):
    with pytest.raises(ValueError) as err:
        check_geometry(name, *size)
    assert expected in str(err.value)


def test_check_geometry_reports_every_problem_and_accepts_valid_sizes():
    with pytest.raises(ValueError) as err:
        check_geometry("wan2.1-t2v-1.3b", 481, 833, 80)
    msg = str(err.value)
    assert "height" in msg and "width" in msg and "frames" in msg
    for frames in (1, 5, 9, 81):
        check_geometry("wan2.1-t2v-1.3b", 480, 832, frames)
    check_geometry("flux.1-schnell", 512, 768, 1)


# -- loading --------------------------------------------------------------------------------------


def test_missing_real_weights_raise_a_clear_error(caches):
    assert hf_cache_dir() == caches
    with pytest.raises(ModelNotAvailableError) as err:
        load("wan2.1-t2v-1.3b")
    msg = str(err.value)
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in msg
    assert "--model-path" in msg and "download" in msg and str(caches) in msg
    assert isinstance(err.value, ValueError)
    rows = {spec.name: (ok, where) for spec, ok, where in list_models()}
    assert all(rows[name][0] for name in ("tiny-wan", "tiny-wan-i2v", "tiny-hunyuan", "tiny-flux"))
    assert not any(rows[name][0] for name in REAL)


def test_model_path_loads_through_the_real_path(caches, tiny_wan_folder):
    pipe = load("wan2.1-t2v-1.3b", model_path=tiny_wan_folder, dtype=torch.float32)
    assert type(pipe).__name__ == "WanPipeline"
    assert pipe.transformer.dtype == torch.float32
    np.testing.assert_array_equal(_wan_video(pipe), _wan_video(build_tiny_pipeline("tiny-wan")))


def test_real_dtype_keeps_the_wan_vae_in_float32(caches, tiny_wan_folder):
    pipe = load("wan2.1-t2v-1.3b", model_path=tiny_wan_folder)  # spec dtype: bfloat16
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32


def test_weights_in_the_hf_cache_load_offline(caches, tiny_wan_folder):
    snapshot = _fake_hub_snapshot(caches, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", tiny_wan_folder)
    rows = {spec.name: (ok, where) for spec, ok, where in list_models()}
    assert rows["wan2.1-t2v-1.3b"] == (True, str(snapshot))
    pipe = load("wan2.1-t2v-1.3b", dtype="float32")
    assert type(pipe).__name__ == "WanPipeline"
    assert os.path.samefile(pipe.config._name_or_path, snapshot)
    # An interrupted download: the transformer weights are gone.
    for f in (snapshot / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelNotAvailableError, match="incomplete .*transformer/ weights"):
        load("wan2.1-t2v-1.3b")
    rows = {spec.name: (ok, where) for spec, ok, where in list_models()}
    assert rows["wan2.1-t2v-1.3b"][0] is False and "incomplete" in rows["wan2.1-t2v-1.3b"][1]


def test_model_path_without_model_index_is_a_clear_error(caches, tmp_path, tiny_wan_folder):
    empty = tmp_path / "not-a-pipeline"
    empty.mkdir()
    with pytest.raises(ModelNotAvailableError, match="no model_index.json"):
        load("wan2.1-t2v-1.3b", model_path=empty)
    with pytest.raises(ModelNotAvailableError, match="is not a folder"):
        load("wan2.1-t2v-1.3b", model_path=tmp_path / "missing")
    with pytest.raises(ModelNotAvailableError, match="holds a WanPipeline but flux.1-dev needs a FluxPipeline"):
        load("flux.1-dev", model_path=tiny_wan_folder)


def test_broken_model_path_is_reported_without_a_deep_traceback(caches, tmp_path, tiny_wan_folder):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_wan_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelNotAvailableError) as err:
        load("wan2.1-t2v-1.3b", model_path=broken, dtype=torch.float32)
    assert "missing: vae/" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_tiny_cache_is_rebuilt_when_stale(caches):
    from gen.pipelines.registry import tiny_cache_folder

    load("tiny-flux")
    folder = tiny_cache_folder("tiny-flux")
    assert folder.is_relative_to(caches.parent.parent / "gen")
    (folder / "gen_tiny.json").write_text('{"fingerprint": "old"}')
    load("tiny-flux")
    assert '"old"' not in (folder / "gen_tiny.json").read_text()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny-flux-v1"]


def test_unknown_dtype_is_rejected(caches):
    with pytest.raises(ValueError, match="Unknown dtype 'float8'"):
        load("tiny-flux", dtype="float8")
