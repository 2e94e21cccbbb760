"""Issue 23, in process: references that combine or name what differs, values a compute dtype cannot hold, float
widgets that are not numbers, and face crops of files the loader could only partly decode (table-driven)."""
import dataclasses
import functools
import math

import pytest
import torch
from PIL import Image

import comfy.supported_models
from invadapter_core.adapter.application import Application, apply_identity, install
from invadapter_core.adapter.eaa import InvAdapter, SelfEAA
from invadapter_core.adapter.weights import AdapterFileError, init_from_model
from invadapter_core.arch.layout import layout_of
from invadapter_core.comfyui.notify import collecting
from invadapter_core.files.images import truncated_image_file
from invadapter_core.files.validation import magnitude_limit
from invadapter_core.reference.encode import CAPTURE, invert_latent
from invadapter_core.reference.reference import (ReferenceFileError, combine_references, load_reference,
                                                  save_reference)
from support import models
from test_comfy_model import STEPS, face_latent, sample


# ------------------------------------------------------------------------------------------------ combining
def encode(model, caption, seed=1, steps=STEPS, scheduler="simple", **kw):
    return invert_latent(model, face_latent(1, seed), caption, steps, scheduler, (64, 64), **kw)


def keeps(ref) -> set:
    return {name for _, name in ref.features.shapes()}


COMBINE_CASES = {
    # name: (encode options of reference 2, or a change to it; fragments of the refusal, or None: it combines)
    "capture all vs coarse levels": (dict(levels=CAPTURE["coarse levels"]), None),
    "capture coarse vs fine levels": (dict(levels=CAPTURE["fine levels"]), None),
    "fp8 features vs the model's precision": (dict(store_dtype=torch.float8_e4m3fn), None),
    "classic vs lowest sigma inversion": (dict(convention="classic"),
                                          ["reference 2", "'classic' inversion", "'lowest sigma'", "same inversion"]),
    "other step counts": (dict(steps=STEPS + 1), ["over 7 steps", "reference 1 over 6", "same steps"]),
    "same steps, other scheduler": (dict(scheduler="karras"), ["other sigmas", "same 6 steps", "scheduler"]),
    "other resolution": (lambda r: dataclasses.replace(r, resolution=(72, 72)), ["resolution (72, 72)", "(64, 64)"]),
    "other family": (lambda r: dataclasses.replace(r, family="SD20"), ["SD20 model", "SD15", "same checkpoint"]),
    "no common level": (lambda r: dataclasses.replace(r, levels=["middle"]), ["no common block level",
                                                                              "reference 1: input_high",
                                                                              "reference 2: middle"]),
}


@pytest.mark.parametrize("case", list(COMBINE_CASES))
def test_combine_references_combines_what_it_can_and_names_what_differs(model, caption, case):
    how, fragments = COMBINE_CASES[case]
    first = encode(model, caption, seed=1, levels={"input_high"} if case == "no common level" else
                   (CAPTURE["coarse levels"] if case == "capture coarse vs fine levels" else None))
    second = encode(model, caption, seed=2, **how) if isinstance(how, dict) else how(encode(model, caption, 2))
    if fragments is not None:
        with pytest.raises(ReferenceFileError) as refused:
            combine_references([first, second])
        message = str(refused.value)
        for fragment in fragments:
            assert fragment in message, message
        if "inversion" in case:
            assert "steps" not in message and "scheduler" not in message, message
        return
    with collecting() as notices:
        both = combine_references([first, second])
    assert both.images == 2 and notices, "the user is told what the combination dropped or widened"
    if "levels" in case:
        common = sorted(set(first.levels) & set(second.levels)) if first.levels else sorted(second.levels)
        assert both.levels == common and "capture settings" in notices[0]
        assert keeps(both) == keeps(first) & keeps(second)
    else:
        assert both.features.store_dtype is None and "precisions" in notices[0]
        f = both.features.get(both.features.sigmas()[0])
        assert {t.dtype for t in f.self_attn.values()} == {torch.float32}
    image = sample(apply(model, both), caption)
    assert torch.isfinite(image).all()


def apply(model, ref, adapter=None):
    return install(model, Application(adapter or init_from_model(""), ref, model, 1.0, 1.0, 1e9, 0.0))


# ------------------------------------------------------------------------------------------------ magnitudes
@functools.cache
def tiny_model(dtype):
    """The tiny SD1.5-shaped model computing in ``dtype`` (a real ComfyUI BaseModel)."""
    config = models.model_config(comfy.supported_models.SD15,
                                 models.sd15_unet_config(models.TINY["num_res_blocks"], models.TINY["model_channels"]),
                                 dtype, num_heads=models.TINY["num_heads"])
    return models.random_patcher(config)


def own_adapter(model, scale: float) -> InvAdapter:
    """A trained-style adapter for ``model``: its own to_k / to_v weights, times ``scale``, in float32."""
    layers = {}
    layout = layout_of(model)
    for name, (dim, inner) in layout.dims.items():
        tb = layout.blocks[name]
        layer = SelfEAA(dim, inner)
        with torch.no_grad():
            layer.to_k.weight.copy_(tb.attn1.to_k.weight.float() * scale)
            layer.to_v.weight.copy_(tb.attn1.to_v.weight.float() * scale)
        layers[name] = layer
    return InvAdapter("SD15", None, None, layers, {}, name=f"scaled_{scale:g}.safetensors")


def test_the_bound_is_what_the_dtype_can_square():
    assert magnitude_limit(torch.float16) == pytest.approx(math.sqrt(65504))  # 255.94
    assert magnitude_limit(torch.float32) == pytest.approx(1.8446744e19, rel=1e-6)
    assert magnitude_limit(torch.float16) ** 2 <= torch.finfo(torch.float16).max


MAGNITUDE_CASES = {
    # name: (compute dtype, adapter weight scale, reference scale, refusal fragments or None)
    "plain adapter, float16": (torch.float16, 1.0, 1.0, None),
    "plain adapter, float32": (torch.float32, 1.0, 1.0, None),
    "adapter x1e4, float16": (torch.float16, 1e4, 1.0, ["Inv-Adapter 'scaled_10000.safetensors'", "its weights",
                                                        "float16", "above 256", "black image"]),
    "adapter x1e4, float32": (torch.float32, 1e4, 1.0, None),
    "adapter x1e30, float32": (torch.float32, 1e30, 1.0, ["scaled_1e+30.safetensors", "float32", "1.84e+19"]),
    "reference x1e4, float16": (torch.float16, 1.0, 1e4, ["ref.safetensors", "trajectory, caption or features",
                                                          "float16"]),
}


@pytest.mark.parametrize("case", list(MAGNITUDE_CASES))
def test_apply_refuses_values_the_compute_dtype_cannot_hold(caption, tmp_path, case):
    dtype, adapter_scale, ref_scale, fragments = MAGNITUDE_CASES[case]
    model = tiny_model(dtype)
    assert model.model.get_dtype_inference() == dtype
    ref = encode(model, caption)
    path = str(tmp_path / "ref.safetensors")
    save_reference(ref, path)
    ref = load_reference(path)
    if ref_scale != 1.0:
        ref.peak *= ref_scale  # as a file whose states were scaled (test_validation writes such files)
    adapter = own_adapter(model, adapter_scale)
    if fragments is None:
        apply_identity(model, adapter, ref, 1.0, 1.0, 0.0, 1.0)
        return
    error = AdapterFileError if adapter_scale != 1.0 else ReferenceFileError
    with pytest.raises(error) as refused:
        apply_identity(model, adapter, ref, 1.0, 1.0, 0.0, 1.0)
    for fragment in fragments:
        assert fragment in str(refused.value), str(refused.value)


def test_an_adapter_past_the_float16_bound_would_have_sampled_a_black_image(caption):
    """What the refusal saves the user from: the same adapter installed without the check samples NaN in float16,
    while one within the bound samples finite values."""
    model = tiny_model(torch.float16)
    ref = encode(model, caption)
    within, past = own_adapter(model, 1.0), own_adapter(model, 1e4)
    assert torch.isfinite(sample(apply(model, ref, within), caption)).all()
    assert not torch.isfinite(sample(apply(model, ref, past), caption)).all()


# ------------------------------------------------------------------------------------------------ float widgets
def pack_nodes(pack):
    return pack.nodes.all_nodes()


def float_inputs(pack):
    from comfy_api.latest import io

    found = []
    for node in pack_nodes(pack):
        for spec in node.define_schema().inputs:
            if isinstance(spec, io.Float.Input):
                found.append((node, spec.id))
    return found


def test_every_float_widget_of_the_pack_is_covered(pack):
    names = {node.define_schema().node_id for node, _ in float_inputs(pack)}
    assert {"InvAdapterApply", "InvAdapterBlockWeights", "InvAdapterAttentionMaps", "InvAdapterFaceCrop"} <= names


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_at_the_node_that_got_them(pack, value):
    """Every float input of every node of the pack (nodes added later included), NaN and +/-inf: one line naming the
    node, the input and the range. The other inputs are placeholders: the check runs before the node does."""
    checked = 0
    for node, name in float_inputs(pack):
        schema = node.define_schema()
        inputs = {spec.id: getattr(spec, "default", None) for spec in schema.inputs}
        inputs[name] = value
        with pytest.raises(ValueError) as refused:
            node.execute(**inputs)
        message = str(refused.value)
        assert f"'{name}' is {value}" in message and "not a finite number" in message, message
        assert schema.display_name in message and "\n" not in message
        checked += 1
    assert checked >= 22


def test_finite_floats_pass_through(pack):
    weights = next(n for n in pack_nodes(pack) if n.define_schema().node_id == "InvAdapterBlockWeights")
    levels = {spec.id: 0.5 for spec in weights.define_schema().inputs if spec.id != "preset"}
    out = weights.execute(preset="custom", **levels)
    assert out.result[0].scale("self", "middle") == 0.5


# ------------------------------------------------------------------------------------------------ truncated images
def png_bytes(tmp_path) -> bytes:
    from support.host import ROOT

    return (ROOT / "assets" / "face.png").read_bytes()


TRUNCATION_CASES = {
    # name: (bytes kept of the file, or None for all; incomplete?)
    "complete file": (None, False),
    "image data cut in half": (0.5, True),
    "only the end marker missing": (-12, False),  # every pixel is there: nothing to say
}


@pytest.mark.parametrize("case", list(TRUNCATION_CASES))
def test_truncated_image_files_are_told_apart_from_complete_ones(tmp_path, case):
    keep, incomplete = TRUNCATION_CASES[case]
    data = png_bytes(tmp_path)
    cut = data if keep is None else data[:int(len(data) * keep)] if isinstance(keep, float) else data[:keep]
    path = tmp_path / "face.png"
    path.write_bytes(cut)
    Image.open(path).size  # the header reads either way  # noqa: B018
    assert (truncated_image_file(str(path)) is not None) == incomplete


def test_the_crop_finds_the_loaders_file_through_the_prompt(pack):
    face_crop = __import__(pack.__name__ + ".nodes.face_crop", fromlist=["source_image_files"])
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
              "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
              "4": {"class_type": "InvAdapterFaceCrop", "inputs": {"image": ["3", 0], "margin": 0.5}},
              "5": {"class_type": "LoadImage", "inputs": {"image": "unrelated.png"}}}
    assert sorted(face_crop.source_image_files(prompt, "4")) == ["a.png", "b.png"]
    assert face_crop.source_image_files({"4": {"class_type": "InvAdapterFaceCrop", "inputs": {}}}, "4") == []


# ------------------------------------------------------------------------------------------------ levels at apply
LEVELS_FIT_CASES = {
    # name: (levels the reference keeps, refused on an SDXL-layout UNet (no "mid" resolution)?)
    "every level": (None, False),
    "coarse levels": (sorted(CAPTURE["coarse levels"]), False),
    "coarse and fine in common: the mid levels": (["input_mid", "output_mid"], True),
}


@pytest.mark.parametrize("case", list(LEVELS_FIT_CASES))
def test_a_reference_keeping_only_levels_the_model_lacks_is_refused(model, case):
    from invadapter_core.adapter.fit import check_levels_fit
    from invadapter_core.arch.layout import ModelFamilyError
    from invadapter_core.reference.reference import Reference

    levels, refused = LEVELS_FIT_CASES[case]
    ref = Reference("SDXL", (64, 64), torch.tensor([0.1, 1.0]), torch.zeros(2, 1, 4, 8, 8),
                    {"c_crossattn": torch.zeros(1, 77, 2048)}, levels=levels)
    check_levels_fit(model, ref)  # SD1.5 has every level
    sdxl = sdxl_model()
    if not refused:
        check_levels_fit(sdxl, ref)
        return
    with pytest.raises(ModelFamilyError) as failed:
        check_levels_fit(sdxl, ref)
    assert "input_mid, output_mid only" in str(failed.value) and "capture 'all levels'" in str(failed.value)


@functools.cache
def sdxl_model():
    from support import sdxl_models

    return sdxl_models.tiny_sdxl_model()
