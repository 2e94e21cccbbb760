"""Every example workflow in the real ComfyUI frontend (headless Chromium on a real server with the random-weight test
checkpoint): it loads with no missing node and the frontend turns it into exactly its API twin; after the one edit
a user makes (picking the checkpoint; the test also shrinks it to a CPU smoke run) it runs from the frontend, and its
nodes as the frontend draws them then (title bars, widgets, image previews) overlap nowhere and fill no more than
their saved size; the missing-model panel offers the embedded downloads; the template browser lists every example
with its thumbnail, in their numbered order, and opens them at a zoom where text is drawn with the Start here note
in view; the note's box fits its text."""
import itertools
import json
import sys

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from support.browser import node_bounds, run_graph
from support.fixtures import STAND_INS
from support.graphs import (NOT_RUN_HERE, ROOT, api_twin, example_files, load_workflow, set_inputs, smoke_edits,
                            strip_meta, user_edits)
from support.server import PACK_LINK_NAME

sys.path.append(str(ROOT / "scripts"))
from make_examples import NOTE_SLACK  # noqa: E402
from workflow_layout import node_rect, overlap  # noqa: E402

UI_FILES = example_files()
WINDOW = (1600, 1000)  # the frontend fixture's window
LEGIBLE_ZOOM = 0.6  # below it the frontend draws nodes without text (low-quality rendering)

# The opened graph's zoom and its note's box on screen [x, y, w, h].
OPENED_VIEW = """() => {
    const canvas = window.app.canvas;
    const note = window.app.graph._nodes.find(n => n.type === 'MarkdownNote');
    const [x, y, w, h] = note.getBounding();
    const [sx, sy] = canvas.ds.convertOffsetToCanvas([x, y]);
    return {scale: canvas.ds.scale, note: [sx, sy, w * canvas.ds.scale, h * canvas.ds.scale]};
}"""


def load(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_loads_in_the_browser_and_matches_its_api_twin(frontend, ui_file):
    result = frontend.evaluate("""async (workflow) => {
        await window.app.loadGraphData(workflow);
        const graph = window.app.graph;
        const missing = graph._nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type);
        const prompt = await window.app.graphToPrompt();
        return {missing, output: prompt.output};
    }""", load(ui_file))
    assert result["missing"] == []
    assert strip_meta(result["output"]) == strip_meta(load(api_twin(ui_file)))


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_runs_after_picking_a_checkpoint_and_nothing_overlaps(frontend, comfy_client, ui_file):
    ui, api = load(ui_file), load(api_twin(ui_file))
    if api_twin(ui_file).stem in NOT_RUN_HERE:
        pytest.skip(f"{NOT_RUN_HERE[api_twin(ui_file).stem]}: test_example_workflows checks that the server accepts "
                    f"all of it but its model files")
    if any(n["class_type"] == "InvAdapterLoadReference" for n in api.values()):
        save = load_workflow("save_reference")  # makes the identity file the graph loads
        set_inputs(save, "CheckpointLoaderSimple", {"ckpt_name": STAND_INS["v1-5-pruned-emaonly-fp16.safetensors"]})
        comfy_client.run(save, timeout=900)
    result = run_graph(frontend, ui, smoke_edits(api, user_edits(api)), timeout=900)
    assert result["status"] == "success", result["error"]
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    live = result["bounds"]
    name = lambda i: f"'{nodes[i]['title']}' (#{i})"  # noqa: E731
    problems = []
    for i, node in nodes.items():
        saved = node_rect(node)
        if any(abs(a - b) > 1 for a, b in zip(live[i], saved)):
            problems.append(f"{name(i)} is drawn at {live[i]}, saved as {saved}: the frontend needed more room")
    for a, b in itertools.combinations(sorted(live), 2):
        if overlap(live[a], live[b]):
            problems.append(f"{name(a)} overlaps {name(b)} as drawn")
    assert not problems, "\n".join(problems)


def test_missing_model_panel_offers_the_embedded_downloads(frontend):
    """Loaded as shipped (the server has none of the standard models), each graph's missing models are listed with
    the download links the graph embeds."""
    problems = []
    for ui_file in UI_FILES:
        ui = load(ui_file)
        expected = {m["url"] for n in ui["nodes"] for m in n.get("properties", {}).get("models", [])}
        frontend.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", ui)
        details = frontend.get_by_text("View details")
        details.wait_for(timeout=30_000)
        details.click()
        frontend.wait_for_timeout(1000)
        offered = set(frontend.evaluate("() => [...document.querySelectorAll('a')].map(a => a.href)"))
        if not expected or not expected <= offered:
            problems.append(f"{ui_file.name}: offered {sorted(offered & expected)}, expected {sorted(expected)}")
    assert not problems, "\n".join(problems)


def test_template_browser_lists_every_example_with_its_thumbnail(frontend):
    frontend.evaluate("async () => { await window.app.loadGraphData({nodes: [], links: [], version: 0.4}); }")
    frontend.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    frontend.get_by_text(PACK_LINK_NAME, exact=True).click()
    cards = frontend.locator("[data-testid^=template-workflow-]")
    try:
        frontend.wait_for_function("n => document.querySelectorAll('[data-testid^=template-workflow-]').length >= n",
                                   arg=len(UI_FILES), timeout=30_000)
    except PlaywrightTimeout:
        pass  # the assertions below say which
    widths = {}  # thumbnails load lazily as a card scrolls into view, and unload out of view: look at each in view
    for i in range(cards.count()):
        card = cards.nth(i)
        card.scroll_into_view_if_needed()
        name = card.get_attribute("data-testid").replace("template-workflow-", "")
        try:  # they arrive as blobs after the cards
            widths[name] = card.locator("img").first.evaluate(
                "img => new Promise(done => { const width = () => done(img.naturalWidth); setTimeout(width, 30000);"
                " if (img.complete && img.naturalWidth) width();"
                " else ['load', 'error'].forEach(e => img.addEventListener(e, width)); })", timeout=30_000)
        except PlaywrightTimeout:
            widths[name] = 0  # no image element at all
    cards = widths
    assert list(cards) == [p.stem for p in UI_FILES], "the cards are not in the templates' numbered order"
    assert all(width > 0 for width in cards.values()), f"thumbnails that did not load: {cards}"
    first = UI_FILES[0]
    frontend.locator(f"[data-testid='template-workflow-{first.stem}']").click()
    frontend.wait_for_function(f"() => window.app.graph._nodes.length === {len(load(first)['nodes'])}", timeout=30_000)
    assert set(node_bounds(frontend)) == {str(n["id"]) for n in load(first)["nodes"]}
    frontend.wait_for_timeout(500)
    opened = frontend.evaluate(OPENED_VIEW)
    assert opened["scale"] >= LEGIBLE_ZOOM, opened


def test_templates_open_at_a_legible_zoom_with_the_note_in_view(frontend):
    """Opened as the template browser opens them (loadGraphData with openSource 'template', which fits the view to
    the whole graph unless web/js/templates.js restores the saved one) in a 1600 x 1000 window: the zoom draws
    text, and the Start here note is on screen in full."""
    problems = []
    for ui_file in UI_FILES:
        frontend.evaluate("""async ([workflow, name]) => {
            await window.app.loadGraphData(workflow, true, true, name, {openSource: 'template'});
        }""", [load(ui_file), ui_file.stem])
        frontend.wait_for_timeout(300)
        opened = frontend.evaluate(OPENED_VIEW)
        x, y, w, h = opened["note"]
        print(f"{ui_file.stem}: opens at {opened['scale']:.0%}, note at {[round(v) for v in opened['note']]}")
        if opened["scale"] < LEGIBLE_ZOOM:
            problems.append(f"{ui_file.name} opens at {opened['scale']:.0%}")
        if not (0 <= x and 0 <= y and x + w <= WINDOW[0] and y + h <= WINDOW[1]):
            problems.append(f"{ui_file.name}: the note is at {opened['note']}, outside the window")
    assert not problems, "\n".join(problems)


def test_the_start_here_note_shows_all_its_text(frontend):
    """At 100% zoom, the rendered note needs no scrolling and its box is no taller than its text needs (the
    height is measured in the frontend when the graph is built)."""
    problems = []
    for ui_file in UI_FILES:
        frontend.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", load(ui_file))
        text, shown = frontend.evaluate("""async () => {
            const note = window.app.graph._nodes.find(n => n.type === 'MarkdownNote');
            const canvas = window.app.canvas;
            canvas.ds.scale = 1;
            canvas.ds.offset = [100 - note.pos[0], 100 - note.pos[1]];
            canvas.setDirty(true, true);
            canvas.draw(true, true);
            await new Promise(r => setTimeout(r, 800));  // DOM widgets follow the canvas on the next frames
            const shown = note.widgets[0].element.querySelector(".ProseMirror");  // the rendered markdown
            const text = document.createRange();
            text.selectNodeContents(shown);
            return [text.getBoundingClientRect().height, shown.clientHeight];
        }""")
        print(f"{ui_file.stem}: note text {text:.0f} px in a {shown} px box")
        if not 0 < text <= shown + 1:
            problems.append(f"{ui_file.name}: the note's text is {text:.0f} px high in {shown} px")
        elif shown - text > NOTE_SLACK + 12:
            problems.append(f"{ui_file.name}: the note's box is {shown} px for {text:.0f} px of text")
    assert not problems, "\n".join(problems)
