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
from ..arch.levels import DIT_LEVELS, DIT_PRESETS, preset_levels
from ..comfyui.memory import fits_on_device, register
from ..comfyui.notify import notify
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
# MM-DiTs (Flux, Chroma: arch.levels.DIT_LEVELS) run every block on one token grid, so coarse and fine mean nothing
# there: every block, the double (two-stream) blocks only (Flux: 19 of 57 blocks, a third of the memory), or the
# early blocks (the double blocks and the first third of the single ones: 32 of 57).
DIT_CAPTURE = {"all levels": None,
               "double blocks": {lv for lv, w in DIT_PRESETS["double only"].items() if w != 0},
               "early blocks": {"double_early", "double_late", "single_early"}}


def capture_levels(model, capture: str) -> Optional[set[str]]:
    """The block levels a ``capture`` option keeps on this model's network (None: every block)."""
    dit = set(layout_of(model).levels.values()) <= set(DIT_LEVELS)
    options = DIT_CAPTURE if dit else CAPTURE
    if capture not in options:
        raise ValueError(f"capture {capture!r} is not an option for this {'MM-DiT' if dit else 'UNet'} model; "
                         f"choose one of {', '.join(options)}")
    return options[capture]


# At most this share of the free host memory goes to one reference's kept features when the device has no room
# (the rest stays for the models ComfyUI offloads there): an MM-DiT's features at 1024² are ~57 GB for 20 steps.
HOST_SHARE = 0.5


def room_for_features(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` of kept features have a place: the compute device beside ComfyUI's reserve, else pinned
    host memory within ``HOST_SHARE`` of what is free there."""
    if device.type != "cpu" and fits_on_device(nbytes, device):
        return True
    return nbytes <= HOST_SHARE * comfy.model_management.get_free_memory(torch.device("cpu"))


def kept_sigmas(model, sigmas: list[float], keep_percent: tuple[float, float] = (0.0, 1.0)) -> list[float]:
    """The inversion sigmas whose features are kept: those inside the window ``keep_percent`` (start, end) of the
    schedule, in the percent the apply node's start/end use, so a reference encoded for the window it is applied
    with keeps exactly the steps that window needs (a step outside it that a later application needs is made by one
    reference pass there)."""
    start, end = keep_percent
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"keep_percent {keep_percent} is not a window: give (start, end) with 0 <= start <= end <= 1")
    if (start, end) == (0.0, 1.0):
        return list(sigmas)
    ms = model.get_model_object("model_sampling")
    high, low = float(ms.percent_to_sigma(start)), float(ms.percent_to_sigma(end))
    return [s for s in sigmas if low <= s <= high]


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
                     store_dtype: Optional[torch.dtype] = None,
                     keep_percent: tuple[float, float] = (0.0, 1.0)) -> Reference:
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
                         convention, levels, sampler_name, store_dtype, keep_percent)


def invert_latent(model, latent: torch.Tensor, conds: dict[str, torch.Tensor] | torch.Tensor, steps: int,
                  scheduler: str, resolution: tuple[int, int], keep_features: bool = True, cross: bool = False,
                  convention: str = CONVENTIONS[0], levels: Optional[set[str]] = None,
                  sampler_name: str = "euler", store_dtype: Optional[torch.dtype] = None,
                  keep_percent: tuple[float, float] = (0.0, 1.0)) -> Reference:
    """DDIM inversion of a VAE latent (unscaled, as in LATENT dicts) with the caption at guidance 1.

    ``conds``: apply_model's conditioning (``reference_conds``), or just the caption context. ``levels``: keep only
    the features of blocks at these levels (the others are never used when their block weight is zero);
    ``store_dtype``: keep them in this dtype (e.g. float8: half the memory); ``keep_percent``: keep only the steps
    inside this (start, end) window of the schedule (``kept_sigmas``)."""
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
    kept = kept_sigmas(model, sigmas[:-1], keep_percent) if keep else []
    cache = FeatureCache(store_dtype)
    if kept:
        cache.reserve(kept)
    progress = comfy.utils.ProgressBar(len(sigmas) - 1)
    console = tqdm(total=len(sigmas) - 1, desc="Inv-Adapter inversion", disable=not comfy.utils.PROGRESS_BAR_ENABLED)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        nonlocal kept
        comfy.model_management.throw_exception_if_processing_interrupted()
        keeping = sigma in kept
        denoised, features = reference_pass(base, x, sigma, on_device, layout, cross and keeping,
                                            kept_blocks if keeping else set())
        if keeping and not len(cache) and not _room_for_steps(features, len(kept), store_dtype, device):
            kept, keeping = [], False
            cache.reserve([])
        if keeping:
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


def _room_for_steps(features, steps: int, store_dtype: Optional[torch.dtype], device) -> bool:
    """Whether ``steps`` steps shaped like ``features`` fit (``room_for_features``); if not, the user is told that
    none are kept and what keeps fewer (each generation step then makes its own with one reference pass)."""
    tensors = list(features.tensors().values())
    per_step = sum(t.numel() * (store_dtype or t.dtype).itemsize for t in tensors)
    if room_for_features(per_step * steps, torch.device(device)):
        return True
    notify(f"the reference's features would take {per_step * steps / 1e9:.1f} GB ({steps} steps of "
           f"{per_step / 1e6:.0f} MB), more than the device has room for and more than half the free host memory, "
           f"so none are kept: each generation step makes its own with one reference pass (slower). To keep them, "
           f"keep fewer: capture 'double blocks', feature precision fp8, a smaller reference, or a keep window")
    return False
