"""The Gradio demo, driven the way a script would: the app runs in-process on a free
localhost port with the tiny models and ``gradio_client`` calls its endpoints
(``/generate``, ``/compare``, ``/masks``, ``/cancel``). Plus the pieces it is built from:
PSNR/SSIM, the registry-driven parameter fields, and ``gen demo``."""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("gradio")
grc = pytest.importorskip("gradio_client")

from typer.testing import CliRunner  # noqa: E402

from gen.attention.methods import get_method, list_methods  # noqa: E402
from gen.demos import metrics  # noqa: E402
from gen.demos.params import field_key, form_values, method_fields, overrides_from  # noqa: E402

# gradio's queue calls pandas in a way pandas 3 deprecates; not ours to fix
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

SMALL_WAN = dict(model="tiny-wan", height=64, width=64, frames=5)  # 2x4x4 tokens: a quick run
SMALL_FLUX = dict(model="tiny-flux", height=128, width=128)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The app with a counting loader (real tiny pipelines) and a temporary outputs folder."""
    from gen.demos.app import create_app, launch
    from gen.pipelines import load

    loads: list[str] = []

    def loader(name):
        loads.append(name)
        return load(name)

    outputs = tmp_path_factory.mktemp("demo-outputs")
    app = create_app(loader=loader, outputs_dir=outputs, max_queue=4)
    port = _free_port()
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = grc.Client(f"http://127.0.0.1:{port}/", verbose=False)
        yield SimpleNamespace(app=app, client=client, outputs=Path(outputs), loads=loads,
                              url=f"http://127.0.0.1:{port}/")
    finally:
        app.close()


def _files(folder: Path, suffix: str) -> set[str]:
    return {p.name for p in folder.glob(f"*{suffix}")}


def test_generate_video_saves_unique_files_and_loads_once(demo):
    video, image, seed, report = demo.client.predict(prompt="a red ball", seed=7, **SMALL_WAN, api_name="/generate")
    assert image is None and seed == 7
    assert Path(video).suffix == ".mp4" and Path(video).stat().st_size > 0
    saved = _files(demo.outputs, ".mp4")
    assert Path(video).name in saved  # the file shown is the one kept in the outputs folder
    assert "density" in report and "1.000" in report and "ran dense" in report

    video2, _, _, _ = demo.client.predict(prompt="a red ball", seed=7, **SMALL_WAN, api_name="/generate")
    assert Path(video2).name != Path(video).name  # same request, new file: never one fixed name
    assert demo.loads.count("tiny-wan") == 1  # loaded once, reused


def test_generate_image_with_a_sparse_method_and_random_seed(demo):
    import imageio.v3 as iio

    video, image, seed, report = demo.client.predict(
        prompt="a cat", attention="mask", mask__pattern="spatial window ±2 tokens", mask__block_m=16,
        mask__block_n=16, randomize_seed=True, **SMALL_FLUX, api_name="/generate",
    )
    assert video is None and Path(image).suffix == ".png"
    assert iio.imread(image).shape == (128, 128, 3)
    assert isinstance(seed, int) and 0 <= seed < 2**31 and f"seed {seed}" in report
    assert "`mask`" in report and "spatial window ±2 tokens" in report
    assert "guidance 3.5" in report  # tiny-flux's default, not the form's start model's


def test_image_to_video_takes_an_uploaded_picture(demo, tmp_path):
    import imageio.v3 as iio

    picture = tmp_path / "first.png"
    iio.imwrite(picture, np.full((40, 56, 3), 200, np.uint8))  # any size: resized to the clip's
    with pytest.raises(grc.exceptions.AppError, match="upload one under 'Input image'"):
        demo.client.predict(model="tiny-wan-i2v", prompt="a boat", height=64, width=64, frames=5,
                            api_name="/generate")
    video, _, _, report = demo.client.predict(model="tiny-wan-i2v", prompt="a boat", height=64, width=64, frames=5,
                                              image=grc.handle_file(str(picture)), api_name="/generate")
    assert Path(video).suffix == ".mp4" and "tiny-wan-i2v" in report


def test_compare_same_seed_side_by_side(demo):
    base_video, meth_video, base_image, meth_image, report, numbers = demo.client.predict(
        prompt="a red ball", seed=3, attention="mask", mask__pattern="same frame", mask__block_m=16,
        mask__block_n=16, **SMALL_WAN, api_name="/compare",
    )
    assert base_image is None and meth_image is None
    assert Path(base_video).name != Path(meth_video).name
    assert numbers["baseline"] == "stock" and numbers["method"] == "mask" and numbers["seed"] == 3
    assert numbers["speedup"] > 0 and numbers["baseline_seconds"] > 0 and numbers["method_seconds"] > 0
    assert not numbers["identical"] and math.isfinite(numbers["psnr_db"]) and numbers["psnr_db"] > 10
    assert 0 < numbers["ssim"] < 1
    assert "0.500 at 2x4x4 video tokens" in report  # 2 frames of 16 tokens, each sees its own
    assert "Speedup" in report and "PSNR" in report and "SSIM" in report


def test_masks_picture_density_and_schedule(demo):
    image, report, numbers = demo.client.predict(
        model="tiny-wan", attention="mask", mask__pattern="frame window ±1", layer=1, head=1, step=1,
        api_name="/masks",
    )
    assert Path(image).read_bytes()[:4] == b"\x89PNG"
    # 5 latent frames of 64 tokens in 64-token blocks: 5 + 2*4 of 25 blocks
    assert numbers["video_density"] == pytest.approx(13 / 25) and numbers["blocks"] == [5, 5]
    assert numbers["heads"] == 2 and numbers["layers"] == 2 and not numbers["dense_reason"]
    assert "0.520" in report

    _, report, numbers = demo.client.predict(model="tiny-wan", attention="mask", mask__dense_steps=1, step=0,
                                             api_name="/masks")
    assert numbers["video_density"] == 1.0 and "dense_steps=1" in numbers["dense_reason"]

    # the slider's own bound is the page's default model's (shapes-wan: 4 layers); inside it,
    # the engine refuses a layer the chosen model lacks (tiny-wan has 2) in words
    with pytest.raises(grc.exceptions.AppError, match="greater than maximum value 3"):
        demo.client.predict(model="tiny-wan", attention="mask", layer=5, api_name="/masks")
    with pytest.raises(ValueError, match="layer must be between 0 and 1"):
        demo.app.gen_engine.mask("tiny-wan", "dense", layer=3)
    with pytest.raises(ValueError, match="step must be between 0 and 1"):
        demo.app.gen_engine.mask("tiny-wan", "dense", step=2)


def test_invalid_input_is_a_readable_error_and_the_app_keeps_serving(demo):
    with pytest.raises(grc.exceptions.AppError) as err:
        demo.client.predict(model="tiny-wan", prompt="a red ball", frames=10, api_name="/generate")
    assert "frames must be 4k+1 for Wan (got 10); try 9 or 13" in str(err.value)

    with pytest.raises(grc.exceptions.AppError, match="dense_layers"):
        demo.client.predict(prompt="x", dense__dense_layers="first two", **SMALL_WAN, api_name="/generate")

    video, _, _, _ = demo.client.predict(prompt="a red ball", frames=9, model="tiny-wan", height=64, width=64,
                                         api_name="/generate")
    assert Path(video).is_file()


def test_cancel_stops_the_run_and_saves_nothing(demo):
    before = _files(demo.outputs, ".png")
    job = demo.client.submit(prompt="a cat", steps=500, **SMALL_FLUX, api_name="/generate")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the denoising loop runs (tqdm -> progress)
        progress = job.status().progress_data
        if progress and progress[-1].length == 500 and (progress[-1].index or 0) >= 1:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the run never reported step progress")
    demo.client.predict(api_name="/cancel")
    with pytest.raises(grc.exceptions.AppError, match=r"Cancelled after step \d+ of 500"):
        job.result(timeout=60)
    assert _files(demo.outputs, ".png") == before


def test_serves_only_its_outputs_folder_on_localhost(demo):
    import httpx

    assert demo.app.allowed_paths == [str(demo.outputs)] and demo.app.share is False
    assert demo.app.server_name == "127.0.0.1"
    inside = next(demo.outputs.glob("*.mp4"))
    assert httpx.get(f"{demo.url}gradio_api/file={inside}").status_code == 200
    outside = Path(__file__).resolve()
    assert httpx.get(f"{demo.url}gradio_api/file={outside}").status_code in (403, 404)


def test_every_registered_method_has_api_parameters(demo):
    info = demo.client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for endpoint in ("/generate", "/compare", "/masks"):
        names = {p["parameter_name"] for p in info[endpoint]["parameters"]}
        for method in list_methods():
            assert {f.key for f in method_fields(method)} <= names, (endpoint, method)
    assert {"model", "attention", "prompt", "seed", "randomize_seed", "steps", "guidance", "height", "width",
            "frames", "image", "negative_prompt"} <= {p["parameter_name"] for p in info["/generate"]["parameters"]}


# -- pieces, no server -------------------------------------------------------------------


@pytest.mark.parametrize("method", list_methods())
@pytest.mark.parametrize("model,family", [("tiny-wan", "wan"), ("tiny-flux", "flux")])
def test_form_values_round_trip_to_the_preset_config(method, model, family):
    from gen.attention.methods import method_class

    if family not in method_class(method).families:
        pytest.skip(f"{method} does not support {family}")
    filled = overrides_from(method, form_values(method, model, family), model=model, family=family)
    empty = overrides_from(method, {}, model=model, family=family)  # empty fields = the preset
    try:
        from_form = get_method(method, model=model, family=family, **filled).config
        from_preset = get_method(method, model=model, family=family, **empty).config
    except ValueError as err:  # a method that needs more than its preset to be built
        pytest.skip(f"{method} cannot be built from its preset alone: {err}")
    for f in method_fields(method):
        assert getattr(from_form, f.name) == getattr(from_preset, f.name), f.name


def test_field_keys_and_bad_values():
    assert field_key("sparse-vdit", "dense_steps") == "sparse_vdit__dense_steps"
    with pytest.raises(ValueError, match="whole number"):
        overrides_from("mask", {"mask__block_m": 2.5}, model="tiny-wan", family="wan")
    with pytest.raises(ValueError, match="named patterns"):
        overrides_from("mask", {"mask__pattern": "spiral"}, model="tiny-wan", family="wan")
    got = overrides_from("dense", {"dense__dense_layers": "0,1", "dense__backend": "auto"}, model="tiny-wan",
                         family="wan")
    assert got == {"dense_layers": (0, 1), "backend": None}


def _ssim_direct(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM with an explicit 11x11 Gaussian window per position (no separable filter)."""
    x, y = (np.asarray(v, np.float64) for v in (a, b))
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(3):
        px = np.lib.stride_tricks.sliding_window_view(x[..., ch], (11, 11))
        py = np.lib.stride_tricks.sliding_window_view(y[..., ch], (11, 11))
        mx, my = (px * w).sum((-1, -2)), (py * w).sum((-1, -2))
        vx = (px * px * w).sum((-1, -2)) - mx**2
        vy = (py * py * w).sum((-1, -2)) - my**2
        cxy = (px * py * w).sum((-1, -2)) - mx * my
        vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_psnr_and_ssim(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (2, 24, 20, 3), dtype=np.uint8)
    assert metrics.psnr(a, a) == math.inf and metrics.ssim(a, a) == pytest.approx(1.0)
    b = a.copy()
    b[0, 0, 0, 0] ^= 0x10  # one value off by 16
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / (16**2 / a.size)))
    c = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    for fa, fc in zip(a, c):
        assert metrics.ssim(fa, fc) == pytest.approx(_ssim_direct(fa, fc), rel=1e-9)
    noise = rng.integers(0, 256, a.shape, dtype=np.uint8)
    assert metrics.ssim(a, noise) < 0.1 < metrics.ssim(a, c) < 1.0
    with pytest.raises(ValueError, match="shapes"):
        metrics.psnr(a, a[:1])


def test_gen_demo_command_passes_its_options(monkeypatch, tmp_path):
    import gen.demos.app
    from gen.cli import app

    seen = {}
    monkeypatch.setattr(gen.demos.app, "serve", lambda **kw: seen.update(kw))
    res = CliRunner().invoke(app, ["demo", "--port", "7999", "--outputs", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen == dict(host="127.0.0.1", port=7999, share=False, outputs_dir=tmp_path.resolve(), device=None,
                        max_upload_mb=20.0)
