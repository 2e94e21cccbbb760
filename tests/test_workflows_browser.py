"""Every shipped UI workflow loads in the real ComfyUI frontend (headless Chromium) with no missing node, and
the frontend turns it into exactly the shipped API workflow."""
import json

import pytest

from support.graphs import WORKFLOWS

UI_FILES = sorted(WORKFLOWS.glob("*_ui.json"))


def strip(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def test_every_api_workflow_has_a_ui_twin():
    api = {p.name.replace("_api.json", "") for p in WORKFLOWS.glob("*_api.json")}
    assert api == {p.name.replace("_ui.json", "") for p in UI_FILES}


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_loads_in_the_browser_and_matches_its_api_twin(frontend, ui_file):
    result = frontend.evaluate("""async (workflow) => {
        await window.app.loadGraphData(workflow);
        const graph = window.app.graph;
        const missing = graph._nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type);
        const prompt = await window.app.graphToPrompt();
        return {missing, output: prompt.output};
    }""", json.loads(ui_file.read_text()))
    assert result["missing"] == []
    api = json.loads(ui_file.with_name(ui_file.name.replace("_ui.json", "_api.json")).read_text())
    assert strip(result["output"]) == strip(api)
