"""API-format graphs (what POST /prompt takes) for plain SD1.5 runs, small enough for CPU tests."""
from __future__ import annotations


def sd15_txt2img(ckpt_name: str, *, seed: int = 0, steps: int = 2, cfg: float = 2.0, size: int = 64,
                 positive: str = "a photo of a face", negative: str = "blurry", prefix: str = "invadapter-test",
                 lora: tuple[str, float] | None = None, controlnet: tuple[str, str, float] | None = None) -> dict:
    """CheckpointLoaderSimple -> [LoraLoader] -> CLIPTextEncode x2 -> [ControlNetApplyAdvanced] -> EmptyLatentImage
    -> KSampler -> VAEDecode -> SaveImage. ``lora`` = (file, strength); ``controlnet`` = (file, input image name,
    strength)."""
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
