"""API-format graphs (what POST /prompt takes) for plain SD1.5 and SDXL runs, small enough for CPU tests."""
from __future__ import annotations

import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


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
SMOKE_SCALED = {"EmptyLatentImage": ("width", "height"), "SolidMask": ("width", "height"), "MaskComposite": ("x", "y")}


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
    """workflows/<name>_api.json, shrunk for a CPU smoke run when ``smoke``."""
    prompt = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    return shrink_for_smoke_run(prompt) if smoke else prompt
