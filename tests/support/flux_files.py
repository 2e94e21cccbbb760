"""Deterministic random-weight Flux files a real server loads, made like the SD ones in models.py (key names and
shapes from ComfyUI's own modules on the meta device, every tensor seeded by its name, cached under RECIPE).

- ``flux_unet_file()``: a diffusion-model file UNETLoader detects as Flux (``model_detection`` fixes axes_dim at
  [16, 56, 56], so hidden 128 with one head, the smallest it detects), one double and one single block, the
  guidance embedding (Flux-dev style), T5-XXL's 4096-wide context and a 2048-wide pooled vector (what the text
  side below gives): about 2M parameters.
- ``flux_vae_file()``: an ae.safetensors-style VAE (16 latent channels, no quant convs); ComfyUI reads the
  decoder's width from the file (32 here) but builds the encoder at the standard 128.
- ``flux_lora_file()``: a kohya LoRA on every linear layer of the double and single blocks.
- ``flux_controlnet_file()``: an XLabs-format Flux ControlNet for the tiny UNET (ControlNetLoader loads it).
- ``chroma_unet_file()``: a diffusion-model file UNETLoader detects as Chroma. Detection fixes Chroma's modulation
  network at full size (5 layers of 5,120) and its output at 3,072, which every block's modulation must match, so
  the smallest Chroma a server loads has hidden 3,072 (24 heads): one double and one single block, 631M
  parameters, 1.26 GB, about 2-4 s per model call on this CPU. It runs template 17 in the tests.
The text side: ComfyUI builds DualCLIPLoader's (and CLIPLoader's) Flux T5 from a fixed T5-XXL config (4.7B
parameters, ``comfy/text_encoders/t5_config_xxl.json``) whatever the file holds, so no small T5 file can stand in
for it. The smoke runs keep the shipped graphs' DualCLIPLoader and change only its widgets: the CLIP-L file
(``models.clip_l_file``) in both slots with type "sd3", which ComfyUI builds as SD3's text encoder with CLIP-L alone:
CLIP-L's hidden states zero-padded to T5-XXL's 4096 width, and a 2048-wide pooled vector (CLIP-L's, then bigG's
zeros).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import models
from .models import RECIPE

FLUX_UNET_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 2048,
                    "context_in_dim": 4096, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1,
                    "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
                    "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": []}
VAE_DECODER_CH = 32


def flux_unet_shapes() -> dict[str, torch.Size]:
    import comfy.supported_models

    config = models.model_config(comfy.supported_models.Flux, dict(FLUX_UNET_CONFIG), torch.float16)
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
    return models._shapes(model.diffusion_model, "")


CHROMA_UNET_CONFIG = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096,
                      "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 1,
                      "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64,
                      "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5, "txt_ids_dims": [], "vec_in_dim": None}


def chroma_unet_shapes() -> dict[str, torch.Size]:
    import comfy.supported_models

    config = models.model_config(comfy.supported_models.Chroma, dict(CHROMA_UNET_CONFIG), torch.float16)
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
    return models._shapes(model.diffusion_model, "")


def chroma_unet_file() -> Path:
    return models._cached(f"invadapter-test-chroma-h3072-{RECIPE}.safetensors",
                          lambda tmp: models._save_random(tmp, chroma_unet_shapes(), "smallest loadable Chroma"))


def flux_vae_shapes() -> dict[str, torch.Size]:
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        encoder = Encoder(**ddconfig)
        decoder = Decoder(**{**ddconfig, "ch": VAE_DECODER_CH})
    return {**models._shapes(encoder, "encoder."), **models._shapes(decoder, "decoder.")}


def flux_unet_file() -> Path:
    return models._cached(f"invadapter-test-flux-tiny-t4096-{RECIPE}.safetensors",
                          lambda tmp: models._save_random(tmp, flux_unet_shapes(), "tiny Flux UNET"))


def flux_vae_file() -> Path:
    return models._cached(f"invadapter-test-flux-vae-{RECIPE}.safetensors",
                          lambda tmp: models._save_random(tmp, flux_vae_shapes(), "Flux-style 16-channel VAE"))


def flux_lora_targets() -> dict[str, tuple[int, int]]:
    """Kohya LoRA name -> (out, in) for every linear layer inside the double and single blocks."""
    return {f"lora_unet_{key[:-len('.weight')].replace('.', '_')}": (shape[0], shape[1])
            for key, shape in flux_unet_shapes().items()
            if key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and len(shape) == 2}


def flux_lora_file() -> Path:
    return models._cached(f"invadapter-test-lora-flux-tiny-t4096-{RECIPE}.safetensors",
                          lambda tmp: models._save_lora(tmp, flux_lora_targets(), "tiny Flux UNET"))


def server_models() -> dict[str, dict[str, Path]]:
    """The files a Flux test server gets, by ComfyUI model folder, under stable names."""
    return {
        "diffusion_models": {"invadapter-test-flux-tiny.safetensors": flux_unet_file(),
                             "invadapter-test-chroma.safetensors": chroma_unet_file()},
        "text_encoders": {"invadapter-test-clip-l.safetensors": models.clip_l_file()},
        "vae": {"invadapter-test-flux-vae.safetensors": flux_vae_file()},
        "loras": {"invadapter-test-lora-flux-tiny.safetensors": flux_lora_file()},
        "controlnet": {"invadapter-test-controlnet-flux-tiny.safetensors": flux_controlnet_file()},
    }


def flux_controlnet_shapes() -> dict[str, torch.Size]:
    """An XLabs-format Flux ControlNet (Flux's own key names, ``controlnet_blocks``, a pixel-space hint encoder) for
    the tiny UNET, built the way ``comfy.controlnet.load_controlnet_flux_xlabs_mistoline`` builds it."""
    import comfy.ldm.flux.controlnet
    import comfy.ops

    config = {k: v for k, v in FLUX_UNET_CONFIG.items() if k != "image_model"}
    with torch.device("meta"):
        control = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, device="meta",
                                                           **config)
    # the QK-norm scales under the names released files use (ComfyUI's loader looks for them, then renames them)
    return {k[:-len("weight")] + "scale" if k.endswith(("query_norm.weight", "key_norm.weight")) else k: v
            for k, v in models._shapes(control, "").items()}


def flux_controlnet_file() -> Path:
    return models._cached(f"invadapter-test-controlnet-flux-tiny-t4096-{RECIPE}.safetensors",
                          lambda tmp: models._save_random(tmp, flux_controlnet_shapes(), "tiny Flux ControlNet"))
