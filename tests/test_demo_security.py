"""The demo serves files to whoever reaches it, so: no request may make it read a file on
the server that was not uploaded to it (through ``gradio_client`` or raw HTTP, in the
image field or any other), no error message carries a server path, uploads are capped,
and the outputs folder it serves is never the filesystem root, a system folder, the home
folder, a repository root or a folder holding other files (``gen demo`` and
``create_app``)."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("gradio")
grc = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")

from test_demo import _free_port  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from gen.demos.paths import MARKER, check_outputs_dir, prepare_outputs_dir  # noqa: E402

pytestmark = [  # gradio's queue vs pandas 3, as in test_demo.py
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

I2V = dict(model="tiny-wan-i2v", prompt="a boat", height=64, width=64, frames=5, steps=1)  # a quick run
CAP_MB = 0.05  # a small upload cap, so the test of it sends 60 KB
UPLOAD_ONLY = "must be uploaded through the demo"
REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, value: int = 200) -> Path:
    import imageio.v3 as iio

    iio.imwrite(path, np.full((40, 56, 3), value, np.uint8))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The app (real tiny pipelines, a small upload cap) and secret files on the server,
    outside its outputs folder: a PNG (which the pipeline would take) and a text file."""
    from gen.demos.app import _upload_folder, create_app, launch

    outputs = tmp_path_factory.mktemp("demo-outputs")
    elsewhere = tmp_path_factory.mktemp("server-files")
    token = secrets.token_hex(8)
    secret_png = _png(elsewhere / f"secret-{token}.png", 77)
    secret_txt = elsewhere / f"secret-{token}.txt"
    secret_txt.write_text(f"password-{token}\n")
    app = create_app(outputs_dir=outputs, max_upload_mb=CAP_MB)
    port = _free_port()
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        yield SimpleNamespace(app=app, client=grc.Client(url, verbose=False), url=url, outputs=outputs,
                              secrets=[secret_png, secret_txt], token=token, uploads=_upload_folder(app))
    finally:
        app.close()


def _assert_no_path(message: str, demo) -> None:
    assert UPLOAD_ONLY in message or "Files can only be sent" in message, message
    for secret in demo.secrets:
        assert str(secret.parent) not in message and demo.token not in message, message
    assert str(demo.uploads) not in message and not re.search(r"/(tmp|etc|root|home|proc|work)\b", message), message


def _assert_not_served(demo) -> None:
    """Neither the secret files nor /etc/hostname come back from the file route, and no
    copy of a secret went into Gradio's upload cache (where the route would serve it)."""
    for path in [*demo.secrets, Path("/etc/hostname")]:
        r = httpx.get(f"{demo.url}gradio_api/file={path}")
        assert r.status_code in (403, 404), (path, r.status_code)
    assert not [p for p in demo.uploads.rglob(f"*{demo.token}*")], "a secret was copied into the upload cache"


def _raw_generate(demo, **values) -> str:
    """``/generate`` over plain HTTP (``/gradio_api/call``): every parameter in order, its
    default unless given; returns the event stream's text."""
    params = httpx.get(f"{demo.url}gradio_api/info").json()["named_endpoints"]["/generate"]["parameters"]
    data = {p["parameter_name"]: p.get("parameter_default") for p in params}
    assert set(values) <= set(data)
    data.update(values)
    r = httpx.post(f"{demo.url}gradio_api/call/generate", json={"data": list(data.values())})
    r.raise_for_status()
    return httpx.get(f"{demo.url}gradio_api/call/generate/{r.json()['event_id']}", timeout=60).text


# -- file inputs -------------------------------------------------------------------------


def test_gradio_client_cannot_make_the_demo_read_server_files(demo):
    # gradio_client sends a file reference without "meta" as it is (it uploads only those with it)
    for field, path in [("image", demo.secrets[0]), ("image", demo.secrets[1]), ("image", "/etc/hostname"),
                        ("image", "../../../../etc/hostname"), ("prompt", "/etc/hostname"),
                        ("negative_prompt", str(demo.secrets[0]))]:
        values = {**I2V, field: {"path": str(path)}}
        with pytest.raises(grc.exceptions.AppError) as err:
            demo.client.predict(**values, api_name="/generate")
        _assert_no_path(str(err.value), demo)
    with pytest.raises(grc.exceptions.AppError, match=UPLOAD_ONLY):  # a URL is not an upload either
        demo.client.predict(**I2V, image={"path": None, "url": "http://127.0.0.1:1/x.png"}, api_name="/generate")
    _assert_not_served(demo)


def test_raw_http_cannot_make_the_demo_read_server_files(demo):
    # with "meta" Gradio would copy the file into its cache (served by /gradio_api/file=);
    # without, gr.Image would open it where it is
    meta = {"meta": {"_type": "gradio.FileData"}}
    for field, path, extra in [("image", demo.secrets[0], meta), ("image", demo.secrets[1], meta),
                               ("image", Path("/etc/hostname"), meta), ("image", demo.secrets[0], {}),
                               ("prompt", demo.secrets[1], meta), ("mask__pattern", demo.secrets[1], meta)]:
        stream = _raw_generate(demo, **{**I2V, field: {"path": str(path), **extra}})
        assert "event: error" in stream and "event: complete" not in stream, stream
        _assert_no_path(stream, demo)
    _assert_not_served(demo)


def test_symlinks_in_the_upload_folder_are_resolved_first(demo):
    link = demo.uploads / f"gen-test-{secrets.token_hex(6)}" / "picture.png"
    link.parent.mkdir(parents=True)
    try:
        link.symlink_to(demo.secrets[0])
        with pytest.raises(grc.exceptions.AppError, match=UPLOAD_ONLY):
            demo.client.predict(**I2V, image={"path": str(link)}, api_name="/generate")
    finally:
        link.unlink(missing_ok=True)
        link.parent.rmdir()


def test_uploads_are_capped(demo, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(int(CAP_MB * 1e6) + 10_000))
    with big.open("rb") as f:  # Gradio's max_file_size, set by launch
        r = httpx.post(f"{demo.url}gradio_api/upload", files={"files": ("big.png", f)})
    assert r.status_code == 413
    # and the demo's own check, for a big file that reached the upload folder another way
    inside = demo.uploads / f"gen-test-{secrets.token_hex(6)}" / "big.png"
    inside.parent.mkdir(parents=True)
    try:
        inside.write_bytes(big.read_bytes())
        with pytest.raises(grc.exceptions.AppError, match="larger than the demo's limit of 0.05 MB"):
            demo.client.predict(**I2V, image={"path": str(inside)}, api_name="/generate")
    finally:
        inside.unlink()
        inside.parent.rmdir()


def test_an_uploaded_picture_still_works(demo, tmp_path):
    video, _, _, report = demo.client.predict(**I2V, image=grc.handle_file(str(_png(tmp_path / "first.png"))),
                                              api_name="/generate")
    assert Path(video).suffix == ".mp4" and "tiny-wan-i2v" in report
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("not a picture")
    with pytest.raises(grc.exceptions.AppError, match="not a picture the demo can read") as err:
        demo.client.predict(**I2V, image=grc.handle_file(str(not_a_picture)), api_name="/generate")
    assert "/" not in str(err.value).replace("gradio_client", "")


def test_serves_its_outputs_and_blocks_system_folders(demo):
    assert demo.app.allowed_paths == [str(demo.outputs)] and demo.app.show_error is False
    assert "/etc" in demo.app.blocked_paths and not any(
        Path(demo.outputs).is_relative_to(p) or demo.uploads.is_relative_to(p) for p in demo.app.blocked_paths)
    assert (demo.outputs / MARKER).is_file()
    assert httpx.get(f"{demo.url}gradio_api/file={demo.outputs / MARKER}").status_code == 200
    for path in ["/etc/passwd", "/etc/shadow", REPO / "pyproject.toml", Path(__file__).resolve()]:
        assert httpx.get(f"{demo.url}gradio_api/file={path}").status_code in (403, 404), path


def test_error_messages_carry_no_server_paths():
    from gen.demos.app import _gr_error, _no_paths
    from gen.demos.engine import _read_image

    assert _no_paths("cannot identify image file '/tmp/gradio/ab12/hostname'") == \
        "cannot identify image file '<path>'"
    assert _no_paths("weights in ~/.cache/x are missing; see /etc/a.") == "weights in <path> are missing; see <path>."
    for text in ("frames must be 4k+1 (got 10); try 9 or 13", "PSNR/SSIM of a/b", "see https://x.org/a/b"):
        assert _no_paths(text) == text
    assert "/root/secret" not in _gr_error(ValueError("no weights at /root/secret/model")).message
    assert "/root" not in _gr_error(OSError("read /root/x failed")).message
    with pytest.raises(ValueError) as err:
        _read_image("/etc/hostname", 64, 64)
    assert "/etc" not in str(err.value) and "a PNG or JPEG" in str(err.value)


# -- the outputs folder ------------------------------------------------------------------


@pytest.mark.parametrize("path,reason", [
    ("/", "root of the filesystem"),
    ("/etc", "a system folder"),
    ("/usr", "a system folder"),
    ("/proc/self", "inside /proc"),
    ("~", "your home folder"),
    (str(Path.home()), "your home folder"),
    (str(REPO), "root of a repository"),
])
def test_unsafe_outputs_folders_are_refused(path, reason):
    with pytest.raises(ValueError, match=re.escape(reason)) as err:
        check_outputs_dir(path)
    assert "serves every file" in str(err.value)  # and what to do
    with pytest.raises(ValueError, match=re.escape(reason)):
        prepare_outputs_dir(path)


def test_outputs_folders_with_foreign_files_or_links_are_refused(tmp_path):
    used = tmp_path / "photos"
    used.mkdir()
    (used / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"holds files the demo did not write \(holiday.jpg\)"):
        check_outputs_dir(used)
    (tmp_path / "to-root").symlink_to("/")
    with pytest.raises(ValueError, match="root of the filesystem"):
        check_outputs_dir(tmp_path / "to-root")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="it is a file"):
        check_outputs_dir(tmp_path / "a-file")


def test_new_empty_and_demo_folders_are_accepted(tmp_path):
    fresh = tmp_path / "new" / "outputs"
    assert check_outputs_dir(fresh) == fresh.resolve() and not fresh.exists()  # a check writes nothing
    assert prepare_outputs_dir(fresh) == fresh.resolve() and (fresh / MARKER).is_file()
    (fresh / "tiny-wan-dense-a-s1-1234.mp4").write_bytes(b"x")  # what the demo writes there
    (fresh / "masks").mkdir()
    assert check_outputs_dir(fresh) == fresh.resolve()  # used by the demo before: still accepted
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_outputs_dir(empty) == empty.resolve()


def test_create_app_refuses_an_unsafe_outputs_folder():
    from gen.demos.app import create_app

    with pytest.raises(ValueError, match="root of the filesystem"):
        create_app(outputs_dir="/")
    with pytest.raises(ValueError, match="a system folder"):
        create_app(outputs_dir="/etc")


@pytest.mark.parametrize("outputs", ["/", "/etc", "~", str(REPO), "foreign"])
def test_gen_demo_refuses_an_unsafe_outputs_folder(outputs, monkeypatch, tmp_path):
    import gen.demos.app
    from gen.cli import app

    if outputs == "foreign":
        outputs = str(tmp_path)
        (tmp_path / "notes.txt").write_text("mine")
    called = []
    monkeypatch.setattr(gen.demos.app, "serve", lambda **kw: called.append(kw))
    res = CliRunner().invoke(app, ["demo", "--outputs", outputs])
    assert res.exit_code == 2 and not called, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing ") and "Traceback" not in res.output, res.output


def test_gen_demo_accepts_new_and_used_folders(monkeypatch, tmp_path):
    import gen.demos.app
    from gen.cli import app

    seen = []
    monkeypatch.setattr(gen.demos.app, "serve", lambda **kw: seen.append(kw))
    prepare_outputs_dir(tmp_path / "used")
    (tmp_path / "used" / "out.png").write_bytes(b"x")
    for folder in (tmp_path / "new", tmp_path / "used"):
        res = CliRunner().invoke(app, ["demo", "--outputs", str(folder), "--max-upload-mb", "5"])
        assert res.exit_code == 0, res.output
        assert seen[-1]["outputs_dir"] == folder.resolve() and seen[-1]["max_upload_mb"] == 5
