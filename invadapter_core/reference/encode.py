"""Encoding a face into a Reference: resize, VAE-encode, DDIM-invert with the caption at guidance 1, keep the features.

With the default convention every inversion evaluation is a reference pass at the latent's own sigma, so the
diffusion features at the inversion sigmas come for free: they are written straight into one buffer on the compute
device (no copy per step) and handed to ComfyUI's memory manager (``comfyui.memory``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils
from tqdm import tqdm

from ..arch.fit import check_served, default_resolution
from ..arch.layout import layout_of, model_family, weights_key
from ..arch.levels import preset_levels
from ..comfyui.memory import register
from ..files.images import to_rgb
from .capture import reference_pass
from .inversion import CONVENTIONS, invert, inversion_sigmas
from .reference import CONTEXT, FeatureCache, Reference

log = logging.getLogger("InvAdapter")
# what a reference pass gives apply_model; "guidance" is Flux-dev style models' distilled guidance embedding (without
# it their inversion would run unguided, a model they were never trained as)
COND_KEYS = ("c_crossattn", "y", "c_concat", "guidance")
# What the feature cache keeps (it grows with the reference resolution: SDXL at 1024 px is ~210 MB per step in half
# precision): every level, or only those a block-weights preset uses; in the model's precision or in 8-bit floats.
CAPTURE = {"all levels": None, "coarse levels": preset_levels("coarse"), "fine levels": preset_levels("fine")}
FEATURE_PRECISION = {"model": None, "fp8 (half the memory)": torch.float8_e4m3fn}


def prepare_images(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """IMAGE [B, H, W, C] in 0..1 -> RGB [B, res, res, 3]: centre square crop, then resize (the face crop node
    already makes square crops; this keeps any other image usable)."""
    image = to_rgb(image)
    pixels = comfy.utils.common_upscale(image.movedim(-1, 1).float(), resolution, resolution, "bicubic", "center")
    return pixels.movedim(1, -1).clamp(0.0, 1.0)


def caption_entry(conditioning) -> tuple[torch.Tensor, dict]:
    """The caption's cross-attention context [1, T, D] and its options (pooled output ...) from a CONDITIONING."""
    if not conditioning:
        raise ValueError("the caption CONDITIONING is empty: connect a CLIPTextEncode of the face's caption")
    if len(conditioning) > 1:
        log.warning("Inv-Adapter: the caption conditioning has %d entries; the first is used", len(conditioning))
    context, options = conditioning[0][0], conditioning[0][1]
    return context[:1].float(), {k: (v[:1] if torch.is_tensor(v) else v) for k, v in options.items()}


def reference_conds(model, context: torch.Tensor, options: dict, x0: torch.Tensor, pixel_hw: tuple[int, int]
                    ) -> dict[str, torch.Tensor]:
    """apply_model's conditioning for reference passes, built by the model's own ``extra_conds`` (what the
    sampler uses): the caption, and where the UNet takes them the ADM vector (SDXL: the caption's pooled output
    and the reference's own size, uncropped) and the concat input of inpainting models (ComfyUI's own default for
    a generation without an image to inpaint: mask everywhere, blank image), so the reference branch runs under the
    same conditions as an ordinary generation."""
    h, w = pixel_hw
    params = dict(options)
    params.update(device=x0.device, noise=x0, latent_image=x0, cross_attn=context, width=w, height=h,
                  target_width=w, target_height=h, crop_w=0, crop_h=0, prompt_type="positive")
    out = model.model.extra_conds(**params)
    return {k: v.cond.float().cpu() for k, v in out.items() if k in COND_KEYS}


def sampler_sigmas(model, steps: int, scheduler: str, sampler_name: str = "euler") -> torch.Tensor:
    """The schedule KSampler runs for these settings, built by KSampler itself (samplers that drop the penultimate
    sigma, like uni_pc or dpm_2, get theirs): an inversion on it makes every sampler step find its features."""
    return comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                   scheduler=scheduler, denoise=1.0, model_options=model.model_options).sigmas


def encode_reference(model, vae, image: torch.Tensor, conditioning, steps: int, scheduler: str, resolution: int = 0,
                     keep_features: bool = True, cross: bool = False, convention: str = CONVENTIONS[0],
                     levels: Optional[set[str]] = None, sampler_name: str = "euler",
                     store_dtype: Optional[torch.dtype] = None) -> Reference:
    """Face image(s) + caption -> Reference (the images are one identity: a batch = several photos of it).
    ``resolution`` 0 takes the family's own (1024 for SDXL, 768 for SD2.x v-prediction, else 512)."""
    check_served(model)
    present = set(layout_of(model).levels.values())
    if levels is not None and not levels & present:
        raise ValueError(f"the capture setting keeps the levels {', '.join(sorted(levels))}, which this "
                         f"{model_family(model)} model does not have (its levels: {', '.join(sorted(present))}): "
                         f"choose capture 'all levels'")
    resolution = resolution or default_resolution(model)
    pixels = prepare_images(image, resolution)
    context, options = caption_entry(conditioning)
    latent = vae.encode(pixels)
    x0 = model.model.process_latent_in(latent)
    conds = reference_conds(model, context, options, x0, (resolution, resolution))
    return invert_latent(model, latent, conds, steps, scheduler, (resolution, resolution), keep_features, cross,
                         convention, levels, sampler_name, store_dtype)


def invert_latent(model, latent: torch.Tensor, conds: dict[str, torch.Tensor] | torch.Tensor, steps: int,
                  scheduler: str, resolution: tuple[int, int], keep_features: bool = True, cross: bool = False,
                  convention: str = CONVENTIONS[0], levels: Optional[set[str]] = None,
                  sampler_name: str = "euler", store_dtype: Optional[torch.dtype] = None) -> Reference:
    """DDIM inversion of a VAE latent (unscaled, as in LATENT dicts) with the caption at guidance 1.

    ``conds``: apply_model's conditioning (``reference_conds``), or just the caption context. ``levels``: keep only
    the features of blocks at these levels (the others are never used when their block weight is zero);
    ``store_dtype``: keep them in this dtype (e.g. float8: half the memory)."""
    if torch.is_tensor(conds):
        conds = {CONTEXT: conds}
    comfy.model_management.load_models_gpu([model])
    base = model.model
    device = model.load_device
    x0 = base.process_latent_in(latent).to(device=device, dtype=torch.float32)
    on_device = {k: v.to(device) for k, v in conds.items()}
    layout = layout_of(model)
    kept_blocks = layout.at_levels(levels)
    sigmas = inversion_sigmas(sampler_sigmas(model, steps, scheduler, sampler_name), convention)
    # Only at the latent's own sigma is an inversion pass also the reference pass the generation needs.
    keep = keep_features and convention == "lowest sigma"
    cache = FeatureCache(store_dtype)
    if keep:
        cache.reserve(sigmas[:-1])
    progress = comfy.utils.ProgressBar(len(sigmas) - 1)
    console = tqdm(total=len(sigmas) - 1, desc="Inv-Adapter inversion", disable=not comfy.utils.PROGRESS_BAR_ENABLED)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        denoised, features = reference_pass(base, x, sigma, on_device, layout, cross and keep, kept_blocks)
        if keep:
            cache.put(sigma, features, pin=True)
        return denoised

    def stepped(i: int, x: torch.Tensor) -> None:
        progress.update(1)
        console.update(1)

    try:
        states = invert(denoise, x0, sigmas, on_step=stepped, convention=convention)
    finally:
        console.close()
    register(cache.packs(), device)
    return Reference(family=model_family(model), resolution=resolution,
                     sigmas=torch.tensor(sigmas, dtype=torch.float64), states=states.float().cpu(),
                     conds={k: v.float().cpu() for k, v in conds.items()}, features=cache,
                     weights=weights_key(model), convention=convention, levels=sorted(levels) if levels else None)
