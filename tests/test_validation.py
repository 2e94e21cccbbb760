"""Every broken adapter or reference file is refused at load with one line naming the file, the field and the fix
(table-driven: each row writes a real file with one defect)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from invadapter_core.adapter.eaa import CrossEAA, InvAdapter, SelfEAA
from invadapter_core.reference.reference import (FeatureCache, Reference, ReferenceFileError, load_reference,
                                                  save_reference)
from invadapter_core.reference.capture import Features
from invadapter_core.adapter.weights import AdapterFileError, load_adapter, save_adapter


def good_adapter() -> InvAdapter:
    torch.manual_seed(0)
    return InvAdapter("SD15", 64, 4, {"input.1.0": SelfEAA(32, 32)}, {"input.1.0": CrossEAA(32, 32, 64, 4)}, name="a")


def good_reference() -> Reference:
    g = torch.Generator().manual_seed(0)
    cache = FeatureCache()
    for s in (0.5, 2.0):
        cache.put(s, Features({"input.1.0": torch.randn(1, 64, 32, generator=g)}))
    return Reference("SD15", (64, 64), torch.tensor([0.5, 2.0, 14.6], dtype=torch.float64),
                     torch.randn(3, 1, 4, 8, 8, generator=g), {"c_crossattn": torch.randn(1, 77, 768, generator=g)},
                     cache)


def rewrite(path, change):
    """Apply ``change(tensors, meta)`` to a saved file, in place."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def meta_set(key, value):
    return lambda t, m: m.__setitem__("invadapter." + key, value)


def tensor_set(key, fn):
    return lambda t, m: t.__setitem__(key, fn(t[key]))


def rename(old, new):
    return lambda t, m: t.__setitem__(new, t.pop(old))


def with_nan(x):
    x = x.clone()
    x.view(-1)[3] = float("nan")
    return x


ADAPTER_CASES = {
    "format_version not a number": (meta_set("format_version", "abc"), ["format_version", "'abc'", "not an integer"]),
    "newer format": (meta_set("format_version", "99"), ["format 99", "update ComfyUI-InvAdapter"]),
    "tokens_m not a number": (meta_set("tokens_m", "many"), ["tokens_m", "not an integer"]),
    "tensor name without a dot": (rename("self.input.1.0.to_k.weight", "weights"), ["unexpected tensor 'weights'"]),
    "not a block": (rename("self.input.1.0.to_v.weight", "self.inpt.x.0.to_v.weight"), ["names no UNet block"]),
    "to_v alone has a wrong shape": (tensor_set("self.input.1.0.to_v.weight", lambda x: x[:16]),
                                     ["to_v.weight has shape (16, 32)", "to_k.weight (32, 32)", "must match"]),
    "integer tensor": (tensor_set("self.input.1.0.to_k.weight", lambda x: x.long()), ["dtype int64", "float"]),
    "NaN in the weights": (tensor_set("cross.input.1.0.to_v.weight", with_nan), ["NaN", "black"]),
    "a layer is missing": (lambda t, m: t.pop("cross.input.1.0.token_agg.bias"), ["lacks token_agg.bias"]),
    "M contradicts the metadata": (meta_set("tokens_m", "8"), ["4 rows", "tokens_m = 8"]),
    "1-D projection": (tensor_set("self.input.1.0.to_k.weight", lambda x: x[0]), ["(32,)", "expected 2-D"]),
    # finite in float32, but past what float32 can square (the attention and normalisation products)
    "weights x1e30": (tensor_set("self.input.1.0.to_k.weight", lambda x: x * 1e30),
                      ["self.input.1.0.to_k.weight", "magnitude", "float32", "overflow", "black image"]),
    "cross weights x1e30": (tensor_set("cross.input.1.0.token_agg.weight", lambda x: x * 1e30),
                            ["cross.input.1.0.token_agg.weight", "magnitude"]),
}


def assert_refused(tmp_path, name, save, good, load, error, change, fragments):
    """Save ``good``, apply one defect, load: one line naming the file and every expected fragment."""
    path = tmp_path / name
    save(good, str(path))
    rewrite(path, change)
    with pytest.raises(error) as refused:
        load(str(path))
    message = str(refused.value)
    assert name in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_broken_adapter_files_say_which_field_and_how_to_fix(tmp_path, case):
    assert_refused(tmp_path, "broken_adapter.safetensors", save_adapter, good_adapter(), load_adapter,
                   AdapterFileError, *ADAPTER_CASES[case])


REFERENCE_CASES = {
    "format_version not a number": (meta_set("format_version", "abc"), ["format_version", "not an integer"]),
    "broken JSON metadata": (meta_set("resolution", "[64, 64"), ["resolution", "not valid JSON"]),
    "resolution of the wrong form": (meta_set("resolution", "\"big\""), ["[height, width]"]),
    "feature sigmas not numbers": (meta_set("feature_sigmas", "[\"a\"]"), ["feature_sigmas", "positive numbers"]),
    "unknown convention": (meta_set("convention", "sideways"), ["convention", "sideways"]),
    "NaN in the states": (tensor_set("trajectory.states", with_nan), ["trajectory.states", "NaN"]),
    "NaN in the features": (tensor_set("features.1.self.input.1.0", with_nan), ["features.1.self.input.1.0", "NaN"]),
    "integer caption": (tensor_set("cond.c_crossattn", lambda x: x.long()), ["cond.c_crossattn", "dtype int64"]),
    "caption of the wrong rank": (tensor_set("cond.c_crossattn", lambda x: x[0]), ["cond.c_crossattn", "3-D"]),
    "sigmas not ascending": (tensor_set("trajectory.sigmas", lambda x: x.flip(0)), ["not an ascending"]),
    "states for other sigmas": (tensor_set("trajectory.states", lambda x: x[:2]), ["2 states for 3 sigmas"]),
    "states of the wrong rank": (tensor_set("trajectory.states", lambda x: x[:, 0]),
                                 ["trajectory.states", "4-D", "expected 5-D (or 6-D"]),
    "a feature without a block": (rename("features.0.self.input.1.0", "features.0.self.inputs"),
                                  ["unexpected tensor"]),
    "features of a step not listed": (rename("features.1.self.input.1.0", "features.7.self.input.1.0"),
                                      ["step 7", "feature_sigmas lists 2"]),
    "missing trajectory": (lambda t, m: t.pop("trajectory.states"), ["trajectory.states", "missing"]),
    "missing caption": (lambda t, m: t.pop("cond.c_crossattn"), ["caption conditioning", "missing"]),
    "feature batch other than the images": (tensor_set("features.0.self.input.1.0", lambda x: x.repeat(2, 1, 1)),
                                            ["batch 2 for 1 image"]),
    "unknown level": (meta_set("levels", "[\"input_hgh\"]"), ["levels", "input_hgh", "input_high, input_mid"]),
    "levels not a list": (meta_set("levels", "\"coarse\""), ["levels", "a non-empty list of levels"]),
    "no level": (meta_set("levels", "[]"), ["levels", "a non-empty list of levels"]),
    "states x1e30": (tensor_set("trajectory.states", lambda x: x * 1e30),
                     ["'trajectory.states' (as the UNet sees it)", "magnitude", "float32", "black image"]),
    "features x1e30": (tensor_set("features.0.self.input.1.0", lambda x: x * 1e30),
                       ["features.0.self.input.1.0", "magnitude"]),
    "caption x1e30": (tensor_set("cond.c_crossattn", lambda x: x * 1e30), ["cond.c_crossattn", "magnitude"]),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_broken_reference_files_say_which_field_and_how_to_fix(tmp_path, case):
    assert_refused(tmp_path, "broken_reference.safetensors", save_reference, good_reference(), load_reference,
                   ReferenceFileError, *REFERENCE_CASES[case])


def test_good_files_load_and_loaded_adapters_need_no_gradients(tmp_path):
    save_adapter(good_adapter(), str(tmp_path / "a.safetensors"))
    adapter = load_adapter(str(tmp_path / "a.safetensors"))
    assert not any(p.requires_grad for p in adapter.parameters())
    save_reference(good_reference(), str(tmp_path / "r.safetensors"))
    ref = load_reference(str(tmp_path / "r.safetensors"))
    assert ref.features.sigmas() == [0.5, 2.0] and json.loads(json.dumps(list(ref.resolution))) == [64, 64]


def test_known_levels_load_and_states_are_judged_as_the_unet_sees_them(tmp_path):
    """A capture setting's levels load; a state at sigma 14.6 may be 15x what the UNet sees (1/sqrt(1 + sigma^2))."""
    ref = good_reference()
    ref.levels = ["input_low", "middle", "output_low"]
    ref.states = ref.states * 1e18  # scaled by the UNet's 1/sqrt(1 + sigma^2) to below float32's 1.8e19
    ref.states[:2] = 0
    save_reference(ref, str(tmp_path / "r.safetensors"))
    back = load_reference(str(tmp_path / "r.safetensors"))
    assert back.levels == ["input_low", "middle", "output_low"] and back.source == str(tmp_path / "r.safetensors")
    assert back.peak == pytest.approx(float(ref.states[2].abs().max()) / (1 + 14.6 ** 2) ** 0.5, rel=1e-5)
