"""Encoding a face into a Reference: resize, VAE-encode, DDIM-invert with the caption, keep the features.

Every inversion evaluation is a reference pass (``comfy_model.reference_pass``), so the diffusion features at the
inversion sigmas come for free and are kept in the reference's cache.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from .comfy_model import ModelFamilyError, model_family, model_key, reference_pass
from .ddim import invert, inversion_sigmas
from .images import to_rgb
from .reference import FeatureCache, Reference

log = logging.getLogger("InvAdapter")
SUPPORTED_FAMILIES = ("SD15", "SD20", "SD21UnclipL", "SD21UnclipH")  # UNets whose only condition is c_crossattn


def prepare_images(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """IMAGE [B, H, W, C] in 0..1 -> RGB [B, res, res, 3]: centre square crop, then resize (the face crop node
    already makes square crops; this keeps any other image usable)."""
    image = to_rgb(image)
    pixels = comfy.utils.common_upscale(image.movedim(-1, 1).float(), resolution, resolution, "bicubic", "center")
    return pixels.movedim(1, -1).clamp(0.0, 1.0)


def conditioning_context(conditioning) -> torch.Tensor:
    """The caption's cross-attention context [1, T, D] from a CONDITIONING list."""
    if not conditioning:
        raise ValueError("the caption CONDITIONING is empty: connect a CLIPTextEncode of the face's caption")
    if len(conditioning) > 1:
        log.warning("Inv-Adapter: the caption conditioning has %d entries; the first is used", len(conditioning))
    return conditioning[0][0][:1].float()


def encode_reference(model, vae, image: torch.Tensor, conditioning, steps: int, scheduler: str, resolution: int,
                     keep_features: bool = True, cross: bool = False) -> Reference:
    """Face image(s) + caption -> Reference (the images are one identity: a batch = several photos of it)."""
    check_supported(model)
    pixels = prepare_images(image, resolution)
    context = conditioning_context(conditioning)
    latent = vae.encode(pixels)
    return invert_latent(model, latent, context, steps, scheduler, (resolution, resolution), keep_features, cross)


def check_supported(model) -> None:
    family = model_family(model)
    if family not in SUPPORTED_FAMILIES:
        raise ModelFamilyError(f"Inv-Adapter supports SD1.x/SD2.x checkpoints ({', '.join(SUPPORTED_FAMILIES)}); "
                               f"this model is {family}")


def invert_latent(model, latent: torch.Tensor, context: torch.Tensor, steps: int, scheduler: str,
                  resolution: tuple[int, int], keep_features: bool = True, cross: bool = False) -> Reference:
    """DDIM inversion of a VAE latent (unscaled, as in LATENT dicts) with the caption at guidance 1."""
    comfy.model_management.load_models_gpu([model])
    base = model.model
    x0 = base.process_latent_in(latent).to(device=model.load_device, dtype=torch.float32)
    sigmas = inversion_sigmas(comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps))
    cache = FeatureCache()
    progress = comfy.utils.ProgressBar(len(sigmas) - 1)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        denoised, features = reference_pass(base, x, sigma, context, cross)
        if keep_features:
            cache.put(sigma, features, pin=True)
        return denoised

    states = invert(denoise, x0, sigmas, on_step=lambda i, x: progress.update(1))
    cache.to_(comfy.model_management.unet_offload_device())
    return Reference(family=model_family(model), resolution=resolution,
                     sigmas=torch.tensor(sigmas, dtype=torch.float64), states=states.float().cpu(),
                     context=context.cpu(), features=cache, model_key=model_key(model))
