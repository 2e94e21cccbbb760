"""Flux through a real server: the shipped Flux graphs (UNETLoader, DualCLIPLoader, VAELoader, FluxGuidance; one with
a Flux ControlNet, a tiny random one in the XLabs format standing in) on a tiny random Flux UNET, a random 16-channel
VAE and the CLIP-L test file (support.flux_files says why CLIP-L stands in for T5-XXL), with a LoRA on the UNET, two identities with masks, and a saved reference loaded again (and refused on an
SD1.5 checkpoint)."""

import numpy as np
import pytest

from support.fixtures import CHECKPOINT, FLUX_LORA
from support.graphs import node_of, output_images, set_inputs, shipped
from support.server import ExecutionFailed

SAVED = "invadapter-test-flux-identity"


@pytest.fixture(scope="module")
def client(comfy_client):
    return comfy_client





def test_the_stand_ins_are_what_the_flux_graph_loads():
    prompt = shipped("flux_basic")
    clip = prompt[node_of(prompt, "DualCLIPLoader")]["inputs"]
    assert clip["type"] == "sd3" and clip["clip_name1"] == clip["clip_name2"] == "invadapter-test-clip-l.safetensors"
    assert prompt[node_of(prompt, "UNETLoader")]["inputs"]["unet_name"] == "invadapter-test-flux-tiny.safetensors"


@pytest.mark.parametrize("name", ["flux_basic", "flux_controlnet"])
def test_shipped_flux_graph_runs(client, name):
    prompt = shipped(name)
    with_identity = output_images(client, prompt)[-1]
    assert with_identity.shape == (128, 128, 3) and with_identity.std() > 0
    set_inputs(prompt, "InvAdapterApply", {"weight_self": 0.0})
    plain = output_images(client, prompt)[-1]
    assert not np.array_equal(with_identity, plain)


def test_flux_with_a_lora(client):
    prompt = shipped("flux_basic")
    unet = node_of(prompt, "UNETLoader")
    prompt["lora"] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": [unet, 0], "lora_name": FLUX_LORA, "strength_model": 1.0}}
    for key, node in prompt.items():
        for name, value in node["inputs"].items():
            if key != "lora" and value == [unet, 0]:
                node["inputs"][name] = ["lora", 0]
    with_lora = output_images(client, prompt)[-1]
    assert with_lora.shape == (128, 128, 3)
    assert not np.array_equal(with_lora, output_images(client, shipped("flux_basic"))[-1])


def test_two_identities_with_masks(client):
    prompt = shipped("flux_basic")
    crop, encode, apply, sampler = (node_of(prompt, t) for t in ("InvAdapterFaceCrop", "InvAdapterEncodeReference",
                                                                  "InvAdapterApply", "KSampler"))
    prompt["photo2"] = {"class_type": "LoadImage", "inputs": {"image": "invadapter_example_face_2.png"}}
    prompt["crop2"] = {"class_type": "InvAdapterFaceCrop", "inputs": dict(prompt[crop]["inputs"], image=["photo2", 0])}
    prompt["encode2"] = {"class_type": "InvAdapterEncodeReference",
                         "inputs": dict(prompt[encode]["inputs"], image=["crop2", 0])}
    prompt["empty"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 128, "height": 128}}
    prompt["half"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 128}}
    for name, x in (("left", 0), ("right", 64)):
        prompt[name] = {"class_type": "MaskComposite", "inputs": {"destination": ["empty", 0], "source": ["half", 0],
                                                                  "x": x, "y": 0, "operation": "add"}}
    one = output_images(client, prompt)[-1]
    prompt[apply]["inputs"]["mask"] = ["left", 0]
    prompt["apply2"] = {"class_type": "InvAdapterApply",
                        "inputs": dict(prompt[apply]["inputs"], model=[apply, 0], reference=["encode2", 0],
                                       mask=["right", 0])}
    prompt[sampler]["inputs"]["model"] = ["apply2", 0]
    two = output_images(client, prompt)[-1]
    assert two.shape == (128, 128, 3) and not np.array_equal(one, two)


def test_a_saved_flux_reference_loads_again_and_is_refused_on_sd(client):
    prompt = shipped("flux_basic")
    encode, apply = node_of(prompt, "InvAdapterEncodeReference"), node_of(prompt, "InvAdapterApply")
    prompt["save_ref"] = {"class_type": "InvAdapterSaveReference",
                          "inputs": {"reference": [encode, 0], "name": SAVED, "with_features": True,
                                     "overwrite": True}}
    prompt[apply]["inputs"]["reference"] = ["save_ref", 0]
    encoded = output_images(client, prompt)[-1]

    prompt = shipped("flux_basic")  # without the photo: the saved file stands in for it
    for class_type in ("InvAdapterEncodeReference", "PreviewImage", "InvAdapterFaceCrop", "LoadImage"):
        prompt.pop(node_of(prompt, class_type))
    prompt["load_ref"] = {"class_type": "InvAdapterLoadReference",
                          "inputs": {"reference_name": f"{SAVED}.safetensors"}}
    prompt[apply]["inputs"]["reference"] = ["load_ref", 0]
    assert np.array_equal(output_images(client, prompt)[-1], encoded)  # the file's features are the encoding's

    sd = shipped("basic")
    sd_apply = node_of(sd, "InvAdapterApply")
    sd["load_ref"] = prompt["load_ref"]
    sd[sd_apply]["inputs"]["reference"] = ["load_ref", 0]
    assert sd[node_of(sd, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] == CHECKPOINT
    with pytest.raises(ExecutionFailed) as refused:
        client.run(sd, timeout=600)
    message = str(refused.value)
    assert "encoded with a Flux model" in message and "SD15 model" in message


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn"])
def test_flux_loaded_in_fp8_encodes_and_applies(client, weight_dtype):
    """UNETLoader with fp8 weights (what most Flux users load): the reference is inverted and its K/V applied on the
    fp8 model (computed in the manual-cast dtype); the image is not black (NaN decodes to a flat image) and differs
    from the same fp8 model without the identity."""
    prompt = shipped("flux_basic")
    prompt[node_of(prompt, "UNETLoader")]["inputs"]["weight_dtype"] = weight_dtype
    with_identity = output_images(client, prompt)[-1]
    assert with_identity.shape == (128, 128, 3) and with_identity.std() > 1.0
    set_inputs(prompt, "InvAdapterApply", {"weight_self": 0.0})
    plain = output_images(client, prompt)[-1]
    assert plain.std() > 1.0 and not np.array_equal(with_identity, plain)
