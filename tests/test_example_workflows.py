"""The shipped workflows as files: example_workflows/NN_<name>.json (the UI graphs ComfyUI's template browser lists,
with their thumbnails) stay in sync with workflows/api/<name>.json (what POST /prompt takes), are laid out to be read
(scripts/workflow_layout.py's checks on the node rectangles), and are ready to run once a checkpoint is picked: a
note says what to pick and upload, the model links the missing-model dialog offers are embedded, every image they
name ships with the pack, the face crops are previewed. The frontend side of the same is in
test_workflows_browser.py."""
import ast
import json
import re
import sys

import pytest
from PIL import Image

from support.graphs import (API_WORKFLOWS, EXAMPLE_NAME, EXAMPLE_WORKFLOWS, NOT_RUN_HERE, ROOT, TEMPLATES, api_twin,
                            example_file, example_files, example_name, load_workflow, strip_meta)
from support.host import comfyui_path

sys.path.append(str(ROOT / "scripts"))
from make_examples import EXAMPLES, LOADERS, MODEL_WIDGETS, MODELS, NOTE_TYPE, build, note_text  # noqa: E402
from workflow_layout import STAGES, layout_problems, stage_of  # noqa: E402
from workflow_ui import ui_to_api  # noqa: E402

UI_FILES = example_files()
THUMBNAIL_MAX_BYTES = 150_000
# where ComfyUI's missing-model dialog may download from, and what it may download (frontend 1.47,
# missingModelDownload)
DOWNLOAD_PREFIXES = ("https://civitai.com/", "https://huggingface.co/")
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pth", ".pt")


def load(path):
    return json.loads(path.read_text())


def test_examples_are_numbered_in_order_and_each_has_an_api_twin():
    """The file name is the browser's card title: 'NN - <what it does>', numbered in the order a newcomer meets
    them (web/js/templates.js sorts the cards by it)."""
    names = [p.name for p in UI_FILES]
    assert names, "example_workflows/ is empty"
    assert all(EXAMPLE_NAME.match(n) for n in names), names
    assert [int(n[:2]) for n in names] == list(range(1, len(names) + 1)), f"not numbered 01, 02, ...: {names}"
    assert [p.stem for p in UI_FILES] == [example_name(name) for name, _ in TEMPLATES], \
        "example_workflows/ is not what scripts/make_examples.py makes: run it"
    assert set(EXAMPLES) == {name for name, _ in TEMPLATES}
    twins = {api_twin(p).name for p in UI_FILES}
    assert twins == {p.name for p in API_WORKFLOWS.glob("*.json")}, "every API graph needs exactly one UI graph"
    assert all(len(p.stem) <= 45 for p in UI_FILES), "a card shows about 45 characters of its title"


def test_readme_lists_every_template():
    readme = (ROOT / "README.md").read_text()
    missing = [p.stem for p in UI_FILES if f"`{p.stem}`" not in readme]
    assert not missing, f"README's template table lacks {missing}"


def test_only_example_workflows_is_scanned_by_the_template_browser():
    """The host lists every *.json directly in any of these folders of a pack as a template (an API graph opens as
    an empty canvas; its glob is ``<pack>/<folder>/*.json``): only example_workflows/ may hold one. workflows/ is one
    of these folders, so the API graphs sit a level below it, in workflows/api/."""
    source = (comfyui_path() / "app" / "custom_node_manager.py").read_text()
    scanned = ast.literal_eval(re.search(r"example_workflow_folder_names = (\[.*?\])", source).group(1))
    assert "example_workflows" in scanned and "workflows" in scanned
    assert re.search(r'os\.path\.join\(folder, f"\*/\{folder_name\}/\*\.json"\)', source), "the host scans deeper now"
    present = [name for name in scanned if list((ROOT / name).glob("*.json"))]
    assert present == ["example_workflows"], present
    assert API_WORKFLOWS.parent.name == "workflows" and list(API_WORKFLOWS.glob("*.json"))
    assert {p.suffix for p in EXAMPLE_WORKFLOWS.iterdir()} == {".json", ".jpg"}


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_thumbnail_is_a_small_square_jpeg(ui_file):
    """The frontend asks for <template>.jpg (mediaSubtype 'jpg' for custom nodes) and shows it in a square card."""
    thumbnail = ui_file.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{thumbnail.name} is missing: run scripts/make_examples.py"
    assert thumbnail.stat().st_size <= THUMBNAIL_MAX_BYTES
    image = Image.open(thumbnail)
    assert image.format == "JPEG" and image.width == image.height >= 256, (image.format, image.size)


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_ui_graph_and_api_graph_are_the_same_graph(ui_file, comfy_client):
    """Same nodes, same widget values, same links, same titles (the UI graph read as the frontend's Run reads a
    plain graph; frontend-only nodes such as the note are not part of a prompt)."""
    ui, api = load(ui_file), load(api_twin(ui_file))
    object_info = comfy_client.object_info()
    assert ui_to_api(ui, object_info) == strip_meta(api)
    titles = {str(n["id"]): n["title"] for n in ui["nodes"] if n["type"] in object_info}
    assert titles == {i: n["_meta"]["title"] for i, n in api.items()}


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_ui_graph_is_what_the_builder_makes_of_its_api_graph(ui_file, comfy_client):
    """Nothing in a UI graph is edited by hand (the note, model links, groups and layout come from
    scripts/make_examples.py), so a change to an API graph shows up here until the examples are rebuilt."""
    ui, api = load(ui_file), load(api_twin(ui_file))
    extra = EXAMPLES[api_twin(ui_file).stem]
    sizes = {n["id"]: tuple(n["size"]) for n in ui["nodes"]}
    assert build(api, comfy_client.object_info(), note_text(api, extra), sizes) == ui, \
        f"{ui_file.name} is out of date: run scripts/make_examples.py"


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_layout_is_readable(ui_file):
    """No overlapping nodes (title bar, widgets and previews included: sizes measured in the frontend, checked live
    in test_workflows_browser.py), every node in its stage's group, links left to right, distinct titles."""
    ui = load(ui_file)
    problems = layout_problems(ui)
    assert not problems, "\n".join(problems)
    stages = set(stage_of(load(api_twin(ui_file))).values()) | {"model"}  # the note starts every graph
    assert [g["title"] for g in ui["groups"]] == [title for stage, (title, _) in STAGES.items() if stage in stages]


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_graph_runs_once_a_checkpoint_is_picked(ui_file):
    """A note says what to pick and upload; the loaders name the standard files with the links the missing-model
    dialog downloads from; every image a graph names ships with the pack (and lands in the input folder); every face
    crop is previewed."""
    import example_inputs

    ui = load(ui_file)
    notes = [n for n in ui["nodes"] if n["type"] == NOTE_TYPE]
    note = notes[0]["widgets_values"][0] if len(notes) == 1 else ""
    assert "Load Checkpoint" in note or "Load Diffusion Model" in note
    for node in ui["nodes"]:
        if node["type"] in LOADERS:
            named = node["widgets_values"][:MODEL_WIDGETS.get(node["type"], 1)]
            assert node["properties"]["models"] == [MODELS[name] for name in dict.fromkeys(named)]
            for model in node["properties"]["models"]:
                assert f"[{model['name']}]({model['url']})" in note or node["type"] == "ControlNetLoader"
                assert model["url"].startswith(DOWNLOAD_PREFIXES), model["url"]
                assert model["url"].split("?")[0].endswith(MODEL_SUFFIXES), model["url"]
                assert model["url"].split("?")[0].endswith("/" + model["name"]), model["url"]
        if node["type"] == "LoadImage":
            assert node["widgets_values"][0] in example_inputs.EXAMPLE_INPUTS, node["widgets_values"]
        if node["type"] == "InvAdapterFaceCrop":
            crops = node["outputs"][0]
            targets = [next(n for n in ui["nodes"] if any(i.get("link") == link for i in n.get("inputs", [])))
                       for link in crops["links"]]
            assert "PreviewImage" in [t["type"] for t in targets], f"{node['title']}: its crops are not previewed"
    assert {"CheckpointLoaderSimple", "UNETLoader"} & {n["type"] for n in ui["nodes"]}


@pytest.mark.parametrize("name", sorted(NOT_RUN_HERE))
def test_a_template_no_test_server_runs_is_refused_only_for_its_model_files(comfy_client, name):
    """What the tests cannot run here (NOT_RUN_HERE says why) still meets the real server's validation: every input
    of every node is accepted but the standard model files it names, which this server does not have."""
    from comfy_client import PromptRejected

    prompt = load_workflow(name, smoke=False)
    with pytest.raises(PromptRejected) as rejected:
        comfy_client.queue(prompt)
    refused = {(node_id, error["type"], error["extra_info"].get("input_name"))
               for node_id, found in rejected.value.node_errors.items() for error in found["errors"]}
    expected = {(node_id, "value_not_in_list", field) for node_id, node in prompt.items()
                for loader, field in LOADERS.items() if node["class_type"] == loader
                for field in (field, "clip_name2")[:MODEL_WIDGETS.get(loader, 1)]}
    assert refused == expected and expected


def test_shipped_images_are_in_assets():
    import example_inputs

    for asset in example_inputs.EXAMPLE_INPUTS.values():
        assert (ROOT / "assets" / asset).is_file(), asset
        assert asset in (ROOT / "assets" / "README.md").read_text(), f"assets/README.md: say where {asset} comes from"


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_note_says_where_the_help_is_and_what_to_run_first(ui_file):
    """The help pages are under the node's (i) Node Info button, Info tab, in this frontend (1.47); a graph that
    loads a saved identity names the template that saves one."""
    (note,) = [n["widgets_values"][0] for n in load(ui_file)["nodes"] if n["type"] == NOTE_TYPE]
    assert "**(i) Node Info**" in note and "**Info** tab" in note and "node library" not in note
    api = load(api_twin(ui_file))
    if any(n["class_type"] == "InvAdapterLoadReference" for n in api.values()):
        saver = example_file("save_reference").stem  # "03 - Save an identity"
        number, title = saver.split(" - ")
        assert f"template {number} ({title})" in note, note
        saved = [n["inputs"]["name"] for n in load_api("save_reference").values()
                 if n["class_type"] == "InvAdapterSaveReference"]
        loaded = [n["inputs"]["reference_name"] for n in api.values() if n["class_type"] == "InvAdapterLoadReference"]
        assert loaded == [f"{saved[0]}.safetensors"] and f"`models/invadapter_references/{loaded[0]}`" in note


@pytest.mark.parametrize("api_file", sorted(API_WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_strengths_match_what_the_adapter_can_do(api_file):
    """'init from model' has no cross-attention adapter, so weight_cross does nothing with it: the templates set 0
    there (and a trained file's template a strength that acts)."""
    api = load(api_file)
    adapters = {i: n["inputs"]["adapter_name"] for i, n in api.items() if n["class_type"] == "InvAdapterLoader"}
    for node in api.values():
        if node["class_type"] == "InvAdapterApply":
            trained = adapters[node["inputs"]["invadapter"][0]] != "init from model"
            assert (node["inputs"]["weight_cross"] > 0) == trained, (node["_meta"]["title"], adapters)


def test_two_people_ships_two_people():
    """Two different photos (the same one twice would be one reference applied twice: the later application
    replaces the earlier)."""
    import example_inputs

    api = load_api("two_people")
    photos = [n["inputs"]["image"] for n in api.values() if n["class_type"] == "LoadImage"]
    assert len(photos) == 2 and len(set(photos)) == 2, photos
    files = [(ROOT / "assets" / example_inputs.EXAMPLE_INPUTS[p]).read_bytes() for p in photos]
    assert files[0] != files[1]


def test_shipped_images_are_small():
    import example_inputs

    for asset in example_inputs.EXAMPLE_INPUTS.values():
        assert (ROOT / "assets" / asset).stat().st_size < 200_000, asset


def load_api(name):
    return load(API_WORKFLOWS / f"{name}.json")
