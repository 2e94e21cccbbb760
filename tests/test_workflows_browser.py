"""Every shipped UI workflow loads in the real ComfyUI frontend (headless Chromium) with no missing node, and
the frontend turns it into exactly the shipped API workflow."""
import json
import os
import shutil

import pytest

from support.graphs import WORKFLOWS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("INVADAPTER_REQUIRE_BROWSER") == "1"
UI_FILES = sorted(WORKFLOWS.glob("*_ui.json"))


@pytest.fixture(scope="module")
def page(comfy_server):
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail("chromium is not installed (make setup installs it as root: apt-get install chromium)")
        pytest.skip("chromium is not installed: `apt-get install chromium` to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page()
        page.goto(comfy_server.url, timeout=180_000)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=180_000)
        yield page
        browser.close()


def strip(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def test_every_api_workflow_has_a_ui_twin():
    api = {p.name.replace("_api.json", "") for p in WORKFLOWS.glob("*_api.json")}
    assert api == {p.name.replace("_ui.json", "") for p in UI_FILES}


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_loads_in_the_browser_and_matches_its_api_twin(page, ui_file):
    result = page.evaluate("""async (workflow) => {
        await window.app.loadGraphData(workflow);
        const graph = window.app.graph;
        const missing = graph._nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type);
        const prompt = await window.app.graphToPrompt();
        return {missing, output: prompt.output};
    }""", json.loads(ui_file.read_text()))
    assert result["missing"] == []
    api = json.loads(ui_file.with_name(ui_file.name.replace("_ui.json", "_api.json")).read_text())
    assert strip(result["output"]) == strip(api)
