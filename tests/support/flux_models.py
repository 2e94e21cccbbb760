"""A tiny random Flux built in-process from ComfyUI's own classes (``comfy.supported_models.Flux``): 2 double and 2
single blocks, hidden 32, 2 heads, guidance embedding (Flux-dev style); about 110k parameters, a few ms per call
on a CPU. Weights are drawn by ``models.random_tensor`` (seeded by each key name); nothing is downloaded."""
from __future__ import annotations

import torch

from .models import SEED, model_config, random_patcher

CONTEXT_DIM = 32  # T5 stand-in width (context_in_dim)
POOLED_DIM = 8  # CLIP-L pooled stand-in width (vec_in_dim)
UNET_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": POOLED_DIM,
               "context_in_dim": CONTEXT_DIM, "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
               "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2,
               "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": []}


def tiny_flux_model(seed: int = SEED, **overrides):
    """A ComfyUI ModelPatcher (CPU, fp32) around a tiny random Flux BaseModel (model_sampling: ModelSamplingFlux)."""
    import comfy.supported_models

    return random_patcher(model_config(comfy.supported_models.Flux, {**UNET_CONFIG, **overrides}, torch.float32),
                          seed)


def flux_text(seed: int = 0, tokens: int = 7) -> tuple[torch.Tensor, dict]:
    """A random (T5-like context [1, tokens, 32], {pooled_output [1, 8]}) CONDITIONING entry."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, CONTEXT_DIM, generator=g), {"pooled_output": torch.randn(1, POOLED_DIM, generator=g)}


CHROMA_CONFIG = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": CONTEXT_DIM,
                 "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
                 "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64,
                 "out_dim": 32, "hidden_dim": 32, "n_layers": 1, "txt_ids_dims": [], "vec_in_dim": None}


def tiny_chroma_model(seed: int = SEED):
    """A tiny random Chroma (Flux's blocks without per-block modulation layers, a distilled modulation network,
    no pooled vector, no guidance embedding) from ``comfy.supported_models.Chroma``."""
    import comfy.supported_models

    return random_patcher(model_config(comfy.supported_models.Chroma, dict(CHROMA_CONFIG), torch.float32), seed)


def tiny_chroma_radiance_model(seed: int = SEED):
    """A tiny random Chroma Radiance (Chroma's blocks on pixels, a NeRF-style head): a Flux subclass the pack
    does not serve (its refusal is tested)."""
    import comfy.supported_models

    config = {**CHROMA_CONFIG, "image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3,
              "patch_size": 16, "nerf_hidden_size": 16, "nerf_mlp_ratio": 2, "nerf_depth": 1, "nerf_max_freqs": 4,
              "nerf_tile_size": 0, "nerf_final_head_type": "linear", "nerf_embedder_dtype": torch.float32,
              "use_x0": False, "use_sequential_txt_ids": False}
    return random_patcher(model_config(comfy.supported_models.ChromaRadiance, config, torch.float32), seed)
