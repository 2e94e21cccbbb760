"""Which models the pack serves, and whether a reference or an adapter fits a model, checked before any UNet runs.

Every refusal says what was expected and what was found, so nothing fails later inside KSampler with a raw shape
error.
"""
from __future__ import annotations

from .eaa import InvAdapter
from .unet import ModelFamilyError, block_dims, model_family, tokens_per_block, transformer_blocks

SERVES = ("SD1.x, SD2.x (512 and 768-v), SDXL and its family (SDXL fine-tunes such as Pony, Illustrious or NoobAI, "
          "SSD-1B, Segmind Vega, KOALA, the SDXL refiner) and their inpainting checkpoints")
# ComfyUI configs with a spatial-transformer UNet that are not text-to-image generators
NOT_GENERATORS = {"SD_X4Upscaler": "an upscaler", "Stable_Zero123": "a novel-view model", "LotusD": "a depth model"}


def _unet_config(model) -> dict:
    return model.model.model_config.unet_config


def check_served(model) -> None:
    """Refuse, in one line naming the families the pack serves, any model it cannot run the method on."""
    import comfy.model_base
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    family = model_family(model)
    why = None
    served_types = {comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION,
                    comfy.model_base.ModelType.V_PREDICTION_EDM, comfy.model_base.ModelType.EDM,
                    comfy.model_base.ModelType.V_PREDICTION_CONTINUOUS}
    unet = model.get_model_object("diffusion_model")
    if type(unet) is not UNetModel:
        why = f"its network is a {type(unet).__name__}, not a Stable Diffusion UNet"
    elif family in NOT_GENERATORS:
        why = f"it is {NOT_GENERATORS[family]}"
    elif _unet_config(model).get("use_temporal_attention") or _unet_config(model).get("use_temporal_resblock"):
        why = "it is a video model"
    elif model.model.model_type not in served_types:
        why = f"its {model.model.model_type.name} parameterisation is not x = x0 + sigma * noise"
    if why is None:
        try:
            transformer_blocks(model)
        except ModelFamilyError:
            why = "its UNet has no spatial transformers"
    if why is not None:
        raise ModelFamilyError(f"Inv-Adapter cannot use this {family} model ({why}); it serves {SERVES}")


def is_sdxl_family(model) -> bool:
    import comfy.supported_models as sm

    return isinstance(model.model.model_config, (sm.SDXL, sm.SDXLRefiner))


def default_resolution(model) -> int:
    """The reference resolution a family was trained at: 1024 for SDXL, 768 for SD2.x v-prediction, else 512."""
    import comfy.model_base
    import comfy.supported_models as sm

    if is_sdxl_family(model):
        return 1024
    if isinstance(model.model.model_config, sm.SD20) and model.model.model_type == comfy.model_base.ModelType.V_PREDICTION:
        return 768
    return 512


def latent_channels(model) -> int:
    return int(model.model.latent_format.latent_channels)


def check_reference_fits(model, reference) -> None:
    """The reference was encoded by a model of this family and layout: refuse, naming both, otherwise."""
    family = model_family(model)
    if reference.family != family:
        raise ModelFamilyError(f"this reference was encoded with a {reference.family} model and cannot be applied to "
                               f"a {family} model: encode the face again with this checkpoint "
                               f"(InvAdapterEncodeReference)")
    fix = "encode the face again with this checkpoint (InvAdapterEncodeReference)"
    channels = latent_channels(model)
    if reference.states.shape[2] != channels:
        raise ModelFamilyError(f"the reference's latents have {reference.states.shape[2]} channels, this model's "
                               f"{channels}: {fix}")
    blocks = transformer_blocks(model)
    context_dim = next(iter(blocks.values())).attn2.to_k.in_features
    found = reference.context.shape[-1]
    if found != context_dim:
        raise ModelFamilyError(f"the reference's caption conditioning is {found}-d, this model's text encoder gives "
                               f"{context_dim}-d: {fix}")
    adm = _unet_config(model).get("adm_in_channels")
    y = reference.conds.get("y")
    if (adm is None) != (y is None) or (y is not None and y.shape[-1] != adm):
        raise ModelFamilyError(f"the reference's ADM vector is {'absent' if y is None else f'{y.shape[-1]}-d'}, this "
                               f"model {'takes none' if adm is None else f'needs {adm}-d'}: {fix}")
    dims = block_dims(blocks)
    for (kind, name), shape in reference.features.shapes().items():
        if name not in dims:
            raise ModelFamilyError(f"the reference holds features of block {name}, which this {family} model does "
                                   f"not have (another block layout): {fix}")
        if shape[-1] != dims[name][0]:
            raise ModelFamilyError(f"the reference's {kind}-attention features of block {name} are {shape[-1]}-d, "
                                   f"this model's block is {dims[name][0]}-d: {fix}")


def check_adapter_fits(adapter: InvAdapter, model, reference=None) -> None:
    """Refuse an adapter trained for another architecture (or a reference it cannot read), naming what was
    expected and what was found."""
    from .weights import AdapterFileError

    family = model_family(model)
    if adapter.family and adapter.family != family:
        raise AdapterFileError(f"Inv-Adapter '{adapter.name}' was made for model family {adapter.family}, but the "
                               f"model is {family}: load weights trained for {family} or use 'init from model'")
    dims = block_dims(transformer_blocks(model))
    for kind, layers in (("self", adapter.self_layers()), ("cross", adapter.cross_layers())):
        for name, layer in layers.items():
            if name not in dims:
                raise AdapterFileError(f"Inv-Adapter '{adapter.name}' has {kind} EAA for block {name}, which this "
                                       f"{family} model does not have (its blocks: {', '.join(dims)})")
            dim, inner = dims[name]
            for proj in ("to_k", "to_v"):
                got = tuple(getattr(layer, proj).weight.shape)
                if got != (inner, dim):
                    raise AdapterFileError(f"Inv-Adapter '{adapter.name}': {kind}.{name}.{proj} has shape {got}, the "
                                           f"model expects {(inner, dim)}: the file was trained for another "
                                           f"architecture")
    if adapter.has_cross and reference is not None:
        tokens = tokens_per_block(model, reference.resolution[0])
        for name, layer in adapter.cross_layers().items():
            if layer.token_agg.in_features != tokens[name]:
                raise AdapterFileError(f"Inv-Adapter '{adapter.name}' aggregates {layer.token_agg.in_features} "
                                       f"reference tokens in block {name}; a {reference.resolution[0]} px reference "
                                       f"has {tokens[name]}: encode the face at {adapter.reference_resolution} px")


def check_levels_fit(model, reference) -> None:
    """A reference that keeps only some levels (its capture setting) keeps at least one block of this model."""
    from .unet import block_levels

    if reference.levels is None:
        return
    present = sorted(set(block_levels(model).values()))
    if not set(reference.levels) & set(present):
        raise ModelFamilyError(f"the reference keeps the features of {', '.join(reference.levels)} only, and this "
                               f"{model_family(model)} model has no transformer block at those levels (its levels: "
                               f"{', '.join(present)}): encode the face again with capture 'all levels'")


def check_magnitudes(model, adapter: InvAdapter, reference) -> None:
    """The adapter's weights and a loaded reference's values stay below what the model's compute dtype can square
    (``validation.magnitude_limit``): refuse, naming the file, what would otherwise sample a black image."""
    from .reference import ReferenceFileError
    from .validation import check_magnitude, peak
    from .weights import AdapterFileError

    dtype = model.model.get_dtype_inference()
    params = list(adapter.parameters())
    if params:
        check_magnitude(AdapterFileError, f"Inv-Adapter '{adapter.name}'", "its weights", max(peak(p) for p in params),
                        dtype, "load weights trained without overflow, or re-export them")
    if reference.peak is not None:
        check_magnitude(ReferenceFileError, reference.source or "the reference", "its trajectory, caption or features",
                        reference.peak, dtype, "encode the face again and save the reference again")
