"""SDXL through a real server: the shipped SDXL graphs on the random Segmind Vega-layout checkpoint (ComfyUI detects it
as an SDXL-family config), and the pack's controls on it (LoRA, mask, block weights, several references, attention
maps, another sampler). The UI twins of the shipped graphs run from the frontend in test_workflows_browser.py."""

import numpy as np
import pytest

from invadapter_core.arch.levels import LEVELS
from support.fixtures import SDXL_LORA
from support.graphs import node_of, output_images, set_inputs, shipped


@pytest.fixture(scope="module")
def client(comfy_client_sdxl):
    return comfy_client_sdxl





@pytest.mark.parametrize("name", ["sdxl_basic", "sdxl_controlnet"])
def test_shipped_sdxl_graph_runs(client, name):
    prompt = shipped(name)
    with_adapter = output_images(client, prompt, 1200)[-1]
    assert with_adapter.shape == (128, 128, 3)
    set_inputs(prompt, "InvAdapterApply", {"weight_self": 0.0, "weight_cross": 0.0})
    assert not np.array_equal(with_adapter, output_images(client, prompt, 1200)[-1])


def test_sdxl_with_lora_mask_block_weights_and_another_sampler(client):
    prompt = shipped("sdxl_basic")
    ckpt, apply = node_of(prompt, "CheckpointLoaderSimple"), node_of(prompt, "InvAdapterApply")
    prompt["lora"] = {"class_type": "LoraLoader", "inputs": {"model": [ckpt, 0], "clip": [ckpt, 1],
                                                             "lora_name": SDXL_LORA, "strength_model": 1.0,
                                                             "strength_clip": 1.0}}
    for key, node in prompt.items():
        for name, value in node["inputs"].items():
            if key != "lora" and value in ([ckpt, 0], [ckpt, 1]):
                node["inputs"][name] = ["lora", value[1]]
    prompt["mask"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 128}}
    sliders = {f"{kind}_{level}": 1.0 for kind in ("self", "cross") for level in LEVELS}  # used by preset custom
    prompt["weights"] = {"class_type": "InvAdapterBlockWeights", "inputs": {"preset": "coarse", **sliders}}
    prompt[apply]["inputs"].update(mask=["mask", 0], block_weights=["weights", 0])
    set_inputs(prompt, "KSampler", {"sampler_name": "dpmpp_2m", "scheduler": "karras"})
    set_inputs(prompt, "InvAdapterEncodeReference", {"sampler_name": "dpmpp_2m", "scheduler": "karras"})
    out = output_images(client, prompt, 1200)[-1]
    assert out.shape == (128, 128, 3) and out.std() > 0


def test_sdxl_two_references_and_attention_maps(client):
    prompt = shipped("sdxl_basic")
    encode, apply, sampler = (node_of(prompt, t) for t in ("InvAdapterEncodeReference", "InvAdapterApply",
                                                            "KSampler"))
    prompt["encode2"] = {"class_type": "InvAdapterEncodeReference", "inputs": dict(prompt[encode]["inputs"])}
    prompt["combined"] = {"class_type": "InvAdapterCombineReferences",
                          "inputs": {"reference_1": [encode, 0], "reference_2": ["encode2", 0]}}
    prompt[apply]["inputs"]["reference"] = ["combined", 0]
    ks = prompt[sampler]["inputs"]
    prompt["maps"] = {"class_type": "InvAdapterAttentionMaps", "inputs": {
        "model": ks["model"], "positive": ks["positive"], "negative": ks["negative"],
        "latent_image": ks["latent_image"], "vae": [node_of(prompt, "CheckpointLoaderSimple"), 2],
        "reference_image": [node_of(prompt, "InvAdapterFaceCrop"), 0], "seed": 0, "steps": ks["steps"],
        "cfg": ks["cfg"], "sampler_name": ks["sampler_name"], "scheduler": ks["scheduler"], "start_percent": 0.0,
        "end_percent": 1.0, "levels": "all"}}
    prompt["save_maps"] = {"class_type": "SaveImage", "inputs": {"images": ["maps", 1],
                                                                 "filename_prefix": "sdxl-maps"}}
    found = output_images(client, prompt, 1200)
    maps = [a for a in found if a.shape[1] == 2 * a.shape[0]]  # two photos side by side
    assert maps and maps[0].std() > 0
