"""Deterministic random-weight test models (no weights are ever downloaded).

- ``tiny_sd15_model()``: an in-process SD1.5-shaped ModelPatcher, small enough for many forward passes.
- ``shallow_sd15_checkpoint()`` / ``full_sd15_checkpoint()``: single-file checkpoints (UNet + CLIP-L + SD VAE)
  that ComfyUI detects as SD15; ``controlnet_checkpoint()`` and ``lora_file()`` match one of them.

Key names and shapes come from ComfyUI's own modules built on the meta device, so the files load exactly like a
real checkpoint. Every tensor is drawn from a generator seeded by its own key name, so a value never depends on
what else is in the file. Files are cached outside the repo (``$INVADAPTER_TEST_CACHE``, default
``~/.cache/invadapter-comfyui/test-models``) under names carrying RECIPE: bump it whenever a recipe changes.
Needs ComfyUI importable with CPU mode set (tests/conftest.py does it; other callers use host.import_comfy_cpu()).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import torch

RECIPE = "r1"
SEED = 1234
CONTEXT_DIM = 768
# num_res_blocks per checkpoint kind: "full" is the standard SD1.5 UNet; "shallow" keeps SD1.5's channels (320,
# which detection requires), heads and transformer placement with one res block per level (~2/3 of the weights).
KINDS = {"shallow": 1, "full": 2}
TINY = {"model_channels": 32, "num_res_blocks": 1, "num_heads": 2}
LORA_RANK = 4


def _log(message: str) -> None:
    print(f"[test-models] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    default = "~/.cache/invadapter-comfyui/test-models"
    return Path(os.environ.get("INVADAPTER_TEST_CACHE") or default).expanduser()


def random_tensor(name: str, shape, dtype=torch.float16, seed: int = SEED) -> torch.Tensor:
    """Matrices/kernels ~ N(0, 1/fan_in) (keeps activations O(1) through the depth); 1-D weights are always norm
    scales (a Linear or Conv weight is never 1-D) -> 1; biases and norm shifts -> 0."""
    shape = tuple(shape)
    if name.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).clone()
    if len(shape) >= 2:
        gen = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))).to(dtype)
    return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=dtype)


# ---------------------------------------------------------------- key names and shapes from ComfyUI's modules
def sd15_unet_config(num_res_blocks: int, model_channels: int = 320) -> dict:
    """ComfyUI's detected unet_config for an SD1.5 layout: channel_mult 1,2,4,4, one transformer per res block on
    the first three levels (input, middle and output stages), none on the last."""
    levels = 4
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels, "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1] * (num_res_blocks * 3) + [0] * num_res_blocks,
        "transformer_depth_output": [1] * ((num_res_blocks + 1) * 3) + [0] * (num_res_blocks + 1),
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def _sd15_config(unet_config: dict, dtype):
    import comfy.supported_models

    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(dtype, None)
    return config


def _shapes(module: torch.nn.Module, prefix: str) -> dict[str, torch.Size]:
    return {prefix + k: v.shape for k, v in module.state_dict().items()}


def unet_shapes(kind: str) -> dict[str, torch.Size]:
    config = _sd15_config(sd15_unet_config(KINDS[kind]), torch.float16)
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
    return _shapes(model.diffusion_model, "model.diffusion_model.")


def clip_shapes() -> dict[str, torch.Size]:
    import comfy.clip_model
    import comfy.ops

    config = json.loads((Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json").read_text())
    with torch.device("meta"):
        clip = comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", comfy.ops.disable_weight_init)
    shapes = _shapes(clip, "cond_stage_model.transformer.")
    shapes.pop("cond_stage_model.transformer.text_projection.weight")  # SD1.5 files have none (CLIP-L hidden states)
    return shapes


def vae_shapes() -> dict[str, torch.Size]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    return _shapes(vae, "first_stage_model.")


def controlnet_shapes(kind: str) -> dict[str, torch.Size]:
    """A ControlNet for the given UNet, built the way comfy.controlnet.load_controlnet builds it."""
    import comfy.cldm.cldm
    import comfy.ops

    config = dict(_sd15_config(sd15_unet_config(KINDS[kind]), torch.float16).unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, device="meta")
    with torch.device("meta"):
        control = comfy.cldm.cldm.ControlNet(**config)
    return _shapes(control, "control_model.")


def lora_targets(kind: str) -> dict[str, tuple[int, int]]:
    """Kohya LoRA name -> (out, in) for every attention projection of the UNet and of CLIP-L."""
    targets = {}
    for key, shape in unet_shapes(kind).items():
        if ".transformer_blocks." in key and any(f".attn{i}.{p}.weight" in key for i in (1, 2)
                                                 for p in ("to_q", "to_k", "to_v", "to_out.0")):
            name = key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            targets[f"lora_unet_{name}"] = (shape[0], shape[1])
    for layer in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            targets[f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"] = (CONTEXT_DIM, CONTEXT_DIM)
    return targets


# ---------------------------------------------------------------- files
def _cached(filename: str, build) -> Path:
    """Reuse the cached file, or build it under a temporary name and rename (never a half-written file)."""
    path = cache_dir() / filename
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _log(f"generating {path} ...")
    start = time.time()
    try:
        build(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _log(f"  {path.stat().st_size / 1e6:.0f} MB in {time.time() - start:.1f} s")
    return path


def _save_random(path: Path, shapes: dict[str, torch.Size], what: str) -> None:
    from safetensors.torch import save_file

    tensors = {name: random_tensor(name, shape) for name, shape in shapes.items()}
    params = sum(t.numel() for t in tensors.values())
    _log(f"  {what}: {len(tensors)} tensors, {params / 1e6:.0f}M parameters, fp16")
    save_file(tensors, str(path), metadata={"format": "pt", "invadapter_test": f"random weights ({what}, {RECIPE})"})


def _kind(for_checkpoint) -> str:
    """Accepts "shallow"/"full" or a path returned by shallow_/full_sd15_checkpoint()."""
    if str(for_checkpoint) in KINDS:
        return str(for_checkpoint)
    for kind in KINDS:
        if f"-sd15-{kind}-" in Path(for_checkpoint).name:
            return kind
    raise ValueError(f"not a test checkpoint: {for_checkpoint}")


def sd15_checkpoint(kind: str) -> Path:
    def build(tmp):
        shapes = {**unet_shapes(kind), **clip_shapes(), **vae_shapes()}
        _save_random(tmp, shapes, f"SD1.5 {kind} checkpoint")

    return _cached(f"invadapter-test-sd15-{kind}-{RECIPE}.safetensors", build)


def shallow_sd15_checkpoint() -> Path:
    return sd15_checkpoint("shallow")


def full_sd15_checkpoint() -> Path:
    return sd15_checkpoint("full")


def controlnet_checkpoint(for_checkpoint="shallow") -> Path:
    kind = _kind(for_checkpoint)
    return _cached(f"invadapter-test-controlnet-sd15-{kind}-{RECIPE}.safetensors",
                   lambda tmp: _save_random(tmp, controlnet_shapes(kind), f"SD1.5 {kind} ControlNet"))


def lora_file(for_checkpoint="shallow") -> Path:
    kind = _kind(for_checkpoint)

    def build(tmp):
        from safetensors.torch import save_file

        tensors = {}
        for name, (out_features, in_features) in lora_targets(kind).items():
            # down ~ N(0, 1/in) like a layer; up ~ N(0, 1/(4 r)) so that up @ down (alpha = rank) changes each
            # weight by about half its own scale: clearly visible, still finite.
            tensors[f"{name}.lora_down.weight"] = random_tensor(f"{name}.lora_down", (LORA_RANK, in_features))
            up = random_tensor(f"{name}.lora_up", (out_features, LORA_RANK)) * (math.sqrt(LORA_RANK) / 4)
            tensors[f"{name}.lora_up.weight"] = up.to(torch.float16)
            tensors[f"{name}.alpha"] = torch.tensor(float(LORA_RANK), dtype=torch.float16)
        _log(f"  LoRA for the {kind} checkpoint: {len(tensors) // 3} modules, rank {LORA_RANK}")
        save_file(tensors, str(tmp), metadata={"format": "pt", "invadapter_test": f"random LoRA ({RECIPE})"})

    return _cached(f"invadapter-test-lora-sd15-{kind}-{RECIPE}.safetensors", build)


# ---------------------------------------------------------------- in-process
def tiny_sd15_model(seed: int = SEED, model_channels: int = TINY["model_channels"], num_heads: int = TINY["num_heads"]):
    """A ComfyUI ModelPatcher around an SD15 BaseModel with SD1.5's block layout (the shallow checkpoint's block
    names) at a fraction of the width; fp32, CPU. ComfyUI's layers skip init, so every parameter is set here."""
    import comfy.model_patcher

    config = _sd15_config(sd15_unet_config(TINY["num_res_blocks"], model_channels), torch.float32)
    config.unet_config["num_heads"] = num_heads
    model = config.get_model({}, device=torch.device("cpu"))
    with torch.no_grad():
        for name, param in model.diffusion_model.named_parameters():
            param.copy_(random_tensor(name, param.shape, torch.float32, seed))
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def text_context(seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A random CLIP-like text context [batch, 77, 768] for the tiny model's cross-attention."""
    return torch.randn((batch, 77, CONTEXT_DIM), generator=torch.Generator().manual_seed(seed))


def server_models(kind: str = "shallow") -> dict[str, dict[str, Path]]:
    """The files a test server gets, by ComfyUI model folder, under stable names (graphs don't carry RECIPE)."""
    return {
        "checkpoints": {f"invadapter-test-sd15-{kind}.safetensors": sd15_checkpoint(kind)},
        "controlnet": {f"invadapter-test-controlnet-sd15-{kind}.safetensors": controlnet_checkpoint(kind)},
        "loras": {f"invadapter-test-lora-sd15-{kind}.safetensors": lora_file(kind)},
    }


# ---------------------------------------------------------------- CLIP for the CLIP-T / CLIP-I metrics
def clip_l_file() -> Path:
    """A standalone CLIP-L text encoder as CLIPLoader takes it, with its text projection (clip_l.safetensors)."""
    import comfy.clip_model
    import comfy.ops

    def build(tmp):
        config = json.loads((Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json").read_text())
        with torch.device("meta"):
            clip = comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", comfy.ops.disable_weight_init)
        _save_random(tmp, _shapes(clip, ""), "CLIP-L text encoder")

    return _cached(f"invadapter-test-clip-l-{RECIPE}.safetensors", build)


def clip_vision_file() -> Path:
    """A CLIP ViT-L/14 vision model with its projection, as CLIPVisionLoader takes it (the smallest CLIP vision
    layout ComfyUI detects: 24 layers, 303M parameters)."""
    import comfy.clip_model
    import comfy.ops

    def build(tmp):
        config = json.loads((Path(comfy.clip_model.__file__).parent / "clip_vision_config_vitl.json").read_text())
        with torch.device("meta"):
            vision = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta",
                                                                 comfy.ops.disable_weight_init)
        _save_random(tmp, _shapes(vision, ""), "CLIP ViT-L/14 vision model")

    return _cached(f"invadapter-test-clip-vision-vitl-{RECIPE}.safetensors", build)
