"""A reference's features belong to the weights that computed them; a reference or adapter that does not fit a
model is refused before any UNet runs (tiny in-process SD1.5-shaped models)."""
import logging

import pytest
import torch

from invadapter_core.adapter.application import Application, install
from invadapter_core.adapter.eaa import CrossEAA, InvAdapter, SelfEAA
from invadapter_core.reference.encode import invert_latent
from invadapter_core.adapter.fit import check_adapter_fits, check_reference_fits
from invadapter_core.reference.reference import load_reference, save_reference
from invadapter_core.arch.layout import ModelFamilyError, layout_of, weights_key
from invadapter_core.adapter.weights import AdapterFileError, init_from_model
from support.models import tiny_sd15_model
from test_comfy_model import STEPS, face_latent, sample


def lora(model, scale=0.5, seed=7):
    """A clone with a LoRA-like weight patch on every attention projection (a weight difference, as a LoRA is)."""
    patched = model.clone()
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    for key, weight in model.model.state_dict().items():
        if ".attn1.to_" in key and key.endswith(".weight"):
            diffs[key] = (scale * torch.randn(weight.shape, generator=g) / weight.shape[1] ** 0.5,)
    assert patched.add_patches(diffs, 1.0)
    return patched


def applied(model, ref):
    return install(model, Application(init_from_model(""), ref, model, 1.0, 1.0))


def encode(model, caption, keep=True):
    return invert_latent(model, face_latent(), caption, STEPS, "simple", (64, 64), keep_features=keep)


def test_features_are_recomputed_for_other_weights_and_kept_apart(model, caption):
    other = lora(model)
    assert weights_key(other) != weights_key(model)
    ref = encode(model, caption)
    base_features = {s: ref.features.get(s).self_attn["input.1.0"].clone() for s in ref.features.sigmas()}
    out = sample(applied(other, ref), caption)
    # the same trajectory with features computed by the LoRA weights from scratch
    fresh = encode(model, caption, keep=False)
    assert torch.equal(out, sample(applied(other, fresh), caption))
    # what reusing the base model's features would have given (the old, silent behaviour)
    stale = encode(model, caption)
    stale.weights = weights_key(other)
    assert not torch.equal(out, sample(applied(other, stale), caption))
    # the base model's features are untouched and still serve the base model without a single pass
    for s, t in base_features.items():
        assert torch.equal(ref.features.get(s).self_attn["input.1.0"], t)
    assert len(ref.cache_for(weights_key(other))) > 0
    passes = ref.features.passes
    sample(applied(model, ref), caption)
    assert ref.features.passes - passes == 1  # sigma_max only


def test_a_saved_reference_is_checked_against_the_weights_it_meets(model, caption, tmp_path, caplog):
    ref = encode(model, caption)
    expected = sample(applied(model, ref), caption)
    path = str(tmp_path / "identity.safetensors")
    save_reference(ref, path)
    loaded = load_reference(path)
    assert loaded.weights is None  # a file does not know the weights
    assert torch.equal(sample(applied(model, loaded), caption), expected)
    assert loaded.weights == weights_key(model)  # one probe pass matched: its features are adopted
    again = load_reference(path)
    with caplog.at_level(logging.WARNING, logger="InvAdapter"):
        out = sample(applied(lora(model), again), caption)
    assert "computed again for this model" in caplog.text
    assert again.weights is None and torch.isfinite(out).all()
    assert torch.equal(out, sample(applied(lora(model), encode(model, caption, keep=False)), caption))


def test_references_of_another_layout_are_refused_naming_both(model, caption):
    ref = encode(model, caption)
    wide = tiny_sd15_model(model_channels=64)
    with pytest.raises(ModelFamilyError, match=r"features of block input\.1\.0 are 32-d, this model's block is 64-d"):
        check_reference_fits(wide, ref)
    bad = encode(model, caption)
    bad.conds = {"c_crossattn": torch.zeros(1, 77, 1024)}
    with pytest.raises(ModelFamilyError, match="caption conditioning is 1024-d.*768-d"):
        check_reference_fits(model, bad)
    bad.conds = ref.conds
    bad.states = torch.zeros(4, 1, 8, 8, 8)
    with pytest.raises(ModelFamilyError, match="8 channels, this model's 4"):
        check_reference_fits(model, bad)
    bad.states, bad.conds = ref.states, dict(ref.conds, y=torch.zeros(1, 2816))
    with pytest.raises(ModelFamilyError, match="ADM vector is 2816-d, this model takes none"):
        check_reference_fits(model, bad)


def test_adapters_that_do_not_fit_are_refused_at_apply(model, caption):
    dims = layout_of(model).dims
    ref = encode(model, caption)
    check_adapter_fits(init_from_model(""), model, ref)
    c, inner = dims["input.1.0"]
    wrong = InvAdapter("SD15", None, None, {"input.1.0": SelfEAA(c, inner * 2)}, {}, name="wide")
    with pytest.raises(AdapterFileError, match=r"self.input.1.0.to_k has shape \(64, 32\).*expects \(32, 32\)"):
        check_adapter_fits(wrong, model, ref)
    other = InvAdapter("SDXL", None, None, {}, {}, name="xl")
    with pytest.raises(AdapterFileError, match="made for model family SDXL.*SD15"):
        check_adapter_fits(other, model, ref)
    cross = InvAdapter("SD15", 128, 4, {}, {"input.1.0": CrossEAA(c, inner, 256, 4)}, name="x128",
                       self_from_base=True)
    with pytest.raises(AdapterFileError, match="aggregates 256 reference tokens.*64 px reference has 64.*128 px"):
        check_adapter_fits(cross, model, ref)
