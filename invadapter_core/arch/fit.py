"""Which models the pack serves, refused in one line before any network runs, and what follows from a family.

Whether a reference or an adapter fits a served model is the adapter stage's check (``adapter.fit``).
"""
from __future__ import annotations

from typing import Optional

from .layout import ARCHITECTURES, ModelFamilyError, layout_of, model_family, served_families

# ComfyUI configs with a spatial-transformer UNet that are not text-to-image generators
NOT_GENERATORS = {"SD_X4Upscaler": "an upscaler", "Stable_Zero123": "a novel-view model", "LotusD": "a depth model"}


def _unet_config(model) -> dict:
    return model.model.model_config.unet_config


def not_served_because(model) -> Optional[str]:
    """Why the pack cannot run the method on ``model`` (None: it can)."""
    import comfy.model_base

    net = model.get_model_object("diffusion_model")
    architecture = next((cls for cls in ARCHITECTURES if cls.describes(net)), None)
    if architecture is None:
        return f"its network is a {type(net).__name__}, which no layout of the pack describes"
    if not architecture.SERVES:
        return f"its {type(net).__name__} network is not served by the nodes yet"
    if architecture.refuses(net) is not None:
        return architecture.refuses(net)
    if model_family(model) in NOT_GENERATORS:
        return f"it is {NOT_GENERATORS[model_family(model)]}"
    if _unet_config(model).get("use_temporal_attention") or _unet_config(model).get("use_temporal_resblock"):
        return "it is a video model"
    served_types = {comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION,
                    comfy.model_base.ModelType.V_PREDICTION_EDM, comfy.model_base.ModelType.EDM,
                    comfy.model_base.ModelType.V_PREDICTION_CONTINUOUS}
    # rectified flow (x = (1 - sigma) x0 + sigma noise): the inversion step is its exact Euler step
    # (reference.inversion), served where the layout is an MM-DiT the joint EAA knows
    flow_types = {comfy.model_base.ModelType.FLUX, comfy.model_base.ModelType.FLOW}
    if model.model.model_type not in served_types and not (is_joint(model) and model.model.model_type in flow_types):
        return f"its {model.model.model_type.name} parameterisation is not x = x0 + sigma * noise"
    try:
        layout_of(model)
    except ModelFamilyError:
        return "its network has no attention blocks"
    return None


def check_served(model) -> None:
    """Refuse, in one line naming the families the pack serves, any model it cannot run the method on."""
    why = not_served_because(model)
    if why is not None:
        raise ModelFamilyError(f"Inv-Adapter cannot use this {model_family(model)} model ({why}); it serves "
                               f"{served_families()}")


def is_joint(model) -> bool:
    """An MM-DiT (Flux, Chroma, Qwen-Image): the EAA sits inside its joint attention (``adapter.joint``), not in a
    UNet's."""
    from .flux import FluxLayout
    from .qwen_image import QwenImageLayout

    net = model.get_model_object("diffusion_model")
    return FluxLayout.describes(net) or QwenImageLayout.describes(net)


def is_sdxl_family(model) -> bool:
    import comfy.supported_models as sm

    return isinstance(model.model.model_config, (sm.SDXL, sm.SDXLRefiner))


def default_resolution(model) -> int:
    """The reference resolution a family was trained at: 1024 for SDXL, 768 for SD2.x v-prediction, else 512.
    Flux, Chroma and Qwen-Image (trained at 1024 px and above) take 512: a face crop needs no more, and the
    reference's image tokens, their kept K/V (Flux-dev: 717 MB per step in bf16 at 512, 2.9 GB at 1024) and the
    EAA's attention over them all grow with its area (a quarter at 512)."""
    import comfy.model_base
    import comfy.supported_models as sm

    if is_joint(model):
        return 512
    if is_sdxl_family(model):
        return 1024
    v_prediction = model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    if isinstance(model.model.model_config, sm.SD20) and v_prediction:
        return 768
    return 512
