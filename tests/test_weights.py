"""The adapter weight format: round trip, init from model, and clear refusals of bad files."""
import pytest
import torch

from invadapter_core.adapter.eaa import CrossEAA, InvAdapter, SelfEAA
from invadapter_core.adapter.weights import AdapterFileError, init_from_model, load_adapter, save_adapter


def trained(seed=0):
    torch.manual_seed(seed)
    return InvAdapter("SD15", 256, 16,
                      {"input.1.0": SelfEAA(64, 64), "middle.0.0": SelfEAA(128, 128)},
                      {"input.1.0": CrossEAA(64, 64, 1024, 16)}, name="t")


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    a = trained()
    path = str(tmp_path / "a.safetensors")
    save_adapter(a, path)
    b = load_adapter(path)
    assert (b.family, b.reference_resolution, b.tokens_m, b.self_from_base) == ("SD15", 256, 16, False)
    for (ka, va), (kb, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert ka == kb and torch.equal(va, vb)


def test_init_from_model_has_no_tensors():
    a = init_from_model("")
    assert a.self_from_base and not a.has_cross and a.trainable_parameters() == 0


def test_truncated_empty_and_foreign_files_say_what_is_wrong(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(trained(), str(path))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated or not a safetensors"):
        load_adapter(str(tmp_path / "cut.safetensors"))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFileError, match="empty"):
        load_adapter(str(tmp_path / "empty.safetensors"))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(AdapterFileError, match="not an Inv-Adapter weights file"):
        load_adapter(str(tmp_path / "lora.safetensors"))
    with pytest.raises(AdapterFileError, match="not found"):
        load_adapter(str(tmp_path / "nope.safetensors"))
