"""The real ComfyUI frontend in headless Chromium (Debian's chromium driven by playwright; nothing is downloaded).
Importable without pytest: scripts/make_examples.py uses it too."""
from __future__ import annotations

import contextlib
import os
import shutil

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI sets this: there a missing browser is a failure, not a skip
REQUIRED = os.environ.get("INVADAPTER_REQUIRE_BROWSER") == "1"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@contextlib.contextmanager
def frontend_page(url: str, viewport=(1600, 1000)):
    """A page with the frontend loaded from ``url`` (app, graph and LiteGraph ready). ``page.errors`` collects
    uncaught errors and console errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
            page.goto(url, timeout=180_000)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=180_000)
            # a first visit opens the template browser: close it so keys and clicks reach the canvas
            page.wait_for_timeout(1000)
            page.keyboard.press("Escape")
            yield page
        finally:
            browser.close()
