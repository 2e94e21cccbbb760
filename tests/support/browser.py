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
def frontend_page(url: str, viewport=(1600, 1000), settings: dict | None = None):
    """A page with the frontend loaded from ``url`` (app, graph and LiteGraph ready), with ``settings`` stored on the
    server first. ``page.errors`` collects uncaught errors and console errors."""
    import requests
    from playwright.sync_api import sync_playwright

    # a first visit would open the template browser over the canvas
    settings = {"Comfy.TutorialCompleted": True, **(settings or {})}
    requests.post(f"{url}/settings", json=settings, timeout=30).raise_for_status()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
            page.goto(url, timeout=180_000)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=180_000)
            # the default workflow loads after that: wait, or it would replace a graph a caller loads meanwhile
            page.wait_for_function("() => window.app.graph._nodes.length > 0", timeout=60_000)
            yield page
        finally:
            browser.close()


# Loads a UI workflow, sets widget values ({node id: {widget name: value}}), queues it as the Run button does and
# waits for the server to finish it; returns {status, error, bounds} with every node's live bounding box (title bar,
# widgets and image previews included: LGraphNode.getBounding) once the previews are drawn.
_RUN_GRAPH = """async ([workflow, edits, timeoutMs]) => {
    const app = window.app;
    await app.loadGraphData(workflow);
    for (const [id, values] of Object.entries(edits)) {
        const node = app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(values)) {
            const widget = node.widgets.find(w => w.name === name);
            if (!widget) throw new Error(`node ${id} (${node.type}) has no widget ${name}`);
            widget.value = value;
            widget.callback?.(value, app.canvas, node);  // what a user's edit triggers (e.g. missing-model checks)
        }
    }
    const done = new Promise((resolve) => {
        const finish = (status) => (event) => resolve({status, error: event.detail ?? null});
        app.api.addEventListener("execution_success", finish("success"), {once: true});
        app.api.addEventListener("execution_error", finish("error"), {once: true});
        setTimeout(() => resolve({status: "timeout", error: null}), timeoutMs);
    });
    await app.queuePrompt(0, 1);
    const result = await done;
    await new Promise(r => setTimeout(r, 1500));  // image previews load and draw
    app.canvas.draw(true, true);
    result.bounds = Object.fromEntries(app.graph._nodes.map(n => [n.id, [...n.getBounding()]]));
    return result;
}"""


def run_graph(page, workflow: dict, edits: dict, timeout: float = 600.0) -> dict:
    """Run a UI workflow from the frontend after editing some widgets (see _RUN_GRAPH)."""
    return page.evaluate(_RUN_GRAPH, [workflow, {str(k): v for k, v in edits.items()}, int(timeout * 1000)])


def node_bounds(page) -> dict[str, list[float]]:
    """Every node's live bounding box [x, y, w, h] (title bar included) in the loaded graph."""
    return page.evaluate("() => Object.fromEntries(window.app.graph._nodes.map(n => [n.id, [...n.getBounding()]]))")
