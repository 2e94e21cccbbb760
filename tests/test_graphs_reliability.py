"""Issue 13 through a real server: a layout-changing patch beside the pack, references that meet other weights,
files that do not fit, and notices that reach API clients (websocket and /history)."""
import io
import math
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from invadapter_core.reference.reference import load_reference, save_reference
from support.fixtures import CHECKPOINT, LORA
from support.graphs import load_workflow, node_of, set_inputs
from support.server import ExecutionFailed, PromptRejected

FACE = "face.png"


@pytest.fixture(scope="module")
def client(comfy_client):
    from support.host import ROOT

    comfy_client.upload_image(ROOT / "assets" / "face.png", name=FACE)
    return comfy_client


def basic(**encode):
    prompt = load_workflow("basic")
    set_inputs(prompt, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT})
    set_inputs(prompt, "LoadImage", {"image": FACE})
    set_inputs(prompt, "InvAdapterEncodeReference", encode)
    return prompt



def image_of(client, entry) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.images(entry["prompt_id"])[0])).convert("RGB"))


def rewire(prompt, old: list, new: list, skip: str) -> None:
    for key, node in prompt.items():
        if key == skip:
            continue
        for name, value in node["inputs"].items():
            if value == old:
                node["inputs"][name] = new


@pytest.mark.parametrize("order", ["HyperTile before the pack", "HyperTile after the pack"])
def test_hypertile_and_the_pack_sample_together(client, order):
    """The issue's crash: HyperTile tiles attention's tokens (here 4x4 tiles of a 32x32 latent)."""
    prompt = basic()
    set_inputs(prompt, "EmptyLatentImage", {"width": 256, "height": 256})
    apply = node_of(prompt, "InvAdapterApply")
    sampler = node_of(prompt, "KSampler")
    prompt["ht"] = {"class_type": "HyperTile", "inputs": {"tile_size": 64, "swap_size": 2, "max_depth": 0,
                                                          "scale_depth": False}}
    if order == "HyperTile before the pack":
        prompt["ht"]["inputs"]["model"] = prompt[apply]["inputs"]["model"]
        prompt[apply]["inputs"]["model"] = ["ht", 0]
    else:
        prompt["ht"]["inputs"]["model"] = [apply, 0]
        prompt[sampler]["inputs"]["model"] = ["ht", 0]
    with_pack = image_of(client, client.run(prompt, timeout=900))
    set_inputs(prompt, "InvAdapterApply", {"weight_self": 0.0, "weight_cross": 0.0})
    assert not np.array_equal(with_pack, image_of(client, client.run(prompt, timeout=900)))


def test_a_loaded_reference_computes_features_for_the_weights_it_meets(client, comfy_server):
    """One reference file used by a base-model graph, then by a LoRA graph, gives the LoRA graph the same image as
    a fresh copy of the file: no features of the base model leak into it."""
    save = load_workflow("save_reference")
    set_inputs(save, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT})
    set_inputs(save, "LoadImage", {"image": FACE})
    set_inputs(save, "InvAdapterSaveReference", {"name": "shared", "overwrite": True})
    client.run(save, timeout=900)
    folder = comfy_server.base / "models" / "invadapter_references"
    (folder / "shared_copy.safetensors").write_bytes((folder / "shared.safetensors").read_bytes())
    generate = load_workflow("from_saved_reference")
    set_inputs(generate, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT})
    set_inputs(generate, "InvAdapterLoadReference", {"reference_name": "shared.safetensors"})
    client.run(generate, timeout=900)  # the base model adopts the file's features
    ckpt = node_of(generate, "CheckpointLoaderSimple")
    generate["lora"] = {"class_type": "LoraLoader", "inputs": {"model": [ckpt, 0], "clip": [ckpt, 1],
                                                               "lora_name": LORA, "strength_model": 1.0,
                                                               "strength_clip": 0.0}}
    rewire(generate, [ckpt, 0], ["lora", 0], skip="lora")
    entry, notices = client.run_listening(generate, timeout=900)
    shared = image_of(client, entry)
    assert any("computed again for this model" in n["message"] for n in notices), notices
    set_inputs(generate, "InvAdapterLoadReference", {"reference_name": "shared_copy.safetensors"})
    assert np.array_equal(shared, image_of(client, client.run(generate, timeout=900)))


def test_a_reference_that_does_not_fit_is_refused_at_apply(client, comfy_server):
    folder = comfy_server.base / "models" / "invadapter_references"
    save = load_workflow("save_reference")
    set_inputs(save, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT})
    set_inputs(save, "LoadImage", {"image": FACE})
    set_inputs(save, "InvAdapterSaveReference", {"name": "fits", "overwrite": True})
    client.run(save, timeout=900)
    ref = load_reference(str(folder / "fits.safetensors"))
    ref.conds = {"c_crossattn": torch.zeros(1, 77, 1024)}  # an SD2.x-width caption
    save_reference(ref, str(folder / "wide_caption.safetensors"))
    generate = load_workflow("from_saved_reference")
    set_inputs(generate, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT})
    set_inputs(generate, "InvAdapterLoadReference", {"reference_name": "wide_caption.safetensors"})
    with pytest.raises(ExecutionFailed) as failed:
        client.run(generate, timeout=900)
    assert failed.value.error.get("node_type") == "InvAdapterApply"
    assert "caption conditioning is 1024-d" in str(failed.value) and "768-d" in str(failed.value)


def test_notices_reach_api_clients_on_the_websocket_and_in_history(client):
    prompt = basic()
    apply = node_of(prompt, "InvAdapterApply")
    prompt["again"] = {"class_type": "InvAdapterApply", "inputs": dict(prompt[apply]["inputs"], model=[apply, 0],
                                                                      start_percent=0.5, end_percent=0.5)}
    rewire(prompt, [apply, 0], ["again", 0], skip="again")
    entry, notices = client.run_listening(prompt, timeout=900)
    messages = [n["message"] for n in notices]
    assert any("already applied" in m for m in messages), messages
    assert any("start_percent equals end_percent" in m for m in messages), messages
    assert all(n["node"] == "again" for n in notices)
    shown = entry["outputs"]["again"]["text"]
    assert any("already applied" in m for m in shown) and any("equals end_percent" in m for m in shown)


def test_save_names_keep_unicode_follow_output_permissions_and_long_names_fail_clearly(client, comfy_server):
    save = load_workflow("save_reference")
    set_inputs(save, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT})
    set_inputs(save, "LoadImage", {"image": FACE})
    set_inputs(save, "InvAdapterSaveReference", {"name": "Émilie 王", "overwrite": True})
    client.run(save, timeout=900)
    path = comfy_server.base / "models" / "invadapter_references" / "Émilie 王.safetensors"
    assert path.is_file()
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    set_inputs(save, "InvAdapterSaveReference", {"name": "x" * 300})
    with pytest.raises(ExecutionFailed) as failed:
        client.run(save, timeout=900)
    assert "300 bytes long" in str(failed.value) and "shorten it" in str(failed.value)


# ------------------------------------------------------------------------------------------------ issue 23
def small_adapter(seed: int, scale: float = 1.0):
    """A trained-style adapter for the shallow SD1.5 checkpoint: a self EAA on input.1.0 (C 320, 8 x 40 heads)."""
    from invadapter_core.adapter.eaa import InvAdapter, SelfEAA

    torch.manual_seed(seed)
    layer = SelfEAA(320, 320)
    with torch.no_grad():
        layer.to_k.weight.normal_(0, 0.05).mul_(scale)
        layer.to_v.weight.normal_(0, 0.05).mul_(scale)
    return InvAdapter("SD15", None, None, {"input.1.0": layer}, {}, name="small")


def replace_file(path, data: bytes) -> None:
    """What a user's copy over an existing file does: new contents under the old name (atomically)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def with_adapter(prompt, name):
    set_inputs(prompt, "InvAdapterLoader", {"adapter_name": name})
    return prompt


def saved_reference(client, comfy_server, name: str, image: str = FACE):
    save = load_workflow("save_reference")
    set_inputs(save, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT})
    set_inputs(save, "LoadImage", {"image": image})
    set_inputs(save, "InvAdapterSaveReference", {"name": name, "overwrite": True})
    client.run(save, timeout=900)
    return comfy_server.base / "models" / "invadapter_references" / f"{name}.safetensors"


def from_reference(name: str) -> dict:
    generate = load_workflow("from_saved_reference")
    set_inputs(generate, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT})
    set_inputs(generate, "InvAdapterLoadReference", {"reference_name": name})
    return generate


@pytest.fixture(scope="module")
def mirrored_face(client):
    from support.host import ROOT

    Image.open(ROOT / "assets" / "face.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buffer := io.BytesIO(),
                                                                                             "PNG")
    client.upload_image(buffer.getvalue(), name="face_mirrored.png")
    return "face_mirrored.png"


REPLACED_FILE_CASES = ["adapter", "reference"]


@pytest.mark.parametrize("kind", REPLACED_FILE_CASES)
def test_a_file_replaced_under_the_same_name_is_read_again(client, comfy_server, mirrored_face, kind):
    """Two prompts of one graph, the file replaced on disk between them: the second uses the new file (its image
    differs from the first and equals a fresh run with the new file under a name never used before)."""
    from invadapter_core.adapter.weights import save_adapter

    if kind == "adapter":
        folder = comfy_server.base / "models" / "invadapter"
        folder.mkdir(parents=True, exist_ok=True)
        for name, seed in (("old_adapter", 1), ("new_adapter", 2)):
            save_adapter(small_adapter(seed), str(folder / f"{name}.safetensors"))
        old, new = ((folder / f"{n}.safetensors").read_bytes() for n in ("old_adapter", "new_adapter"))
        graph = lambda name: with_adapter(basic(), name)  # noqa: E731
    else:
        folder = comfy_server.base / "models" / "invadapter_references"
        old = saved_reference(client, comfy_server, "old_identity").read_bytes()
        new = saved_reference(client, comfy_server, "new_identity", image=mirrored_face).read_bytes()
        graph = from_reference
    (folder / f"swapped_{kind}.safetensors").write_bytes(old)
    before = image_of(client, client.run(graph(f"swapped_{kind}.safetensors"), timeout=900))
    replace_file(folder / f"swapped_{kind}.safetensors", new)
    after = image_of(client, client.run(graph(f"swapped_{kind}.safetensors"), timeout=900))
    (folder / f"fresh_{kind}.safetensors").write_bytes(new)
    fresh = image_of(client, client.run(graph(f"fresh_{kind}.safetensors"), timeout=900))
    assert not np.array_equal(before, after), "the replaced file was not read again"
    assert np.array_equal(after, fresh)


def scaled(path, factor: float, key_prefix: str):
    """The file at ``path`` with every tensor whose name starts with ``key_prefix`` times ``factor``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v * factor if k.startswith(key_prefix) else v for k, v in tensors.items()}, str(path), meta)


def with_metadata(path, key: str, value: str):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta[key] = value
    save_file(tensors, str(path), meta)


BROKEN_FILE_CASES = {
    # name: (file kind, how it is broken, node that must refuse it, fragments)
    "adapter weights x1e30": ("adapter", lambda p: scaled(p, 1e30, "self."), "InvAdapterLoader",
                              ["huge_adapter.safetensors", "magnitude", "black image"]),
    "reference states x1e30": ("reference", lambda p: scaled(p, 1e30, "trajectory.states"),
                               "InvAdapterLoadReference", ["huge_reference.safetensors", "trajectory.states",
                                                           "magnitude"]),
    "reference naming an unknown level": ("reference", lambda p: with_metadata(p, "invadapter.levels", '["inputs"]'),
                                          "InvAdapterLoadReference", ["levels", "'[\"inputs\"]'", "input_high"]),
}


@pytest.mark.parametrize("case", list(BROKEN_FILE_CASES))
def test_files_the_sampler_could_not_use_are_refused_at_their_loader(client, comfy_server, case):
    kind, damage, node, fragments = BROKEN_FILE_CASES[case]
    if kind == "adapter":
        folder = comfy_server.base / "models" / "invadapter"
        folder.mkdir(parents=True, exist_ok=True)
        from invadapter_core.adapter.weights import save_adapter

        path = folder / "huge_adapter.safetensors"
        save_adapter(small_adapter(1), str(path))
        graph = with_adapter(basic(), path.name)
    else:
        source = saved_reference(client, comfy_server, "to_damage")
        path = source.with_name("huge_reference.safetensors")
        path.write_bytes(source.read_bytes())
        graph = from_reference(path.name)
    damage(path)
    with pytest.raises(ExecutionFailed) as failed:
        client.run(graph, timeout=900)
    assert failed.value.error.get("node_type") == node, failed.value.error
    for fragment in fragments:
        assert fragment in str(failed.value), str(failed.value)


NON_FINITE_CASES = {"NaN weight_self": ("weight_self", float("nan")), "inf end_percent": ("end_percent", float("inf"))}


@pytest.mark.parametrize("case", list(NON_FINITE_CASES))
def test_a_non_finite_float_in_an_api_prompt_is_refused_at_the_node(client, case):
    name, value = NON_FINITE_CASES[case]
    prompt = basic()
    set_inputs(prompt, "InvAdapterApply", {name: value})
    try:
        client.run(prompt, timeout=900)
    except ExecutionFailed as e:
        assert e.error.get("node_type") == "InvAdapterApply" and f"'{name}' is {value}" in str(e), str(e)
    except PromptRejected as e:  # ComfyUI's own max check refuses +inf before the node runs
        assert math.isinf(value) and "bigger than max" in str(e), str(e)
    else:
        pytest.fail(f"{name} = {value} was not refused")


@pytest.mark.parametrize("complete", [True, False])
def test_a_face_crop_of_a_partly_decoded_file_says_so(client, complete):
    from support.host import ROOT

    data = (ROOT / "assets" / "face.png").read_bytes()
    name = client.upload_image(data if complete else data[:len(data) // 2],
                               name="face_whole.png" if complete else "face_truncated.png")
    prompt = basic()
    crop = node_of(prompt, "InvAdapterFaceCrop")
    graph = {k: prompt[k] for k in (node_of(prompt, "LoadImage"), crop, node_of(prompt, "PreviewImage"))}
    set_inputs(graph, "LoadImage", {"image": name})
    set_inputs(graph, "InvAdapterFaceCrop", {"on_no_face": "center crop"})
    entry, notices = client.run_listening(graph, timeout=900)
    told = [n["message"] for n in notices if "is incomplete" in n["message"]]
    if complete:
        assert told == []
    else:
        assert len(told) == 1 and "face_truncated.png" in told[0] and "black" in told[0], notices
        assert all(n["node"] == crop for n in notices)
        assert any("is incomplete" in m for m in entry["outputs"][crop]["text"])
