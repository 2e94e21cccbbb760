"""The toy MM-DiT base: ComfyUI's own Flux network, small, as a Flux-family ComfyUI model (flow sampling), on the
same synthetic faces, model space and pose "text encoder" as the UNet toy (``base``).

- The network: ``comfy.supported_models.Flux`` with a small unet_config: hidden 64, 4 heads of 16 (RoPE axes
  4 + 6 + 6), 2 double and 2 single blocks, MLP ratio 2, patch 2 over the 12x16x16 pixel-unshuffled image (64 image tokens), no
  pooled vector and no guidance embedding (schnell-like).
- Pretraining (``pretrain``): rectified flow, x = (1 − σ)·x0 + σ·ε with σ logit-normal, the velocity ε − x0 learnt
  through ComfyUI's x0 output; AdamW with warm-up and cosine decay, gradient clipping, EMA. The forward runs under
  the trainer's ``differentiable_ops`` (ComfyUI's fused RoPE has no backward; Flux adds residuals in place).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

import comfy.model_base
import comfy.supported_models

from . import render, store
from .base import (CONTEXT_DIM, PixelUnshuffleVAE, PoseEncoder, PretrainRecipe, ToyBase, ToyLatentFormat,
                   identity_set, images_to_latent, patcher, train_with_ema)

UNET_CONFIG = {"image_model": "flux", "in_channels": 12, "out_channels": 12, "vec_in_dim": None,
               "context_in_dim": CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 2,
               "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True,
               "guidance_embed": False, "txt_ids_dims": []}


def build_flux_model() -> comfy.model_base.Flux:
    config = comfy.supported_models.Flux(dict(UNET_CONFIG))
    config.latent_format = ToyLatentFormat()
    config.set_inference_dtype(torch.float32, None)
    return comfy.model_base.Flux(config, device=torch.device("cpu"))


def initialise(net: nn.Module, seed: int) -> None:
    """torch's default init (ComfyUI's layers skip it), norm scales 1, and zero for the output of every residual
    branch and of the final layer (each block starts as the identity; the first prediction is 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in net.modules():
            for cls in (nn.Linear, nn.LayerNorm):
                if isinstance(m, cls):
                    cls.reset_parameters(m)  # torch's own: ComfyUI's subclasses make it a no-op
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("norm.weight") and p.ndim == 1:
                    p.fill_(1.0)
            zero = [net.final_layer.linear] + [b.img_attn.proj for b in net.double_blocks] + \
                   [b.txt_attn.proj for b in net.double_blocks] + [b.img_mlp[2] for b in net.double_blocks] + \
                   [b.txt_mlp[2] for b in net.double_blocks] + [b.linear2 for b in net.single_blocks]
            for layer in zero:
                for p in layer.parameters():
                    p.zero_()


def pretrain(recipe: PretrainRecipe, identities: torch.Tensor, log: Callable[[str], None] = print):
    from invadapter_core.train.model import differentiable_ops

    model = build_flux_model()
    net = model.diffusion_model
    initialise(net, recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed + 1)
        encoder = PoseEncoder()
    net.requires_grad_(True)
    gen = torch.Generator().manual_seed(recipe.seed + 2)

    def batch_loss() -> torch.Tensor:
        b = recipe.batch
        who = torch.randint(0, len(identities), (b,), generator=gen)
        pose = render.random_poses(b, gen)
        x0 = images_to_latent(render.render(identities[who], pose))
        sigma = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal, as SD3/Flux train
        eps = torch.randn(x0.shape, generator=gen)
        context = encoder(pose, drop=torch.rand(b, generator=gen) < recipe.drop_pose)
        s = sigma[:, None, None, None]
        x = (1 - s) * x0 + s * eps
        with differentiable_ops():
            denoised = model.apply_model(x, sigma, c_crossattn=context)
        return (((x - denoised) / s - (eps - x0)) ** 2).mean()

    losses = train_with_ema(recipe, list(net.parameters()) + list(encoder.parameters()), batch_loss, log,
                            "DiT base pretraining")
    net.requires_grad_(False)
    encoder.requires_grad_(False)
    return model, encoder, losses


def load_or_pretrain(recipe: PretrainRecipe, log: Callable[[str], None] = print) -> tuple[ToyBase, dict]:
    """The cached DiT base for this recipe, or a freshly pretrained one (then cached)."""
    identities = identity_set(recipe.identities)
    path = store.cache_path("dit-base", ids=recipe.identities, steps=recipe.steps, batch=recipe.batch,
                            seed=recipe.seed, ema=recipe.ema)
    info = {"path": str(path), "cached": path.exists()}
    if path.exists():
        tensors, meta = store.load(path)
        model, encoder = build_flux_model(), PoseEncoder()
        model.diffusion_model.load_state_dict(store.prefixed(tensors, "net."))
        encoder.load_state_dict(store.prefixed(tensors, "encoder."))
        info["pretrain_seconds"] = float(meta.get("seconds", "nan"))
        info["final_loss"] = float(meta.get("final_loss", "nan"))
    else:
        log(f"pretraining the toy DiT base ({recipe.steps} steps at batch {recipe.batch}); cached as {path}")
        started = time.time()
        model, encoder, losses = pretrain(recipe, identities, log)
        info["pretrain_seconds"] = round(time.time() - started, 1)
        info["final_loss"] = sum(losses[-100:]) / len(losses[-100:])
        store.save(path, {**{f"net.{k}": v for k, v in model.diffusion_model.state_dict().items()},
                          **{f"encoder.{k}": v for k, v in encoder.state_dict().items()}},
                   {"seconds": str(info["pretrain_seconds"]), "final_loss": f"{info['final_loss']:.5f}"})
    model.diffusion_model.requires_grad_(False)
    encoder.requires_grad_(False)
    return ToyBase(patcher(model), encoder.eval(), PixelUnshuffleVAE(), identities), info
