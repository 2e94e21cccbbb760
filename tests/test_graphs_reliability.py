"""Issue 13 through a real server: a layout-changing patch beside the pack, references that meet other weights,
files that do not fit, and notices that reach API clients (websocket and /history)."""
import io
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from invadapter_core.reference.reference import load_reference, save_reference
from support.fixtures import CHECKPOINT, LORA
from support.graphs import load_workflow, set_inputs
from support.server import ExecutionFailed

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


def node_of(prompt, class_type):
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


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
