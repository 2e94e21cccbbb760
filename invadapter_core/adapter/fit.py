"""Whether a reference or an adapter fits a model, checked at Apply before any network runs.

Every refusal says what was expected and what was found, so nothing fails later inside KSampler with a raw shape
error. Which models are served at all is ``arch.fit``'s check.
"""
from __future__ import annotations

from ..arch.fit import is_joint
from ..arch.layout import ModelFamilyError, layout_of, model_family
from ..files.validation import AdapterFileError, ReferenceFileError, check_magnitude, peak
from .eaa import InvAdapter


def check_reference_fits(model, reference) -> None:
    """The reference was encoded by a model of this family and layout: refuse, naming both, otherwise."""
    family = model_family(model)
    if reference.family != family:
        raise ModelFamilyError(f"this reference was encoded with a {reference.family} model and cannot be applied to "
                               f"a {family} model: encode the face again with this checkpoint "
                               f"(InvAdapterEncodeReference)")
    fix = "encode the face again with this checkpoint (InvAdapterEncodeReference)"
    layout = layout_of(model)
    channels = layout.latent_channels
    if reference.states.shape[2] != channels:
        raise ModelFamilyError(f"the reference's latents have {reference.states.shape[2]} channels, this model's "
                               f"{channels}: {fix}")
    context_dim = layout.context_dim
    found = reference.context.shape[-1]
    if found != context_dim:
        raise ModelFamilyError(f"the reference's caption conditioning is {found}-d, this model's text encoder gives "
                               f"{context_dim}-d: {fix}")
    adm = layout.adm_channels
    y = reference.conds.get("y")
    # an MM-DiT without a pooled input (Chroma, Qwen-Image) is still handed one by a text encoder that makes one,
    # and ignores it; on a UNet a vector the network does not take means another family
    ignored = adm is None and is_joint(model)
    if not ignored and ((adm is None) != (y is None) or (y is not None and y.shape[-1] != adm)):
        raise ModelFamilyError(f"the reference's ADM vector is {'absent' if y is None else f'{y.shape[-1]}-d'}, this "
                               f"model {'takes none' if adm is None else f'needs {adm}-d'}: {fix}")
    dims = layout.dims
    for (kind, name), shape in reference.features.shapes().items():
        if name not in dims:
            raise ModelFamilyError(f"the reference holds features of block {name}, which this {family} model does "
                                   f"not have (another block layout): {fix}")
        if shape[-1] != layout.feature_width(name):
            raise ModelFamilyError(f"the reference's {kind}-attention features of block {name} are {shape[-1]}-d, "
                                   f"this model's block is {layout.feature_width(name)}-d: {fix}")


def check_adapter_fits(adapter: InvAdapter, model, reference=None) -> None:
    """Refuse an adapter trained for another architecture (or a reference it cannot read), naming what was
    expected and what was found."""
    family = model_family(model)
    if adapter.family and adapter.family != family:
        raise AdapterFileError(f"Inv-Adapter '{adapter.name}' was made for model family {adapter.family}, but the "
                               f"model is {family}: load weights trained for {family} or use 'init from model'")
    layout = layout_of(model)
    architecture = type(layout).__name__[:-len("Layout")]
    if adapter.architecture != architecture and any(True for _ in adapter.parameters()):  # 'init from model': any
        raise AdapterFileError(f"Inv-Adapter '{adapter.name}' was made for the {adapter.architecture} network of model "
                               f"family {adapter.family or 'unknown'}, but the {family} model's network is a "
                               f"{architecture}: load weights trained for {family} or use 'init from model'")
    dims = layout.dims
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
        tokens = layout.tokens(reference.resolution[0])
        for name, layer in adapter.cross_layers().items():
            if layer.token_agg.in_features != tokens[name]:
                raise AdapterFileError(f"Inv-Adapter '{adapter.name}' aggregates {layer.token_agg.in_features} "
                                       f"reference tokens in block {name}; a {reference.resolution[0]} px reference "
                                       f"has {tokens[name]}: encode the face at {adapter.reference_resolution} px")


def check_levels_fit(model, reference) -> None:
    """A reference that keeps only some levels (its capture setting) keeps at least one block of this model."""
    if reference.levels is None:
        return
    present = sorted(set(layout_of(model).levels.values()))
    if not set(reference.levels) & set(present):
        raise ModelFamilyError(f"the reference keeps the features of {', '.join(reference.levels)} only, and this "
                               f"{model_family(model)} model has no transformer block at those levels (its levels: "
                               f"{', '.join(present)}): encode the face again with capture 'all levels'")


def check_magnitudes(model, adapter: InvAdapter, reference) -> None:
    """The adapter's weights and a loaded reference's values stay below what the model's compute dtype can square
    (``files.validation.magnitude_limit``): refuse, naming the file, what would otherwise sample a black image."""
    dtype = model.model.get_dtype_inference()
    params = list(adapter.parameters())
    if params:
        check_magnitude(AdapterFileError, f"Inv-Adapter '{adapter.name}'", "its weights", max(peak(p) for p in params),
                        dtype, "load weights trained without overflow, or re-export them")
    if reference.peak is not None:
        check_magnitude(ReferenceFileError, reference.source or "the reference", "its trajectory, caption or features",
                        reference.peak, dtype, "encode the face again and save the reference again")
