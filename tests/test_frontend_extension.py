"""web/js/invadapter.js in the real frontend (headless Chromium): it loads, the pack's link colours stand apart from
every core type's colour in every colour palette the frontend ships (far apart in the default one), the block-weight
sliders show only when used, and the pack's notices show as toasts."""
import itertools
import json
import re
import uuid
from pathlib import Path

import pytest

from support.browser import run_graph
from support.colours import DEFAULT_PALETTE, colour_distance, delta_e2000, frontend_palette_ids, frontend_palettes
from support.graphs import api_twin, example_file, example_files, smoke_edits, user_edits

# CIEDE2000: about 1 is just noticeable; above 10 two link colours read as different at a glance, at 20 they no longer
# look like one colour family (the default palette's, where most users see them).
MIN_DISTANCE_TO_CORE = 10.0
MIN_DISTANCE_TO_CORE_DEFAULT = 20.0
MIN_DISTANCE_BETWEEN_OURS = 15.0
EXTENSION = Path(__file__).resolve().parents[1] / "web" / "js" / "invadapter.js"


def link_colours() -> dict[str, str]:
    """LINK_COLORS as web/js/invadapter.js declares them."""
    block = re.search(r"LINK_COLORS = \{(.*?)\};", EXTENSION.read_text(), re.S).group(1)
    return dict(re.findall(r"(INVADAPTER\w*):\s*\"(#[0-9A-Fa-f]{6})\"", block))


@pytest.mark.parametrize("lab1, lab2, expected", [
    ((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425),  # Sharma, Wu and Dalal (2005), test pairs 1, 7, 17, 25
    ((50, 0, 0), (50, -1, 2), 2.3669),
    ((50, 2.5, 0), (73, 25, -18), 27.1492),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
])
def test_colour_distance_is_ciede2000(lab1, lab2, expected):
    assert delta_e2000(lab1, lab2) == pytest.approx(expected, abs=1e-4)


def pack_types(object_info: dict) -> set[str]:
    """The custom types the pack's nodes take or give (INVADAPTER*), whatever nodes it registers."""
    found = set()
    for info in object_info.values():
        if not info["name"].startswith("InvAdapter"):
            continue
        specs = [s for group in ("required", "optional") for s in info["input"].get(group, {}).values()]
        types = [s[0] for s in specs if isinstance(s[0], str)] + list(info.get("output", []))
        found.update(t for t in types if t.startswith("INVADAPTER"))
    return found


def test_link_colours_stand_apart_in_the_default_palette():
    """Every pack type's link colour at CIEDE2000 >= 20 from every core type's colour in the default palette, as the
    installed frontend package defines it (read from its bundle: a new frontend's colours are checked, not a copy)."""
    ours = link_colours()
    assert len(ours) == 5, ours
    core = frontend_palettes()[DEFAULT_PALETTE]
    assert {"MODEL", "CONDITIONING", "LATENT", "VAE", "CONTROL_NET", "IMAGE"} <= set(core), core
    problems = [f"{t} {c} is {colour_distance(c, cc):.1f} from {ct} {cc}" for t, c in sorted(ours.items())
                for ct, cc in sorted(core.items()) if colour_distance(c, cc) < MIN_DISTANCE_TO_CORE_DEFAULT]
    problems += [f"{a} {ours[a]} and {b} {ours[b]} are {colour_distance(ours[a], ours[b]):.1f} apart"
                 for a, b in itertools.combinations(sorted(ours), 2)
                 if colour_distance(ours[a], ours[b]) <= MIN_DISTANCE_BETWEEN_OURS]
    assert not problems, "\n".join(problems)


def test_link_colours_differ_from_every_core_type_in_every_palette(frontend, comfy_client):
    ours = pack_types(comfy_client.object_info())
    assert {"INVADAPTER", "INVADAPTER_REFERENCE"} <= ours
    problems = []
    palettes = frontend_palette_ids()
    assert {"dark", "light"} <= set(palettes), palettes
    for palette in palettes:
        colours = frontend.evaluate("""async (palette) => {
            await window.app.extensionManager.setting.set('Comfy.ColorPalette', palette);
            await new Promise(r => setTimeout(r, 300));
            return {...window.app.canvas.default_connection_color_byType};
        }""", palette)
        core = {t: c for t, c in colours.items() if c and t not in ours}
        assert len(core) >= 10, f"palette {palette}: only {core} have colours"
        for ours_type in sorted(ours):
            colour = colours.get(ours_type)
            if not colour:
                problems.append(f"palette {palette}: {ours_type} has no colour (add it to LINK_COLORS in "
                                f"web/js/invadapter.js)")
                continue
            needed = MIN_DISTANCE_TO_CORE_DEFAULT if palette == DEFAULT_PALETTE else MIN_DISTANCE_TO_CORE
            for core_type, core_colour in core.items():
                distance = colour_distance(colour, core_colour)
                if distance < needed:
                    problems.append(f"palette {palette}: {ours_type} {colour} is {distance:.1f} from {core_type} "
                                    f"{core_colour} (needs >= {needed})")
        for a, b in itertools.combinations(sorted(t for t in ours if colours.get(t)), 2):
            if colour_distance(colours[a], colours[b]) <= MIN_DISTANCE_BETWEEN_OURS:
                problems.append(f"palette {palette}: {a} and {b} look alike ({colours[a]}, {colours[b]})")
    frontend.evaluate("() => window.app.extensionManager.setting.set('Comfy.ColorPalette', 'dark')")
    assert not problems, "\n".join(problems)


def test_extension_hides_unused_block_weight_sliders(frontend, comfy_server):
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
        const sliders = () => node.widgets.filter(w => /^(self|cross|dit)_/.test(w.name));
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
        return {names, count: sliders().length, atStart, custom, back: hidden(), heightAll, heightCustom,
                inputs: Object.values(prompt.output)[0].inputs};
    }""")
    assert "InvAdapter.Frontend" in result["names"], frontend.errors
    assert not [e for e in frontend.errors if "invadapter" in e.lower()]
    assert result["count"] == 14 + 5  # UNet levels for self and cross, five MM-DiT levels
    assert all(result["atStart"]) and not any(result["custom"]) and all(result["back"])
    assert result["heightCustom"] > result["heightAll"]
    assert len(result["inputs"]) == 20, "hidden sliders must still reach the prompt"


def test_a_notice_during_a_run_shows_as_a_toast(frontend):
    """A prompt queued from the browser whose InvAdapterApply acts on no range (start == end): the pack's notice
    reaches this browser over the websocket and the extension shows it as a toast."""
    ui_file = example_file("basic")
    ui, api_graph = json.loads(ui_file.read_text()), json.loads(api_twin(ui_file).read_text())
    edits = smoke_edits(api_graph, user_edits(api_graph))
    apply = next(i for i, n in api_graph.items() if n["class_type"] == "InvAdapterApply")
    edits.setdefault(apply, {}).update(start_percent=0.4, end_percent=0.4)
    frontend.evaluate("""() => {  // every toast as it appears (the run goes on for a while after the notice)
        window.__toasts = [];
        new MutationObserver(() => document.querySelectorAll(".p-toast-message").forEach(t => {
            if (!window.__toasts.includes(t.innerText)) window.__toasts.push(t.innerText);
        })).observe(document.body, {childList: true, subtree: true});
    }""")
    result = run_graph(frontend, ui, edits, timeout=900)
    assert result["status"] == "success", result["error"]
    toasts = frontend.evaluate("() => window.__toasts")
    assert any("Inv-Adapter" in t and "start_percent equals end_percent" in t for t in toasts), toasts


def save_reference_example():
    """The shipped UI workflow that saves a reference, with its API twin."""
    for ui_file in example_files():
        api_graph = json.loads(api_twin(ui_file).read_text())
        if any(n["class_type"] == "InvAdapterSaveReference" for n in api_graph.values()):
            return json.loads(ui_file.read_text()), api_graph
    raise AssertionError("no example workflow saves a reference")


def test_loading_an_unsaved_reference_says_what_to_run_first(comfy_client):
    """Instead of ComfyUI's "Value not in list: ... not in []": the folder searched and the graph to run first."""
    from support.server import PromptRejected

    name = f"never_saved_{uuid.uuid4().hex[:8]}.safetensors"
    prompt = {"1": {"class_type": "InvAdapterLoadReference", "inputs": {"reference_name": name}},
              "2": {"class_type": "InvAdapterSaveReference",
                    "inputs": {"reference": ["1", 0], "name": "unused", "with_features": True, "overwrite": True}}}
    with pytest.raises(PromptRejected) as rejected:
        comfy_client.queue(prompt)
    text = json.dumps(rejected.value.node_errors)
    assert "Value not in list" not in text, text
    assert f"no saved reference '{name}'" in text and "invadapter_references" in text, text
    assert "run a graph with Inv-Adapter Save Reference first" in text, text


def test_saved_reference_appears_in_load_reference_without_a_reload(frontend):
    """A Load Reference node open in the page before Save Reference runs lists the new file once the save is done
    (the extension refreshes the node definitions on Save Reference's executed event), and so does a new node."""
    ui, api_graph = save_reference_example()
    name = f"refresh_{uuid.uuid4().hex[:8]}"
    save = next(i for i, n in api_graph.items() if n["class_type"] == "InvAdapterSaveReference")
    edits = smoke_edits(api_graph, user_edits(api_graph))
    edits.setdefault(save, {}).update(name=name, overwrite=True)
    opened = frontend.evaluate("""async (workflow) => {  // the save graph with a Load Reference node beside it
        const app = window.app;
        await app.loadGraphData(workflow);
        const node = window.LiteGraph.createNode("InvAdapterLoadReference");
        node.pos = [0, -400];
        app.graph.add(node);
        return {workflow: app.graph.serialize(), id: node.id, values: [...node.widgets[0].options.values]};
    }""", ui)
    file = f"{name}.safetensors"
    assert file not in opened["values"]
    result = run_graph(frontend, opened["workflow"], edits, timeout=900)
    assert result["status"] == "success", result["error"]
    listed = """([id, file]) => window.app.graph.getNodeById(id)?.widgets[0].options.values.includes(file)"""
    frontend.wait_for_function(listed, arg=[opened["id"], file], timeout=30_000)
    assert frontend.evaluate("""(file) => window.LiteGraph.createNode("InvAdapterLoadReference")
        .widgets[0].options.values.includes(file)""", file)
