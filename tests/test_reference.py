"""Reference objects and files: feature cache matching, save/load round trip, corrupt files."""
import pytest
import torch

from invadapter_core.reference.reference import (FeatureCache, Reference, ReferenceFileError, load_reference,
                                                  save_reference)
from invadapter_core.reference.capture import Features


def make_reference(with_cross=True):
    g = torch.Generator().manual_seed(0)
    cache = FeatureCache()
    for s in (0.03, 1.5, 14.6):
        cross = {"input.1.0": torch.randn(1, 16, 8, generator=g).half()} if with_cross else None
        cache.put(s, Features({"input.1.0": torch.randn(1, 16, 8, generator=g).half()}, cross))
    return Reference("SD15", (64, 64), torch.tensor([0.03, 1.5, 14.6], dtype=torch.float64),
                     torch.randn(3, 1, 4, 8, 8, generator=g), {"c_crossattn": torch.randn(1, 77, 768, generator=g)},
                     cache)


def test_cache_matches_float32_rounded_sigmas_and_knows_missing_cross():
    ref = make_reference(with_cross=False)
    s32 = float(torch.tensor(1.5, dtype=torch.float32) * (1 + 3e-7))
    assert ref.features.get(s32) is not None
    assert ref.features.get(1.6) is None
    assert ref.features.get(1.5, need_cross=True) is None
    assert ref.features.nbytes() == 3 * 16 * 8 * 2


def test_round_trip_keeps_trajectory_caption_and_features(tmp_path):
    ref = make_reference()
    path = str(tmp_path / "r.safetensors")
    save_reference(ref, path)
    back = load_reference(path)
    assert back.family == "SD15" and back.resolution == (64, 64) and back.uid == ref.uid
    assert torch.equal(back.states, ref.states) and torch.equal(back.context, ref.context)
    assert back.features.sigmas() == pytest.approx(ref.features.sigmas())
    for s in ref.features.sigmas():
        a, b = ref.features.get(s), back.features.get(s)
        assert torch.equal(a.self_attn["input.1.0"], b.self_attn["input.1.0"])
        assert b.self_attn["input.1.0"].dtype == torch.float16
        assert torch.equal(a.cross_attn["input.1.0"], b.cross_attn["input.1.0"])
    assert torch.equal(back.latent_at(1.5), ref.latent_at(1.5))


def test_without_features_the_file_keeps_only_the_trajectory(tmp_path):
    path = str(tmp_path / "r.safetensors")
    save_reference(make_reference(), path, with_features=False)
    assert load_reference(path).features.sigmas() == []


def test_bad_reference_files_are_refused_clearly(tmp_path):
    path = tmp_path / "r.safetensors"
    save_reference(make_reference(), str(path))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:100])
    with pytest.raises(ReferenceFileError, match="truncated or not a safetensors file"):
        load_reference(str(tmp_path / "cut.safetensors"))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ReferenceFileError, match="empty"):
        load_reference(str(tmp_path / "empty.safetensors"))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ReferenceFileError, match="not an Inv-Adapter reference"):
        load_reference(str(tmp_path / "other.safetensors"))
