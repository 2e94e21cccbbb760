"""API-format graphs (what POST /prompt takes) for plain SD1.5 and SDXL runs, small enough for CPU tests, and the
shipped workflows: workflows/api/<name>.json (API format) and example_workflows/NN - <title>.json (the UI graphs the
template browser lists: it shows the file name as the card's title; NN = the order a newcomer meets them)."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# workflows/ is one of the folders the host scans for templates, but only at its top level (<pack>/workflows/*.json)
API_WORKFLOWS = ROOT / "workflows" / "api"
EXAMPLE_WORKFLOWS = ROOT / "example_workflows"
EXAMPLE_NAME = re.compile(r"^(\d\d) - (.+)\.json$")
# The templates in the order a newcomer meets them: (workflows/api/<name>.json, the template browser's title).
TEMPLATES = [
    ("basic", "Face photo to image"),
    ("controlnet", "Face and pose with ControlNet"),
    ("save_reference", "Save an identity"),
    ("from_saved_reference", "Use a saved identity, run 03 first"),
    ("two_photos", "Two photos of one person"),
    ("best_of_n", "Best of 4 by face similarity"),
    ("cond_only", "Identity on the positive prompt only"),
    ("lora", "Identity with a LoRA"),
    ("coarse_vs_fine", "Coarse vs fine levels"),
    ("two_people", "Two people in one image"),
    ("attention_maps", "Where the identity acts, attention maps"),
    ("trained_adapter", "Trained adapter weights"),
    ("sdxl_basic", "SDXL face photo to image"),
    ("sdxl_controlnet", "SDXL face and pose with ControlNet"),
    ("flux_basic", "Flux face photo to image"),
    ("flux_controlnet", "Flux face and pose with ControlNet"),
    ("chroma_basic", "Chroma face photo to image"),
    ("qwen_image_basic", "Qwen-Image face photo to image"),
]
# Templates no test server here can run, and why: the tests check instead that the real server accepts every input
# of theirs but the standard model files (test_example_workflows), and their thumbnails show the graph unrun.
NOT_RUN_HERE = {"qwen_image_basic": "ComfyUI builds Qwen-Image's text encoder (Qwen2.5-VL 7B) at full size whatever "
                                    "the file holds, and no smaller text encoder gives its 3,584-wide context"}


def example_name(name: str) -> str:
    """The UI graph's file stem (the browser's card title) of workflows/api/<name>.json."""
    index, title = next((i, t) for i, (n, t) in enumerate(TEMPLATES) if n == name)
    return f"{index + 1:02d} - {title}"


def example_file(name: str) -> Path:
    return EXAMPLE_WORKFLOWS / f"{example_name(name)}.json"


def example_files() -> list[Path]:
    """The UI workflows, in their order."""
    return sorted(EXAMPLE_WORKFLOWS.glob("*.json"))


def api_twin(ui_file: Path) -> Path:
    """workflows/api/<name>.json for example_workflows/NN - <title>.json."""
    names = {example_name(name): name for name, _ in TEMPLATES}
    if ui_file.stem not in names:
        raise ValueError(f"{ui_file.name} is not in support.graphs.TEMPLATES: run scripts/make_examples.py")
    return API_WORKFLOWS / f"{names[ui_file.stem]}.json"


def sd15_txt2img(ckpt_name: str, *, seed: int = 0, steps: int = 2, cfg: float = 2.0, size: int = 64,
                 positive: str = "a photo of a face", negative: str = "blurry", prefix: str = "invadapter-test",
                 lora: tuple[str, float] | None = None, controlnet: tuple[str, str, float] | None = None) -> dict:
    """CheckpointLoaderSimple -> [LoraLoader] -> CLIPTextEncode x2 -> [ControlNetApplyAdvanced] -> EmptyLatentImage
    -> KSampler -> VAEDecode -> SaveImage. ``lora`` = (file, strength); ``controlnet`` = (file, input image name,
    strength). Serves SDXL checkpoints as well: CLIPTextEncode adds their pooled output, the size conditioning
    keeps ComfyUI's defaults."""
    model, clip = ["ckpt", 0], ["ckpt", 1]
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}}
    if lora is not None:
        g["lora"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora[0],
                                                           "strength_model": lora[1], "strength_clip": lora[1]}}
        model, clip = ["lora", 0], ["lora", 1]
    g["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": clip}}
    g["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": clip}}
    pos, neg = ["pos", 0], ["neg", 0]
    if controlnet is not None:
        g["cn_model"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet[0]}}
        g["cn_image"] = {"class_type": "LoadImage", "inputs": {"image": controlnet[1]}}
        g["cn_apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": pos, "negative": neg, "control_net": ["cn_model", 0], "image": ["cn_image", 0],
            "strength": controlnet[2], "start_percent": 0.0, "end_percent": 1.0, "vae": ["ckpt", 2]}}
        pos, neg = ["cn_apply", 0], ["cn_apply", 1]
    g["latent"] = {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}
    g["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": pos, "negative": neg, "latent_image": ["latent", 0], "seed": seed,
        "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    return g


# Inputs replaced for the random-checkpoint smoke run, only where a node already has them (64 px, few steps: the
# inversion and the sampler keep the same step count so the reference features are reused).
SMOKE_INPUTS = {
    "KSampler": {"steps": 4},
    "InvAdapterAttentionMaps": {"steps": 4},
    "InvAdapterEncodeReference": {"steps": 4, "resolution": 64},
    "InvAdapterFaceCrop": {"size": 64},
}
# Pixel sizes and positions divided by SMOKE_SHRINK (512 px graphs become 64 px, masks keep their layout).
SMOKE_SHRINK = 8
SMOKE_SCALED = {"EmptyLatentImage": ("width", "height"), "EmptySD3LatentImage": ("width", "height"),
                "SolidMask": ("width", "height"), "MaskComposite": ("x", "y")}


def strip_meta(prompt: dict) -> dict:
    """A prompt as the server executes it: class types and inputs (no titles)."""
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def set_inputs(prompt: dict, class_type: str, values: dict, only_existing: bool = False) -> None:
    for node in prompt.values():
        if node.get("class_type") == class_type:
            for key, value in values.items():
                if key in node["inputs"] or not only_existing:
                    node["inputs"][key] = value


def shrink_for_smoke_run(prompt: dict) -> dict:
    for class_type, values in SMOKE_INPUTS.items():
        set_inputs(prompt, class_type, values, only_existing=True)
    for node in prompt.values():
        for key in SMOKE_SCALED.get(node["class_type"], ()):
            node["inputs"][key] = max(node["inputs"][key] // SMOKE_SHRINK, 1 if key in ("width", "height") else 0)
    return prompt


def load_workflow(name: str, smoke: bool = True) -> dict:
    """workflows/api/<name>.json, shrunk for a CPU smoke run when ``smoke``."""
    prompt = json.loads((API_WORKFLOWS / f"{name}.json").read_text())
    return shrink_for_smoke_run(prompt) if smoke else prompt


LOADER_INPUTS = {"CheckpointLoaderSimple": "ckpt_name", "ControlNetLoader": "control_net_name",
                 "LoraLoader": "lora_name", "InvAdapterLoader": "adapter_name", "UNETLoader": "unet_name",
                 "VAELoader": "vae_name", "DualCLIPLoader": ("clip_name1", "clip_name2"), "CLIPLoader": "clip_name"}
# Other widgets a stand-in needs: no small file stands in for T5-XXL, so the Flux graphs' DualCLIPLoader loads the
# CLIP-L test file twice, and the Chroma graph's CLIPLoader once, as SD3's text encoder (CLIP-L padded to T5's width;
# see support.flux_files)
STAND_IN_WIDGETS = {"DualCLIPLoader": {"type": "sd3"}, "CLIPLoader": {"type": "sd3"}}


def user_edits(prompt: dict) -> dict[str, dict]:
    """The edit a user makes to a shipped graph (picking the checkpoint and ControlNet its note asks for), with the
    test file that stands in for each standard file: {class_type: {input: test file}}, for smoke_edits."""
    from .fixtures import STAND_INS

    edits = {}
    for node in prompt.values():
        fields = LOADER_INPUTS.get(node["class_type"], ())
        for field in (fields,) if isinstance(fields, str) else fields:
            if node["inputs"][field] in STAND_INS:  # not e.g. "init from model"
                edits.setdefault(node["class_type"], {})[field] = STAND_INS[node["inputs"][field]]
                edits[node["class_type"]].update(STAND_IN_WIDGETS.get(node["class_type"], {}))
    return edits


def smoke_edits(prompt: dict, overrides: dict[str, dict]) -> dict[str, dict]:
    """{node id: {input: value}}: the widget edits that turn ``prompt`` into its CPU smoke run, with ``overrides``
    by class type where a node has that input (e.g. the test checkpoint): what a test changes in the frontend."""
    smoke = shrink_for_smoke_run(copy.deepcopy(prompt))
    for class_type, values in overrides.items():
        set_inputs(smoke, class_type, values, only_existing=True)
    edits = {i: {k: v for k, v in smoke[i]["inputs"].items() if v != prompt[i]["inputs"].get(k)} for i in prompt}
    return {i: values for i, values in edits.items() if values}


def shipped(name: str) -> dict:
    """A shipped API graph after the edits a user makes on first run (``user_edits``), shrunk for a smoke run."""
    prompt = load_workflow(name)
    for class_type, values in user_edits(prompt).items():
        set_inputs(prompt, class_type, values)
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    """The id of the (first) node of ``class_type`` in an API graph."""
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def output_images(client, prompt: dict, timeout: float = 900) -> list:
    """Runs ``prompt`` on the server and returns its output images as RGB arrays."""
    import io

    import numpy as np
    from PIL import Image

    entry = client.run(prompt, timeout=timeout)
    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in client.images(entry["prompt_id"])]

