"""Inv-Adapter graphs through a real ComfyUI server on the random shallow SD1.5 checkpoint: every shipped API
workflow (workflows/api/, with the test checkpoint in place of the standard one they name), several samplers,
ControlNet and LoRA alongside, and the clear errors for bad inputs."""
import io

import numpy as np
import pytest
from PIL import Image

from invadapter_core.adapter.eaa import InvAdapter, SelfEAA
from invadapter_core.reference.reference import load_reference, same_sigma, save_reference
from invadapter_core.adapter.weights import save_adapter
from support.fixtures import CHECKPOINT, CONTROLNET, LORA
from support.graphs import load_workflow, set_inputs, user_edits
from support.server import ExecutionFailed



@pytest.fixture(scope="module")
def client(comfy_client):
    """The server's client; the graphs' input images are in its input folder because the pack put them there."""
    return comfy_client


def workflow(name: str) -> dict:
    prompt = load_workflow(name)
    set_inputs(prompt, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT})
    set_inputs(prompt, "ControlNetLoader", {"control_net_name": CONTROLNET})
    return prompt


def run_pngs(client, prompt) -> list[np.ndarray]:
    entry = client.run(prompt, timeout=900)
    pngs = client.images(entry["prompt_id"])
    assert pngs, entry.get("outputs")
    arrays = []
    for data in pngs:
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG"
        arrays.append(np.asarray(image.convert("RGB")))
    return arrays


def workflow_with_stand_ins(name: str) -> dict:
    """workflow() with the test files in place of every file the graph names (LoRA, trained adapter)."""
    prompt = workflow(name)
    for class_type, values in user_edits(prompt).items():
        set_inputs(prompt, class_type, values)
    return prompt


@pytest.mark.parametrize("name", ["basic", "controlnet", "two_photos", "two_people", "coarse_vs_fine",
                                  "attention_maps", "best_of_n", "cond_only", "lora", "trained_adapter"])
def test_shipped_api_workflow_runs(client, name):
    images = run_pngs(client, workflow_with_stand_ins(name))
    if name == "coarse_vs_fine":
        assert images[0].shape[1] > images[0].shape[0]  # the two results side by side
    if name == "attention_maps":
        assert len(images) == 3  # the generated image and its two overlays
    if name == "best_of_n":
        assert len(images) == 1  # the most alike of the 4 candidates


def test_two_people_are_two_people_and_each_is_applied(client):
    """The two photos are different people (not the same file twice: the same reference applied twice replaces
    the earlier application, and one identity would silently win), and each identity changes the image."""
    prompt = workflow("two_people")
    photos = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"]
    assert len(set(photos)) == 2, photos
    entry = client.run(prompt, timeout=900)
    assert "already applied" not in str(entry["outputs"]), entry["outputs"]
    both = np.asarray(Image.open(io.BytesIO(client.images(entry["prompt_id"])[0])).convert("RGB"))
    for apply in [i for i, n in prompt.items() if n["class_type"] == "InvAdapterApply"]:
        one = workflow("two_people")
        one[apply]["inputs"]["weight_self"] = 0.0
        assert not np.array_equal(both, run_pngs(client, one)[0]), f"node {apply} changes nothing"


def test_weight_cross_acts_with_trained_weights_only(client):
    """What the templates' strengths say: with 'init from model' weight_cross changes nothing (it has no
    cross-attention adapter; the templates set 0), with a trained file it does (the trained-adapter template)."""
    for name, acts in (("basic", False), ("trained_adapter", True)):
        prompt = workflow_with_stand_ins(name)
        set_inputs(prompt, "InvAdapterApply", {"weight_cross": 0.0})
        without = run_pngs(client, prompt)[0]
        set_inputs(prompt, "InvAdapterApply", {"weight_cross": 1.0})
        assert np.array_equal(without, run_pngs(client, prompt)[0]) != acts, name


def test_save_a_reference_then_generate_from_the_file(client, comfy_server):
    save = workflow("save_reference")
    set_inputs(save, "InvAdapterSaveReference", {"name": "test_identity", "overwrite": True})
    client.run(save, timeout=900)
    path = comfy_server.base / "models" / "invadapter_references" / "test_identity.safetensors"
    ref = load_reference(str(path))
    # every feature the inversion kept (one per inversion step); ComfyUI may hand the save node a cached Reference
    # that an earlier prompt's generation also used, which then holds that run's features too (e.g. at sigma_max)
    kept = ref.features.sigmas()
    assert ref.family == "SD15" and len(ref.sigmas) >= 4  # the smoke run's 4 steps
    assert all(any(same_sigma(k, float(s)) for k in kept) for s in ref.sigmas[:-1]), (kept, ref.sigmas)
    generate = workflow("from_saved_reference")
    set_inputs(generate, "InvAdapterLoadReference", {"reference_name": "test_identity.safetensors"})
    assert run_pngs(client, generate)[0].shape == (64, 64, 3)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun", "euler_ancestral"])
def test_samplers_run_with_the_adapter(client, sampler):
    prompt = workflow("basic")
    set_inputs(prompt, "KSampler", {"sampler_name": sampler, "scheduler": "karras" if sampler == "heun" else "simple"})
    with_adapter = run_pngs(client, prompt)[0]
    set_inputs(prompt, "InvAdapterApply", {"weight_self": 0.0, "weight_cross": 0.0})
    assert not np.array_equal(with_adapter, run_pngs(client, prompt)[0])


def test_lora_and_invadapter(client):
    prompt = workflow("basic")
    prompt["40"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": LORA,
                                                           "strength_model": 1.0, "strength_clip": 1.0}}
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if value == ["1", 0] and node is not prompt["40"]:
                node["inputs"][key] = ["40", 0]
            if value == ["1", 1] and node is not prompt["40"]:
                node["inputs"][key] = ["40", 1]
    with_lora = run_pngs(client, prompt)[0]
    prompt["40"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    assert not np.array_equal(with_lora, run_pngs(client, prompt)[0])


def expect_error(client, prompt, *fragments):
    with pytest.raises(ExecutionFailed) as failed:
        client.run(prompt, timeout=900)
    message = str(failed.value)
    for fragment in fragments:
        assert fragment in message, message


def test_weights_for_another_architecture_are_refused(client, comfy_server):
    folder = comfy_server.base / "models" / "invadapter"
    folder.mkdir(parents=True, exist_ok=True)
    wide = InvAdapter("SD15", None, None, {"input.1.0": SelfEAA(1280, 1280)}, {})
    save_adapter(wide, str(folder / "wrong_width.safetensors"))
    save_adapter(InvAdapter("SDXL", None, None, {"input.4.0": SelfEAA(640, 640)}, {}), str(folder / "sdxl.safetensors"))
    data = (folder / "sdxl.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    prompt = workflow("basic")
    for name, fragments in (("wrong_width.safetensors", ("another architecture", "(320, 320)")),
                            ("sdxl.safetensors", ("made for model family SDXL", "SD15")),
                            ("truncated.safetensors", ("truncated", "truncated.safetensors"))):
        set_inputs(prompt, "InvAdapterLoader", {"adapter_name": name})
        expect_error(client, prompt, *fragments)


def test_a_reference_of_another_family_is_refused(client, comfy_server):
    save = workflow("save_reference")
    set_inputs(save, "InvAdapterSaveReference", {"name": "family_test", "overwrite": True})
    client.run(save, timeout=900)
    folder = comfy_server.base / "models" / "invadapter_references"
    ref = load_reference(str(folder / "family_test.safetensors"))
    ref.family = "SD20"
    save_reference(ref, str(folder / "sd2_identity.safetensors"))
    generate = workflow("from_saved_reference")
    set_inputs(generate, "InvAdapterLoadReference", {"reference_name": "sd2_identity.safetensors"})
    expect_error(client, generate, "encoded with a SD20 model", "SD15", "encode the face again")
