"""A tiny random Qwen-Image built in-process from ComfyUI's own classes (``comfy.supported_models.QwenImage``): 3
joint blocks, hidden 32, 2 heads of 16 (RoPE axes 4 + 6 + 6), a 32-wide text stand-in; about 130k parameters, a few ms
per call on a CPU. Latents are 5-D ([B, 16, 1, h, w]: the Wan 2.1 latent format). Weights are drawn by
``models.random_tensor`` (seeded by each key name); nothing is downloaded."""
from __future__ import annotations

import torch

from .models import SEED, model_config, random_patcher, random_tensor

CONTEXT_DIM = 32  # Qwen2.5-VL stand-in width (joint_attention_dim)
UNET_CONFIG = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 3,
               "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": CONTEXT_DIM,
               "axes_dims_rope": (4, 6, 6)}


def tiny_qwen_image_model(seed: int = SEED):
    """A ComfyUI ModelPatcher (CPU, fp32) around a tiny random QwenImage BaseModel (flow sampling, shift 1.15)."""
    import comfy.supported_models

    return random_patcher(model_config(comfy.supported_models.QwenImage, dict(UNET_CONFIG), torch.float32), seed)


def qwen_text(seed: int = 0, tokens: int = 7) -> torch.Tensor:
    """A random text context [1, tokens, 32] (what the Qwen2.5-VL encoder would give)."""
    return torch.randn(1, tokens, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed))


def tiny_wan_vae(seed: int = SEED):
    """A ComfyUI VAE around a tiny random Wan 2.1 VAE (``comfy.ldm.wan.vae.WanVAE``, base width 8 instead of 96),
    Qwen-Image's VAE: 16 channels, 5-D latents [B, 16, 1, h / 8, w / 8] for an image. ``comfy.sd.VAE`` reads the
    width off the state dict, so its own detection builds it."""
    import comfy.ldm.wan.vae
    import comfy.sd

    net = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True])
    # ComfyUI's layers skip initialisation: every tensor is drawn here (RMS-norm scales [C, 1, 1, 1] are ones)
    sd = {k: torch.ones(v.shape) if k.endswith("gamma") else random_tensor(k, v.shape, torch.float32, seed)
          for k, v in net.state_dict().items()}
    return comfy.sd.VAE(sd=sd)
