"""Deterministic random-weight SDXL-family test models, made like the SD1.5 ones in models.py (key names and shapes
from ComfyUI's own modules on the meta device, every tensor seeded by its name, files cached under RECIPE).

- ``sdxl_checkpoint("vega")``: a single-file checkpoint in the Segmind Vega layout, which ComfyUI detects as
  Segmind_Vega: the smallest SDXL-family UNet it detects. ``sdxl_checkpoint("full")``: standard SDXL 1.0 (SDXL).
  Both carry CLIP-L and OpenCLIP bigG under an SDXL checkpoint's keys (``conditioner.embedders.0`` / ``.1``) and
  the SDXL VAE (same layout as SD's), so CheckpointLoaderSimple -> CLIPTextEncode (pooled output included) ->
  KSampler -> VAEDecode runs on them.
- ``sdxl_controlnet_checkpoint("vega")``: an SDXL ControlNet in the diffusers format SDXL ControlNets ship in,
  a copy of the vega UNet's encoder. ``sdxl_lora_file("vega")``: a kohya LoRA on every attention projection of
  the UNet and on both text encoders (lora_te1 = CLIP-L, lora_te2 = bigG).
- ``tiny_sdxl_model()`` with ``sdxl_text_context()`` / ``sdxl_pooled_output()``: in-process SDXL for parity tests.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from . import models
from .models import RECIPE, SEED

CONTEXT_DIM = 2048  # CLIP-L 768 + bigG 1280 hidden states, concatenated
POOLED_DIM = 1280  # bigG's projected pooled output
ADM_CHANNELS = POOLED_DIM + 6 * 256  # + size conditioning: 6 sinusoidal embeddings (model_base.SDXL.encode_adm)


class Layout(NamedTuple):
    """Where a UNet's transformers are: depth per input res block, per output res block, and in the middle block
    (-1: res blocks only), plus the comfy.supported_models class ComfyUI detects for it."""
    config: str
    depth: tuple
    depth_output: tuple
    depth_middle: int


# The real layouts, as ComfyUI lists them for diffusers UNets (comfy/model_detection.py
# unet_config_from_diffusers_unet); detection itself compares only the input-side depths (supported_models).
LAYOUTS = {
    "vega": Layout("Segmind_Vega", (0, 0, 1, 1, 2, 2), (0, 0, 0, 1, 1, 1, 2, 2, 2), -1),
    "full": Layout("SDXL", (0, 0, 2, 2, 10, 10), (0, 0, 0, 2, 2, 2, 10, 10, 10), 10),
}
# The tiny in-process model: depth 2 and 3 where SDXL has 2 and 10, so names like input.4.1 and output.2.2 exist.
TINY_LAYOUT = Layout("SDXL", (0, 0, 2, 2, 3, 3), (0, 0, 0, 2, 2, 2, 3, 3, 3), 3)
TINY = {"model_channels": 32, "head_channels": 16}


def sdxl_unet_config(layout: Layout, model_channels: int = 320, in_channels: int = 4,
                     context_dim: int = CONTEXT_DIM) -> dict:
    """ComfyUI's detected unet_config for an SDXL-family layout: 3 levels (channel_mult 1,2,4), 2 res blocks each,
    linear proj_in/out, the ADM input (pooled text + size conditioning). ``in_channels`` 9: inpainting."""
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": ADM_CHANNELS, "in_channels": in_channels, "out_channels": 4,
        "model_channels": model_channels, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
        "transformer_depth": list(layout.depth), "transformer_depth_output": list(layout.depth_output),
        "transformer_depth_middle": layout.depth_middle, "use_linear_in_transformer": True,
        "context_dim": context_dim, "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def sdxl_config(kind: str, dtype=torch.float16):
    import comfy.supported_models

    layout = LAYOUTS[kind]
    return models.model_config(getattr(comfy.supported_models, layout.config), sdxl_unet_config(layout), dtype)


# ---------------------------------------------------------------- key names and shapes from ComfyUI's modules
def sdxl_unet_shapes(kind: str) -> dict[str, torch.Size]:
    config = sdxl_config(kind)
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
    return models._shapes(model.diffusion_model, "model.diffusion_model.")


def sdxl_text_encoder_shapes() -> dict[str, torch.Size]:
    """CLIP-L and bigG as ComfyUI builds them (bigG from its fixed clip_config_bigg.json: 32 layers, 1280 wide),
    renamed by ComfyUI's own checkpoint saver to the keys SDXL checkpoints have (bigG in OpenCLIP names, fused
    in_proj); the loader's process_clip_state_dict maps them back."""
    import comfy.sdxl_clip

    with torch.device("meta"):
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    saved = sdxl_config("vega").process_clip_state_dict_for_saving(clip.state_dict())
    return {name: tensor.shape for name, tensor in saved.items()}


def sdxl_controlnet_shapes(kind: str) -> dict[str, torch.Size]:
    """A ControlNet for the ``kind`` UNet under diffusers names: ComfyUI's own UNet name map
    (comfy.utils.unet_to_diffusers) read backwards, plus the ControlNet-only parts named as load_controlnet
    expects them."""
    import comfy.utils

    config = sdxl_config(kind)
    ldm = models.controlnet_module_shapes(config, "")
    to_diffusers = {ldm_key: key for key, ldm_key in comfy.utils.unet_to_diffusers(config.unet_config).items()
                    if not key.startswith("class_embedding.")}  # SDXL names its ADM embedding add_embedding
    last_hint = max(int(key.split(".")[1]) for key in ldm if key.startswith("input_hint_block."))

    def diffusers_name(key: str) -> str:
        parts = key.split(".")
        if key in to_diffusers:
            return to_diffusers[key]
        if parts[0] == "zero_convs":
            return f"controlnet_down_blocks.{parts[1]}.{parts[-1]}"
        if parts[0] == "middle_block_out":
            return f"controlnet_mid_block.{parts[-1]}"
        if parts[0] == "input_hint_block":  # convs at 0, 2, ...: conv_in, blocks.0, blocks.1, ..., conv_out
            index = int(parts[1])
            block = "conv_in" if index == 0 else "conv_out" if index == last_hint else f"blocks.{index // 2 - 1}"
            return f"controlnet_cond_embedding.{block}.{parts[-1]}"
        raise KeyError(f"no diffusers name for ControlNet key {key}")

    return {diffusers_name(key): shape for key, shape in ldm.items()}


def sdxl_lora_targets(kind: str) -> dict[str, tuple[int, int]]:
    """Kohya names as SDXL LoRAs use them: the UNet under ldm names, lora_te1 = CLIP-L (12 layers),
    lora_te2 = bigG (32 layers)."""
    return {**models.unet_attention_lora_targets(sdxl_unet_shapes(kind)),
            **models.text_encoder_lora_targets("lora_te1", 12, models.CONTEXT_DIM),
            **models.text_encoder_lora_targets("lora_te2", 32, POOLED_DIM)}


# ---------------------------------------------------------------- files
def sdxl_checkpoint(kind: str = "vega") -> Path:
    def build(tmp):
        shapes = {**sdxl_unet_shapes(kind), **sdxl_text_encoder_shapes(), **models.vae_shapes()}
        models._save_random(tmp, shapes, f"SDXL {kind} checkpoint")

    return models._cached(f"invadapter-test-sdxl-{kind}-{RECIPE}.safetensors", build)


def vega_sdxl_checkpoint() -> Path:
    return sdxl_checkpoint("vega")


def full_sdxl_checkpoint() -> Path:
    return sdxl_checkpoint("full")


def sdxl_controlnet_checkpoint(kind: str = "vega") -> Path:
    return models._cached(f"invadapter-test-controlnet-sdxl-{kind}-{RECIPE}.safetensors",
                          lambda tmp: models._save_random(tmp, sdxl_controlnet_shapes(kind), f"SDXL {kind} ControlNet"))


def sdxl_lora_file(kind: str = "vega") -> Path:
    return models._cached(f"invadapter-test-lora-sdxl-{kind}-{RECIPE}.safetensors",
                          lambda tmp: models._save_lora(tmp, sdxl_lora_targets(kind), f"SDXL {kind} checkpoint"))


def server_models(kind: str = "vega") -> dict[str, dict[str, Path]]:
    """The files a test server gets, by ComfyUI model folder, under stable names (graphs don't carry RECIPE)."""
    return {
        "checkpoints": {f"invadapter-test-sdxl-{kind}.safetensors": sdxl_checkpoint(kind)},
        "controlnet": {f"invadapter-test-controlnet-sdxl-{kind}.safetensors": sdxl_controlnet_checkpoint(kind)},
        "loras": {f"invadapter-test-lora-sdxl-{kind}.safetensors": sdxl_lora_file(kind)},
    }


# ---------------------------------------------------------------- in-process
def tiny_sdxl_model(seed: int = SEED, model_channels: int = TINY["model_channels"],
                    head_channels: int = TINY["head_channels"], in_channels: int = 4, layout: Layout = TINY_LAYOUT):
    """A ComfyUI ModelPatcher around an SDXL BaseModel (comfy.supported_models.SDXL, ADM input of ADM_CHANNELS)
    with SDXL's block names and TINY_LAYOUT's transformer depths at a fraction of the width; the real 2048-wide
    context and 1280-wide pooled output. fp32, CPU. ``in_channels`` 9 makes it an SDXL inpainting model."""
    import comfy.supported_models

    unet_config = sdxl_unet_config(layout, model_channels, in_channels)
    config = models.model_config(comfy.supported_models.SDXL, unet_config, torch.float32,
                                 num_head_channels=head_channels)
    return models.random_patcher(config, seed)


def sdxl_text_context(seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A random SDXL text context [batch, 77, 2048] (CLIP-L and bigG hidden states side by side)."""
    return models.text_context(seed, batch, CONTEXT_DIM)


def sdxl_pooled_output(seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A random bigG pooled output [batch, 1280] (the cond's "pooled_output"); not correlated with
    sdxl_text_context(seed)."""
    return torch.randn((batch, POOLED_DIM), generator=torch.Generator().manual_seed(seed + 7919))
