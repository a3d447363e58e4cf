"""The demo in a real browser: Debian's chromium driven by Playwright (no browser
download) loads the page, types a prompt, presses Generate and waits for the video.
The screenshot is kept as a test artifact in ``test-artifacts/demo_browser_generate.png``.
Skips when ``/usr/bin/chromium`` or Playwright is missing (``apt-get install chromium``,
``pip install playwright``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 120_000  # a 25-step shapes-wan clip takes seconds, but CI machines are busy

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*"),  # gradio's queue vs pandas 3
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_in_the_browser(tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not found: `apt-get install chromium` to run the browser test")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: `pip install playwright` (no browser download needed)")
    from gen.demos.app import create_app, launch

    app = create_app(outputs_dir=tmp_path / "outputs")
    port = _free_port()
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(TIMEOUT_MS)
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"http://127.0.0.1:{port}/")
                # Generate is enabled once the page has filled in the model's defaults
                page.wait_for_selector("#generate:not([disabled])")
                assert page.input_value("#height input") == "128"  # shapes-wan's default, filled on load
                page.fill("#frames input", "5")  # a shorter clip: 2 latent frames
                page.fill("#prompt textarea", "a green square moving up on a black background")
                page.click("#generate")
                page.wait_for_selector("#gen-video video[src]")
                page.wait_for_selector("#gen-report :text('saved as')")
                report = page.inner_text("#gen-report")
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "demo_browser_generate.png"), full_page=True)
            finally:
                browser.close()
    finally:
        app.close()
    assert "5 frames at 128×128" in report and "a-green-square-moving-up-on-s42" in report
    assert list((tmp_path / "outputs").glob("shapes-wan-dense-a-green-square-moving-up-on-s42-*.mp4"))
    assert not errors, errors
