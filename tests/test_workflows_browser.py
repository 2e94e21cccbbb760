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


def test_frontend_extension_colours_links_and_hides_unused_sliders(frontend, comfy_server):
    """web/js/invadapter.js is served and loaded; the block-weight sliders show only for preset 'custom', and hiding
    them changes nothing in the prompt the graph produces."""
    import requests

    served = requests.get(f"{comfy_server.url}/extensions/ComfyUI-InvAdapter/js/invadapter.js", timeout=30)
    assert served.status_code == 200 and "registerExtension" in served.text
    result = frontend.evaluate("""async () => {
        const app = window.app;
        await app.loadGraphData({nodes: [], links: [], version: 0.4});  // an empty graph
        const names = app.extensions.map(e => e.name);
        const node = window.LiteGraph.createNode("InvAdapterBlockWeights");
        app.graph.add(node);
        const sliders = () => node.widgets.filter(w => /^(self|cross)_/.test(w.name));
        const hidden = () => sliders().map(w => !!w.hidden);
        const heightAll = node.size[1];
        const atStart = hidden();
        const preset = node.widgets.find(w => w.name === "preset");
        preset.value = "custom";
        preset.callback(preset.value);
        const custom = hidden();
        const heightCustom = node.size[1];
        const prompt = await app.graphToPrompt();
        preset.value = "fine";
        preset.callback(preset.value);
        const colors = app.canvas.default_connection_color_byType;
        return {names, count: sliders().length, atStart, custom, back: hidden(), heightAll, heightCustom,
                inputs: Object.values(prompt.output)[0].inputs,
                color: colors["INVADAPTER_REFERENCE"]};
    }""")
    assert "InvAdapter.Frontend" in result["names"], frontend.errors
    assert not [e for e in frontend.errors if "invadapter" in e.lower()]
    assert result["count"] == 14
    assert all(result["atStart"]) and not any(result["custom"]) and all(result["back"])
    assert result["heightCustom"] > result["heightAll"]
    assert len(result["inputs"]) == 15, "hidden sliders must still reach the prompt"
    assert result["color"] == "#F4A261"
