"""Builds example_workflows/ from workflows/api/: the UI graphs ComfyUI's template browser lists, and their thumbnails.

    .venv/bin/python scripts/make_examples.py            # all of them (a few minutes on a CPU)
    .venv/bin/python scripts/make_examples.py basic      # one

For each API graph, in the order a newcomer should meet them (EXAMPLES): the UI graph gets a note saying what to pick
and upload, the download links ComfyUI's missing-model dialog offers (node ``properties.models``), one group per
stage and a left-to-right layout (scripts/workflow_layout.py) with node sizes measured in the real frontend
(headless Chromium on a real server with the random-weight test checkpoint). Then the graph runs there, with the
checkpoint picked (the one edit a user makes) and shrunk to a CPU smoke run, and the thumbnail NN_<name>.jpg is a
screenshot of the graph as it ran (test checkpoint, smoke sizes): the face crops are the real ones; the generated
images are noise, because no real weights ship with the pack.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
from support import host  # noqa: E402
from support.browser import frontend_page, run_graph  # noqa: E402
from support.fixtures import test_files  # noqa: E402
from support.graphs import API_WORKFLOWS, EXAMPLE_WORKFLOWS, smoke_edits, user_edits  # noqa: E402
from support.server import ComfyServer  # noqa: E402
from workflow_layout import STAGES, fit_view, place, stage_of  # noqa: E402
from workflow_ui import api_to_ui  # noqa: E402

# The standard files the graphs name, and where ComfyUI's missing-model dialog downloads them from (by file name).
HF = "https://huggingface.co"
MODELS = {name: {"name": name, "directory": folder, "url": f"{HF}/{repo}/resolve/main/{name}?download=true"}
          for name, folder, repo in (
              ("v1-5-pruned-emaonly-fp16.safetensors", "checkpoints", "Comfy-Org/stable-diffusion-v1-5-archive"),
              ("control_v11p_sd15_openpose_fp16.safetensors", "controlnet",
               "comfyanonymous/ControlNet-v1-1_fp16_safetensors"),
              ("sd_xl_base_1.0.safetensors", "checkpoints", "stabilityai/stable-diffusion-xl-base-1.0"),
              ("OpenPoseXL2.safetensors", "controlnet", "thibaud/controlnet-openpose-sdxl-1.0"))}
SDXL_FILES = {"sd_xl_base_1.0.safetensors", "OpenPoseXL2.safetensors"}
LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "ControlNetLoader": "control_net_name"}
# (workflows/api/<name>.json, what its note adds to the common steps), in the order a newcomer meets them.
EXAMPLES = [
    ("basic", "The face photo is cropped, inverted with your checkpoint into an identity reference, and that "
              "identity is applied to the generation. Edit the caption to describe your photo, and the positive "
              "prompt to say what the person should become."),
    ("controlnet", "The same, with the pose taken from an OpenPose skeleton (the shipped "
                   "`invadapter_example_pose.png`, or your own)."),
    ("save_reference", "Encodes the face once and saves it to `models/invadapter_references/my_identity.safetensors`; "
                       "`04_from_saved_reference` then uses it without the photo."),
    ("from_saved_reference", "Run `03_save_reference` first (or pick another saved identity in **Load Reference**)."),
    ("two_photos", "Two photos of one person make one, steadier identity: upload a second photo of the same person "
                   "into **Face photo 2**."),
    ("coarse_vs_fine", "The same identity applied only in the coarse levels (face shape, layout) and only in the "
                       "fine levels (texture, skin, eyes), side by side."),
    ("two_people", "Two identities in one image, each confined to half of it by a mask: upload the second person "
                   "into **Face photo (person 2)**."),
    ("attention_maps", "Also shows where the generation looks in the face and where the face acts on the image."),
    ("sdxl_basic", "The first graph for SDXL-family checkpoints (SDXL 1.0 fine-tunes, Pony, Illustrious, SSD-1B, "
                   "Segmind Vega): the reference is encoded at the family's 1024 px, and its caption's pooled output "
                   "and size condition the reference passes."),
    ("sdxl_controlnet", "SDXL with the pose from an OpenPose skeleton (an SDXL OpenPose ControlNet)."),
]
NOTE_TYPE = "MarkdownNote"
# Width and height a node gets at least (the frontend's own minimum, measured, wins when larger).
PREFERRED = {"CLIPTextEncode": (400, 120), NOTE_TYPE: (440, 0), "LoadImage": (320, 420), "PreviewImage": (320, 360),
             "SaveImage": (360, 380), "ImageStitch": (320, 0)}
DEFAULT_WIDTH = 320
THUMBNAIL_SIDE = 512  # the template browser shows thumbnails in square cards
THUMBNAIL_VIEWPORT = 1400  # the browser window the screenshot is taken in (square)
BACKGROUND = (32, 32, 32)  # around the screenshots in a thumbnail (the dark theme's canvas)
# no minimap or frame counter over the graph; nodes drawn in full detail however small
SCREENSHOT_SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
                       "LiteGraph.Canvas.MinFontSizeForLOD": 0}
THUMBNAIL_MAX_BYTES = 150_000


def ui_name(index: int, name: str) -> str:
    return f"{index + 1:02d}_{name}"


def loader_file(api: dict, class_type: str) -> str | None:
    """The file the graph's loader of ``class_type`` names (None without one)."""
    return next((n["inputs"][LOADERS[class_type]] for n in api.values() if n["class_type"] == class_type), None)


def note_text(api: dict, extra: str) -> str:
    kinds = [n["class_type"] for n in api.values()]
    checkpoint = MODELS[loader_file(api, "CheckpointLoaderSimple")]
    family = "SDXL-family" if checkpoint["name"] in SDXL_FILES else "SD1.5"
    steps = [f"**Load Checkpoint**: pick your {family} checkpoint (community models work). None yet? Download "
             f"[{checkpoint['name']}]({checkpoint['url']}) into `models/{checkpoint['directory']}`."]
    if "ControlNetLoader" in kinds:
        control = MODELS[loader_file(api, "ControlNetLoader")]
        steps.append(f"**Load ControlNet**: an {family.removesuffix('-family')} OpenPose ControlNet, e.g. "
                     f"[{control['name']}]({control['url']}) in `models/{control['directory']}`.")
    if "InvAdapterFaceCrop" in kinds:
        steps.append("**Face photo**: upload a photo of the person (one clear face). The shipped "
                     "`invadapter_example_face.png` (a public-domain NASA portrait) lets the graph run as it is.")
    steps.append("Press **Run**. The first run inverts the photo (one model pass per step, with a progress bar); "
                 "later runs reuse it." if "InvAdapterEncodeReference" in kinds else "Press **Run**.")
    lines = ["## Start here", ""] + [f"{i + 1}. {step}" for i, step in enumerate(steps)] + ["", extra, "",
             "Help on any node: select it and open the node library's help (every Inv-Adapter node has a page)."]
    return "\n".join(lines)


def build(api: dict, object_info: dict, note: str, sizes: dict[int, tuple[float, float]] | None = None) -> dict:
    """The UI graph of ``api``: its nodes, a note, model links, groups and a layout for the given node sizes."""
    ui = api_to_ui(api, object_info)
    note_id = max(n["id"] for n in ui["nodes"]) + 1
    ui["nodes"].append({"id": note_id, "type": NOTE_TYPE, "pos": [0, 0], "size": [DEFAULT_WIDTH, 200], "flags": {},
                        "order": len(ui["nodes"]), "mode": 0, "inputs": [], "outputs": [], "title": "Start here",
                        "properties": {}, "widgets_values": [note], "color": "#432", "bgcolor": "#653"})
    ui["last_node_id"] = note_id
    for node in ui["nodes"]:
        if node["type"] in LOADERS and node["widgets_values"][0] in MODELS:
            node["properties"]["models"] = [MODELS[node["widgets_values"][0]]]
    stages = {int(i): stage for i, stage in stage_of(api).items()}
    stages[note_id] = "model"
    sizes = sizes or {}
    place(ui, stages, {n["id"]: sizes.get(n["id"], (DEFAULT_WIDTH, 200)) for n in ui["nodes"]})
    fit_view(ui, 1600, 900)
    return ui


def measured_sizes(page, ui: dict) -> dict[int, tuple[float, float]]:
    """Each node's size: the frontend's minimum for its widgets and previews (computeSize, after the run drew the
    previews), raised to PREFERRED."""
    minimum = page.evaluate("() => Object.fromEntries(window.app.graph._nodes.map(n => [n.id, n.computeSize()]))")
    sizes = {}
    for node in ui["nodes"]:
        width, height = PREFERRED.get(node["type"], (DEFAULT_WIDTH, 0))
        min_w, min_h = minimum[str(node["id"])]
        if node["type"] == NOTE_TYPE:
            height = note_height(node["widgets_values"][0], max(width, min_w))
        sizes[node["id"]] = (max(width, min_w), max(height, min_h))
    return sizes


def note_height(text: str, width: float) -> float:
    """Room for the note's rendered markdown (about 7.2 px per character, 21 px per line, headings taller)."""
    per_line = max(int((width - 30) / 7.2), 1)
    lines = sum(max(1, -(-len(line) // per_line)) for line in text.splitlines())
    return 60 + 21 * lines


def screenshot(page, box: list[float], width: int, height: int) -> Image.Image:
    """The canvas showing the graph area ``box`` ([x, y, w, h]) fitted into width x height pixels (centred), taken
    away from the window's corners (focus mode's exit button, the zoom controls)."""
    border = 60
    scale = min(width / box[2], height / box[3])
    offset = [(border + (width - box[2] * scale) / 2) / scale - box[0],
              (border + (height - box[3] * scale) / 2) / scale - box[1]]
    page.evaluate("""([scale, offset]) => {
        const canvas = window.app.canvas;
        canvas.ds.scale = scale;
        canvas.ds.offset = offset;
        for (const node of window.app.graph._nodes) node.has_errors = false;  // the shipped model names' red marks
        canvas.setDirty(true, true);
        canvas.draw(true, true);
    }""", [scale, offset])
    page.wait_for_timeout(800)
    png = page.screenshot(clip={"x": border, "y": border, "width": width, "height": height})
    return Image.open(io.BytesIO(png)).convert("RGB")


def thumbnail(page, ui: dict, path: Path) -> int:
    """A square JPEG (within THUMBNAIL_MAX_BYTES) of the graph as it ran: the whole graph on top (graphs are wide),
    and below it the photo and identity stages close enough to see the face crop."""
    def union(boxes):
        left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
        return [left, top, max(b[0] + b[2] for b in boxes) - left, max(b[1] + b[3] for b in boxes) - top]

    groups = {g["title"]: g["bounding"] for g in ui["groups"]}
    whole = union(list(groups.values()))
    first_stages = union([groups[title] for stage, (title, _) in STAGES.items()
                          if stage != "generation" and title in groups] or list(groups.values()))
    room = THUMBNAIL_VIEWPORT - 120
    heights = [min(room * box[3] / box[2], room / 2) for box in (whole, first_stages)]
    top = int((room - sum(heights)) / 2)
    image = Image.new("RGB", (room, room), BACKGROUND)
    for box, height in zip((whole, first_stages), heights):
        image.paste(screenshot(page, box, room, int(height)), (0, top))
        top += int(height)
    image = image.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.LANCZOS)
    for quality in (85, 75, 65, 55, 45):
        data = io.BytesIO()
        image.save(data, "JPEG", quality=quality, optimize=True)
        if data.tell() <= THUMBNAIL_MAX_BYTES:
            break
    path.write_bytes(data.getvalue())
    return data.tell()


def make(page, index: int, name: str, extra: str, object_info: dict) -> None:
    api = json.loads((API_WORKFLOWS / f"{name}.json").read_text())
    note = note_text(api, extra)
    edits = smoke_edits(api, user_edits(api))
    provisional = build(api, object_info, note)
    first = run_graph(page, provisional, edits)
    if first["status"] != "success":
        raise RuntimeError(f"{name}: the smoke run failed in the frontend: {first}")
    ui = build(api, object_info, note, measured_sizes(page, provisional))
    out = EXAMPLE_WORKFLOWS / f"{ui_name(index, name)}.json"
    out.write_text(json.dumps(ui, indent=1) + "\n")
    # the crops at their shipped size (cheap), so the thumbnail shows them sharp; the rest stays a smoke run
    second = run_graph(page, ui, {i: {k: v for k, v in values.items() if api[i]["class_type"] != "InvAdapterFaceCrop"}
                                  for i, values in edits.items()})
    if second["status"] != "success":
        raise RuntimeError(f"{name}: the smoke run of the final graph failed: {second}")
    size = thumbnail(page, ui, out.with_suffix(".jpg"))
    print(f"{out} and its thumbnail ({size / 1000:.0f} kB)", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="workflows/api/<name>.json to build (default: all)")
    args = parser.parse_args()
    unknown = set(args.names) - {name for name, _ in EXAMPLES}
    if unknown:
        parser.error(f"not in EXAMPLES: {sorted(unknown)}")
    host.import_comfy_cpu()  # only used if the test checkpoint has to be generated
    EXAMPLE_WORKFLOWS.mkdir(exist_ok=True)
    with ComfyServer(models=test_files()) as server:
        object_info = server.client.object_info()
        with frontend_page(server.url, viewport=(THUMBNAIL_VIEWPORT, THUMBNAIL_VIEWPORT), settings=SCREENSHOT_SETTINGS) \
                as page:
            page.evaluate("() => { window.app.extensionManager.focusMode = true; }")  # no menus over the canvas
            for index, (name, extra) in enumerate(EXAMPLES):
                if not args.names or name in args.names:
                    make(page, index, name, extra, object_info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
