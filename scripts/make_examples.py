"""Builds example_workflows/ from workflows/api/: the UI graphs ComfyUI's template browser lists, and their thumbnails.

    .venv/bin/python scripts/make_examples.py            # all of them (several minutes on a CPU)
    .venv/bin/python scripts/make_examples.py basic      # one

For each API graph, in the order a newcomer should meet them (support.graphs.TEMPLATES, which also gives the file
name the browser shows as the card's title): the UI graph gets a note saying what to pick and upload, the download
links ComfyUI's missing-model dialog offers (node ``properties.models``), one group per stage and a left-to-right
layout (scripts/workflow_layout.py) with node sizes measured in the real frontend (headless Chromium on a real server
with the random-weight test checkpoint; the note's height is its rendered text's), and opens at a zoom where text is
drawn. Then the graph runs there, with the checkpoint picked (the one edit a user makes) and shrunk to a CPU smoke
run, and the thumbnail "NN - <title>.jpg" is one screenshot of the part of the graph that makes the template what it
is, as it ran (test checkpoint, smoke sizes): the face crops are the real ones; generated images are noise, because no
real weights ship with the pack.
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
from support.graphs import (API_WORKFLOWS, EXAMPLE_WORKFLOWS, NOT_RUN_HERE, TEMPLATES, example_file,  # noqa: E402
                            smoke_edits, user_edits)
from support.server import ComfyServer  # noqa: E402
from workflow_layout import node_rect, open_view, place, stage_of  # noqa: E402
from workflow_ui import api_to_ui  # noqa: E402

# The standard files the graphs name, and where ComfyUI's missing-model dialog downloads them from (by file name).
HF = "https://huggingface.co"
# (file, model folder, Hugging Face repository[, folder inside it])
MODELS = {entry[0]: {"name": entry[0], "directory": entry[1],
                     "url": f"{HF}/{entry[2]}/resolve/main/{entry[3] if len(entry) > 3 else ''}{entry[0]}?download=true"}
          for entry in (
              ("v1-5-pruned-emaonly-fp16.safetensors", "checkpoints", "Comfy-Org/stable-diffusion-v1-5-archive"),
              ("control_v11p_sd15_openpose_fp16.safetensors", "controlnet",
               "comfyanonymous/ControlNet-v1-1_fp16_safetensors"),
              ("sd_xl_base_1.0.safetensors", "checkpoints", "stabilityai/stable-diffusion-xl-base-1.0"),
              ("OpenPoseXL2.safetensors", "controlnet", "thibaud/controlnet-openpose-sdxl-1.0"),
              ("flux1-dev.safetensors", "diffusion_models", "black-forest-labs/FLUX.1-dev"),
              ("t5xxl_fp16.safetensors", "text_encoders", "comfyanonymous/flux_text_encoders"),
              ("clip_l.safetensors", "text_encoders", "comfyanonymous/flux_text_encoders"),
              ("ae.safetensors", "vae", "black-forest-labs/FLUX.1-schnell"),
              ("diffusion_pytorch_model.safetensors", "controlnet", "Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro"),
              ("Chroma1-HD.safetensors", "diffusion_models", "lodestones/Chroma1-HD"),
              ("qwen_image_fp8_e4m3fn.safetensors", "diffusion_models", "Comfy-Org/Qwen-Image_ComfyUI",
               "split_files/diffusion_models/"),
              ("qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders", "Comfy-Org/Qwen-Image_ComfyUI",
               "split_files/text_encoders/"),
              ("qwen_image_vae.safetensors", "vae", "Comfy-Org/Qwen-Image_ComfyUI", "split_files/vae/"))}
SDXL_FILES = {"sd_xl_base_1.0.safetensors", "OpenPoseXL2.safetensors"}
LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "ControlNetLoader": "control_net_name", "UNETLoader": "unet_name",
           "VAELoader": "vae_name", "DualCLIPLoader": "clip_name1", "CLIPLoader": "clip_name"}
MODEL_WIDGETS = {"DualCLIPLoader": 2}  # loaders with more than one file (the first N widgets name them)
# workflows/api/<name>.json -> what its note adds to the common steps (support.graphs.TEMPLATES orders them)
EXAMPLES = {
    "basic": "The face photo is cropped, inverted with your checkpoint into an identity reference, and that identity "
             "is applied to the generation. Edit the caption to describe your photo, and the positive prompt to say "
             "what the person should become.",
    "controlnet": "The same, with the pose taken from an OpenPose skeleton (the shipped "
                  "`invadapter_example_pose.png`, or your own).",
    "save_reference": "Encodes the face once and saves it to "
                      "`models/invadapter_references/my_identity.safetensors`; template 04 then uses it without the "
                      "photo and without the inversion.",
    "from_saved_reference": "**Run template 03 (Save an identity) first**: it writes "
                            "`models/invadapter_references/my_identity.safetensors`, the file **Load Reference** "
                            "names. Until then ComfyUI lists that file as a missing model: there is nothing to "
                            "download, 03 makes it. Any other saved identity can be picked in **Load Reference**.",
    "two_photos": "Two photos of one person make one, steadier identity: upload a second photo of the same person "
                  "into **Face photo 2**.",
    "best_of_n": "Generates 4 candidates (batch_size in **Empty Latent Image**), scores each against the face photo "
                 "with **Face Similarity** and saves the most alike (**Select Best**); the preview shows every "
                 "candidate with its score. Scoring needs InsightFace or dlib: `pip install dlib-bin "
                 "face-recognition-models`.",
    "cond_only": "apply_to **cond only**: the identity acts on the positive prompt's pass only and the negative "
                 "pass stays the plain model, so CFG pushes towards the identity (a stronger likeness than 01; "
                 "lower weight_self or cfg if it overshoots).",
    "lora": "A LoRA (style or subject) changes the model before the identity is applied; the reference is encoded "
            "with the same LoRA'd model, so its kept features are reused as they are.",
    "coarse_vs_fine": "The same identity applied only in the coarse levels (face shape, layout) and only in the fine "
                      "levels (texture, skin, eyes), side by side.",
    "two_people": "Two identities in one image, each confined to half of it by a mask: the shipped examples are two "
                  "different people; upload yours into **Face photo (person 1)** and **Face photo (person 2)**.",
    "attention_maps": "Also shows where the generation looks in the face and where the face acts on the image.",
    "trained_adapter": "Uses adapter weights you trained (docs/training.md: the trainer writes "
                       "`invadapter.safetensors`; copy it into `models/invadapter/`). Encode the reference at the "
                       "resolution it was trained at. Trained weights have a cross-attention adapter, so weight_cross "
                       "acts here (with 'init from model' it does nothing).",
    "sdxl_basic": "The first graph for SDXL-family checkpoints (SDXL 1.0 fine-tunes, Pony, Illustrious, SSD-1B, "
                  "Segmind Vega): the reference is encoded at the family's 1024 px, and its caption's pooled output "
                  "and size condition the reference passes.",
    "sdxl_controlnet": "SDXL with the pose from an OpenPose skeleton (an SDXL OpenPose ControlNet).",
    "flux_basic": "The first graph for Flux.1 (dev, schnell, fine-tunes): the face is inverted with Flux's own flow "
                  "schedule at 512 px and the identity acts inside Flux's joint attention on the image's tokens "
                  "('rows' and 'reference_positions' on **Inv-Adapter Apply** act on Flux only). Flux-dev samples at "
                  "cfg 1 with **FluxGuidance**; for schnell use 4 steps in both **Encode Reference** and "
                  "**KSampler**.",
    "flux_controlnet": "Flux with the pose from an OpenPose skeleton (the shipped `invadapter_example_pose.png`, or "
                       "your own) through a Flux ControlNet; the identity acts inside Flux's attention beside it.",
    "chroma_basic": "Chroma (Chroma1-HD, Chroma1-Base and their fine-tunes): Flux's blocks, served like Flux. The face "
                    "is inverted with Chroma's own flow schedule at 512 px (no guidance embedding: Chroma samples "
                    "with a real negative prompt at cfg about 4).",
    "qwen_image_basic": "Qwen-Image: the face is inverted with the model's own flow schedule (after "
                        "**ModelSamplingAuraFlow**, which feeds both the reference and the generation) and the "
                        "identity acts inside Qwen-Image's joint attention on the image's tokens. It needs about "
                        "20 GB of GPU memory in fp8 plus the reference's features (README, memory table).",
}
# What each thumbnail shows: the nodes (by title prefix) that make the template what it is, close enough to read.
FOCUS = {
    "basic": ("Face Crop", "Face crop preview"),
    "controlnet": ("Load ControlNet", "Control image"),
    "save_reference": ("Encode Reference", "Save Reference"),
    "from_saved_reference": ("Load Reference", "Inv-Adapter Apply"),
    "two_photos": ("Face crop preview",),
    "best_of_n": ("Face Similarity", "Select Best", "Every candidate"),
    "cond_only": ("Inv-Adapter Apply",),
    "lora": ("Load LoRA", "Load Checkpoint"),
    "coarse_vs_fine": ("Block Weights", "Inv-Adapter Apply"),
    "two_people": ("Face crop preview",),
    "attention_maps": ("Inv-Adapter Attention Maps", "Where the"),
    "trained_adapter": ("Inv-Adapter Loader", "Inv-Adapter Apply"),
    "sdxl_basic": ("Face Crop", "Face crop preview"),
    "sdxl_controlnet": ("Load ControlNet", "Control image"),
    "flux_basic": ("Inv-Adapter Apply",),  # its MM-DiT options (rows, reference_positions)
    "flux_controlnet": ("Load ControlNet", "Control image"),
    "chroma_basic": ("Inv-Adapter Apply", "Positive prompt", "Negative prompt"),  # a real negative prompt
    "qwen_image_basic": ("Load Diffusion Model", "ModelSamplingAuraFlow"),  # the shift feeds reference and generation
}
NOTE_TYPE = "MarkdownNote"
# Width and height a node gets at least (the frontend's own minimum, measured, wins when larger).
PREFERRED = {"CLIPTextEncode": (400, 120), NOTE_TYPE: (440, 0), "LoadImage": (320, 420), "PreviewImage": (320, 360),
             "SaveImage": (360, 380), "ImageStitch": (320, 0)}
DEFAULT_WIDTH = 320
THUMBNAIL_SIDE = 512  # the template browser shows thumbnails in square cards
THUMBNAIL_VIEWPORT = 1400  # the browser window the screenshot is taken in (square)
THUMBNAIL_MIN_SIDE = 560  # screen pixels: a smaller view is widened around its centre (less blur when scaled down)
NOTE_SLACK = 12  # pixels below the note's text (at 100 %)
# no minimap or frame counter over the graph; nodes drawn in full detail however small
SCREENSHOT_SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
                       "LiteGraph.Canvas.MinFontSizeForLOD": 0}
THUMBNAIL_MAX_BYTES = 150_000


def loader_file(api: dict, class_type: str) -> str | None:
    """The file the graph's loader of ``class_type`` names (None without one)."""
    return next((n["inputs"][LOADERS[class_type]] for n in api.values() if n["class_type"] == class_type), None)


def link(name: str) -> str:
    model = MODELS[name]
    return f"[{name}]({model['url']}) into `models/{model['directory']}`"


# The diffusion model's family, by the standard file a UNETLoader graph names: (name in the note, what to pick).
DIT_FAMILIES = {"flux1-dev.safetensors": ("Flux", "your Flux.1 model (dev, schnell or a fine-tune; fp8 and GGUF work)"),
                "Chroma1-HD.safetensors": ("Chroma", "your Chroma model (Chroma1-HD, Chroma1-Base or a fine-tune)"),
                "qwen_image_fp8_e4m3fn.safetensors": ("Qwen-Image", "your Qwen-Image model (fp8 or bf16)")}


def dit_steps(api: dict) -> tuple[list[str], str]:
    """The loaders of an MM-DiT graph (diffusion model, text encoders, VAE, with their downloads) and its family."""
    unet = loader_file(api, "UNETLoader")
    family, pick = DIT_FAMILIES[unet]
    licence = " (accept its licence on Hugging Face first)" if family == "Flux" else ""
    steps = [f"**Load Diffusion Model**: pick {pick}. None yet? Download {link(unet)}{licence}."]
    dual = next((n["inputs"] for n in api.values() if n["class_type"] == "DualCLIPLoader"), None)
    single = next((n["inputs"] for n in api.values() if n["class_type"] == "CLIPLoader"), None)
    if dual is not None:
        steps.append(f"**DualCLIPLoader** (type {dual['type']}): {link(dual['clip_name1'])} and "
                     f"{link(dual['clip_name2'])}.")
    if single is not None:
        steps.append(f"**Load CLIP** (type {single['type']}): {link(single['clip_name'])}.")
    steps.append(f"**Load VAE**: {link(loader_file(api, 'VAELoader'))}.")
    return steps, family


def note_text(api: dict, extra: str) -> str:
    kinds = [n["class_type"] for n in api.values()]
    if "UNETLoader" in kinds:
        steps, family = dit_steps(api)
    else:
        checkpoint = MODELS[loader_file(api, "CheckpointLoaderSimple")]
        family = "SDXL-family" if checkpoint["name"] in SDXL_FILES else "SD1.5"
        steps = [f"**Load Checkpoint**: pick your {family} checkpoint (community models work). None yet? Download "
                 f"[{checkpoint['name']}]({checkpoint['url']}) into `models/{checkpoint['directory']}`."]
    if "ControlNetLoader" in kinds and family == "Flux":
        steps.append(f"**Load ControlNet**: a Flux.1-dev ControlNet that takes an OpenPose skeleton, e.g. "
                     f"Shakker-Labs' union ControlNet {link(loader_file(api, 'ControlNetLoader'))}.")
    elif "ControlNetLoader" in kinds:
        control = MODELS[loader_file(api, "ControlNetLoader")]
        steps.append(f"**Load ControlNet**: an {family.removesuffix('-family')} OpenPose ControlNet, e.g. "
                     f"[{control['name']}]({control['url']}) in `models/{control['directory']}`.")
    if "LoraLoader" in kinds:
        steps.append(f"**Load LoRA**: pick an {family} LoRA from `models/loras`.")
    adapters = [n["inputs"]["adapter_name"] for n in api.values() if n["class_type"] == "InvAdapterLoader"]
    if any(name != "init from model" for name in adapters):
        steps.append("**Inv-Adapter Loader**: pick your trained weights from `models/invadapter`.")
    if "InvAdapterFaceCrop" in kinds:
        steps.append("**Face photo**: upload a photo of the person (one clear face). The shipped example "
                     "(a public-domain portrait) lets the graph run as it is.")
    steps.append("Press **Run**. The first run inverts the photo (one model pass per step, with a progress bar); "
                 "later runs reuse it." if "InvAdapterEncodeReference" in kinds else "Press **Run**.")
    lines = ["## Start here", ""] + [f"{i + 1}. {step}" for i, step in enumerate(steps)] + ["", extra, "",
             "Help on a node: select it, click the **(i) Node Info** button above it, **Info** tab (every "
             "Inv-Adapter node has a page)."]
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
        named = node["widgets_values"][:MODEL_WIDGETS.get(node["type"], 1)] if node["type"] in LOADERS else []
        if named and all(name in MODELS for name in named):
            node["properties"]["models"] = [MODELS[name] for name in dict.fromkeys(named)]
    stages = {int(i): stage for i, stage in stage_of(api).items()}
    stages[note_id] = "model"
    sizes = sizes or {}
    place(ui, stages, {n["id"]: sizes.get(n["id"], (DEFAULT_WIDTH, 200)) for n in ui["nodes"]})
    open_view(ui, 1600, 1000)
    return ui


def measured_sizes(page, ui: dict) -> dict[int, tuple[float, float]]:
    """Each node's size: the frontend's minimum for its widgets and previews (computeSize, after the run drew the
    previews), raised to PREFERRED; the note's height is what its rendered text needs (note_height)."""
    minimum = page.evaluate("() => Object.fromEntries(window.app.graph._nodes.map(n => [n.id, n.computeSize()]))")
    sizes = {}
    for node in ui["nodes"]:
        width, height = PREFERRED.get(node["type"], (DEFAULT_WIDTH, 0))
        min_w, min_h = minimum[str(node["id"])]
        if node["type"] == NOTE_TYPE:
            height = note_height(page, node["id"], max(width, min_w))
        sizes[node["id"]] = (max(width, min_w), max(height, min_h))
    return sizes


# The rendered note at 100 % zoom for a node of the given size: [text height, height of the box shown] (the markdown
# editor scrolls when its text is taller than the box).
NOTE_HEIGHTS = """async ([id, size]) => {
    const note = window.app.graph.getNodeById(id);
    note.setSize(size);
    const canvas = window.app.canvas;
    canvas.ds.scale = 1;
    canvas.ds.offset = [100 - note.pos[0], 100 - note.pos[1]];
    canvas.setDirty(true, true);
    canvas.draw(true, true);
    await new Promise(r => setTimeout(r, 800));  // DOM widgets follow the canvas on the next frames
    const shown = note.widgets[0].element.querySelector(".ProseMirror");  // the rendered markdown
    return [shown.scrollHeight, shown.clientHeight];
}"""


def note_height(page, note_id: int, width: float) -> float:
    """The note's node height that shows all its text with NOTE_SLACK to spare, measured in the frontend: with a
    box too small for the text the editor's scroll height is the text's."""
    text, _ = page.evaluate(NOTE_HEIGHTS, [note_id, [width, 60]])
    _, shown = page.evaluate(NOTE_HEIGHTS, [note_id, [width, 1000]])
    return text + NOTE_SLACK + (1000 - shown)  # the node's height around the editor: 1000 - shown


def screenshot(page, box: list[float], side: int) -> Image.Image:
    """The canvas showing the graph area ``box`` ([x, y, w, h]) centred in a side x side square at up to 100 %,
    taken away from the window's corners (focus mode's exit button, the zoom controls)."""
    border = (THUMBNAIL_VIEWPORT - side) / 2
    scale = min(1.0, side / box[2], side / box[3])
    shown = max(box[2] * scale, box[3] * scale, THUMBNAIL_MIN_SIDE)  # the square that is cut out
    offset = [(border + side / 2) / scale - (box[0] + box[2] / 2), (border + side / 2) / scale - (box[1] + box[3] / 2)]
    page.evaluate("""([scale, offset]) => {
        const canvas = window.app.canvas;
        canvas.ds.scale = scale;
        canvas.ds.offset = offset;
        for (const node of window.app.graph._nodes) node.has_errors = false;  // the shipped model names' red marks
        canvas.setDirty(true, true);
        canvas.draw(true, true);
    }""", [scale, offset])
    page.wait_for_timeout(800)
    centre = border + side / 2
    png = page.screenshot(clip={"x": centre - shown / 2, "y": centre - shown / 2, "width": shown, "height": shown})
    return Image.open(io.BytesIO(png)).convert("RGB")


def focus(ui: dict, name: str) -> list[float]:
    """The box [x, y, w, h] around the nodes FOCUS names for this template."""
    rects = [node_rect(n) for n in ui["nodes"] if n.get("title", "").startswith(FOCUS[name])]
    if not rects:
        raise ValueError(f"{name}: no node's title starts with any of {FOCUS[name]} (make_examples.FOCUS)")
    left, top = min(r[0] for r in rects), min(r[1] for r in rects)
    margin = 30
    return [left - margin, top - margin, max(r[0] + r[2] for r in rects) - left + 2 * margin,
            max(r[1] + r[3] for r in rects) - top + 2 * margin]


def thumbnail(page, ui: dict, name: str, path: Path) -> int:
    """A square JPEG (within THUMBNAIL_MAX_BYTES) of the graph as it ran: one view of focus(), as large as the
    window allows up to 100 %."""
    image = screenshot(page, focus(ui, name), THUMBNAIL_VIEWPORT - 120)
    image = image.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.LANCZOS)
    for quality in (85, 75, 65, 55, 45):
        data = io.BytesIO()
        image.save(data, "JPEG", quality=quality, optimize=True)
        if data.tell() <= THUMBNAIL_MAX_BYTES:
            break
    path.write_bytes(data.getvalue())
    return data.tell()


def load_graph(page, ui: dict) -> None:
    page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", ui)


def make(page, name: str, object_info: dict) -> None:
    """Builds the template's UI graph with node sizes measured after a smoke run, then its thumbnail as it ran
    (unrun for NOT_RUN_HERE: its nodes' sizes then leave out the previews, which stay empty there)."""
    api = json.loads((API_WORKFLOWS / f"{name}.json").read_text())
    note = note_text(api, EXAMPLES[name])
    edits = smoke_edits(api, user_edits(api))
    runs = name not in NOT_RUN_HERE
    provisional = build(api, object_info, note)
    first = run_graph(page, provisional, edits) if runs else load_graph(page, provisional)
    if runs and first["status"] != "success":
        raise RuntimeError(f"{name}: the smoke run failed in the frontend: {first}")
    ui = build(api, object_info, note, measured_sizes(page, provisional))
    out = example_file(name)
    out.write_text(json.dumps(ui, indent=1) + "\n")
    # the crops at their shipped size (cheap), so the thumbnail shows them sharp; the rest stays a smoke run
    if runs:
        second = run_graph(page, ui, {i: {k: v for k, v in values.items()
                                          if api[i]["class_type"] != "InvAdapterFaceCrop"}
                                      for i, values in edits.items()})
        if second["status"] != "success":
            raise RuntimeError(f"{name}: the smoke run of the final graph failed: {second}")
    else:
        load_graph(page, ui)
    size = thumbnail(page, ui, name, out.with_suffix(".jpg"))
    print(f"{out} and its thumbnail ({size / 1000:.0f} kB)", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="workflows/api/<name>.json to build (default: all)")
    args = parser.parse_args()
    assert set(EXAMPLES) == set(FOCUS) == {name for name, _ in TEMPLATES}, "EXAMPLES, FOCUS and TEMPLATES differ"
    unknown = set(args.names) - set(EXAMPLES)
    if unknown:
        parser.error(f"not in EXAMPLES: {sorted(unknown)}")
    host.import_comfy_cpu()  # only used if the test checkpoint has to be generated
    EXAMPLE_WORKFLOWS.mkdir(exist_ok=True)
    if not args.names:  # a renamed or dropped template leaves no stale card behind
        for old in EXAMPLE_WORKFLOWS.iterdir():
            old.unlink()
    with ComfyServer(models=test_files()) as server:
        object_info = server.client.object_info()
        with frontend_page(server.url, viewport=(THUMBNAIL_VIEWPORT, THUMBNAIL_VIEWPORT), settings=SCREENSHOT_SETTINGS) \
                as page:
            page.evaluate("() => { window.app.extensionManager.focusMode = true; }")  # no menus over the canvas
            for name, _ in TEMPLATES:
                if not args.names or name in args.names:
                    make(page, name, object_info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
