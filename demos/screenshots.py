"""Take the README's screenshots of the demo, one per tab, after real runs.

    python -m gen.demos.screenshots [--out docs/images] [--method radial]

Starts the app in-process on a free localhost port with its default model, drives Debian's
``chromium`` (``/usr/bin/chromium``; no browser download) through Playwright: generates a
clip, runs a comparison, draws a mask, and writes ``demo_generate.png``,
``demo_compare.png`` and ``demo_masks.png``. Needs ``pip install playwright`` and
``apt-get install chromium``; runs offline (``HF_HUB_OFFLINE=1``) in about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# headless, no sandbox (containers run as root), and no background traffic: the page
# must render from the local server alone
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 180_000  # a run on a busy 2-core CPU; the tiny models take seconds


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(page) -> None:
    """Wait until the page has filled in the model's defaults (``app.load``), which is
    when it enables the Generate button."""
    page.wait_for_selector("#generate:not([disabled])", timeout=TIMEOUT_MS)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="folder for the PNGs")
    parser.add_argument("--method", default="radial", help="attention method shown (default: radial)")
    parser.add_argument("--width", type=int, default=1440, help="browser viewport width in CSS pixels")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from playwright.sync_api import sync_playwright

    from .app import create_app, launch

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gen-demo-shots-") as tmp:
        app = create_app(outputs_dir=tmp, default_method=args.method)
        port = free_port()
        launch(app, port=port, prevent_thread_lock=True, quiet=True)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                page = browser.new_page(viewport={"width": args.width, "height": 1000})
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(f"http://127.0.0.1:{port}/")
                wait_ready(page)

                page.click("#generate")
                page.wait_for_selector("#gen-video video[src]")
                page.wait_for_selector("#gen-report :text('saved as')")
                page.screenshot(path=str(args.out / "demo_generate.png"), full_page=True)

                open_tab(page, "Compare")
                page.click("#compare")
                page.wait_for_selector("#cmp-method-video video[src]")
                page.wait_for_selector("#cmp-report :text('Speedup')")
                page.screenshot(path=str(args.out / "demo_compare.png"), full_page=True)

                open_tab(page, "Masks")
                # the presets run layer 0 dense (radial's dense_layers=1 on shapes-wan): show layer 1
                page.fill("#mask-layer input[type=number]", "1")
                page.keyboard.press("Enter")
                page.click("#show-mask")
                page.wait_for_selector("#mask-image img[src]")
                page.wait_for_selector("#mask-report :text('density')")
                page.screenshot(path=str(args.out / "demo_masks.png"), full_page=True)
                browser.close()
        finally:
            app.close()
    for name in ("demo_generate", "demo_compare", "demo_masks"):
        print(args.out / f"{name}.png")


if __name__ == "__main__":
    main()
