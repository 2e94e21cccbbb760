"""Issue 2 acceptance: the test foundation itself works.

Through a real ComfyUI server: the pack loads, plain SD1.5 / ControlNet / LoRA graphs on the random test files
return PNGs, malformed prompts come back as node_errors. In process: the tiny model and the checkpoint files are
what ComfyUI takes for SD1.5, and their outputs are finite.
"""
import logging

import numpy as np
import pytest
import torch

from support import graphs, models
from support.fixtures import CHECKPOINT, CONTROLNET, LORA
from support.images import controlnet_image, png_array, run_image
from support.server import PACK_NODES, PromptRejected


# ---------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def plain_image(comfy_client):
    return run_image(comfy_client, graphs.sd15_txt2img(CHECKPOINT, seed=7, prefix="plain"))


def test_pack_loads_without_import_failures(comfy_server):
    log = comfy_server.log_path.read_text(errors="replace")
    assert "(IMPORT FAILED)" not in log, comfy_server.log_tail()
    info = comfy_server.client.object_info()
    assert [n for n in PACK_NODES if n not in info] == []
    assert CHECKPOINT in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


def test_plain_sd15_graph_returns_png(plain_image):
    assert plain_image.shape == (64, 64, 3)
    assert plain_image.std() > 1.0, "a constant image: the random model's output collapsed (NaN or saturation)"


@pytest.mark.parametrize("break_graph, node, error_type", [
    (lambda g: g["sampler"]["inputs"].pop("model"), "sampler", "required_input_missing"),
    (lambda g: g["sampler"]["inputs"].update(model=["ckpt", 1]), "sampler", "return_type_mismatch"),
    (lambda g: g["ckpt"]["inputs"].update(ckpt_name="no-such-model.safetensors"), "ckpt", "value_not_in_list"),
])
def test_malformed_prompt_is_rejected_with_node_errors(comfy_client, break_graph, node, error_type):
    graph = graphs.sd15_txt2img(CHECKPOINT)
    break_graph(graph)
    with pytest.raises(PromptRejected) as rejected:
        comfy_client.queue(graph)
    assert node in rejected.value.node_errors, rejected.value.body
    assert error_type in [e["type"] for e in rejected.value.node_errors[node]["errors"]]


def test_controlnet_graph_runs_and_steers(comfy_client, plain_image):
    image = controlnet_image(comfy_client, CHECKPOINT, CONTROLNET, seed=7, prefix="cn")
    assert image.shape == (64, 64, 3)
    assert np.abs(image - plain_image).mean() > 1.0, "the ControlNet had no effect"


def test_lora_is_applied_and_changes_the_image(comfy_server, comfy_client, plain_image):
    def lora_run(strength):
        return run_image(comfy_client, graphs.sd15_txt2img(CHECKPOINT, seed=7, prefix=f"lora{strength}",
                                                           lora=(LORA, strength)))

    without, with_lora = lora_run(0.0), lora_run(1.0)
    assert np.array_equal(without, plain_image), "same seed and weights gave another image: not deterministic"
    assert "lora key not loaded" not in comfy_server.log_path.read_text(errors="replace"), comfy_server.log_tail()
    assert with_lora.std() > 1.0
    assert np.abs(with_lora - without).mean() > 1.0, "the LoRA did not change the image"


# ---------------------------------------------------------------- in process
def test_tiny_model_forward_is_finite_and_deterministic():
    sigma = torch.tensor([2.0])
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * 2.0
    ctx = models.text_context()
    outs = []
    for _ in range(2):  # two independent builds: same seed, same weights, same output
        model = models.tiny_sd15_model()
        assert type(model.model.model_config).__name__ == "SD15"
        with torch.no_grad():
            outs.append(model.model.apply_model(x, sigma, c_crossattn=ctx))
    assert outs[0].shape == x.shape and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        other = model.model.apply_model(x, sigma, c_crossattn=models.text_context(seed=1))
    assert not torch.allclose(other, outs[0]), "the text context does not reach the UNet (no cross-attention?)"


def test_tiny_model_has_transformer_blocks_on_every_stage():
    unet = models.tiny_sd15_model().model.diffusion_model
    stages = {"input": unet.input_blocks, "middle": [unet.middle_block], "output": unet.output_blocks}
    for stage, blocks in stages.items():
        count = sum(len(getattr(m, "transformer_blocks", [])) for seq in blocks for m in seq)
        assert count > 0, stage


def _load_and_check(path, n_transformer_blocks):
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    assert model.model.model_config.__class__.__name__ == "SD15"
    unet = model.model.diffusion_model
    assert sum(1 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock") == n_transformer_blocks
    with torch.no_grad():
        cond = clip.encode_from_tokens(clip.tokenize("a photo of a face"))
        assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * 14.6
        out = model.model.apply_model(x, torch.tensor([14.6, 1.0]), c_crossattn=cond.repeat(2, 1, 1))
        assert torch.isfinite(out).all()
        image = vae.decode(torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)))
        assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all() and image.std() > 0.01
    return model, clip


def test_shallow_checkpoint_is_sd15_with_a_matching_lora_and_controlnet(caplog):
    import comfy.controlnet
    import comfy.sd
    import comfy.utils

    path = models.shallow_sd15_checkpoint()
    model, clip = _load_and_check(path, n_transformer_blocks=10)

    lora = comfy.utils.load_torch_file(str(models.lora_file(path)), safe_load=True)
    with caplog.at_level(logging.WARNING):
        patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text
    assert len(patched_model.patches) == 10 * 8  # every attention projection of every transformer block
    assert len(patched_clip.patcher.patches) == 12 * 4

    control = comfy.controlnet.load_controlnet(str(models.controlnet_checkpoint(path)))
    assert isinstance(control, comfy.controlnet.ControlNet)
    assert len(control.control_model.zero_convs) == len(model.model.diffusion_model.input_blocks)


@pytest.mark.slow
def test_full_checkpoint_is_standard_sd15():
    _load_and_check(models.full_sd15_checkpoint(), n_transformer_blocks=16)


# ---------------------------------------------------------------- packaging
def test_registry_metadata_matches_the_runtime_requirements():
    """pyproject.toml (Comfy Registry) declares exactly requirements.txt, pins no torch, and ships the web folder."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    lines = [line.split("#")[0].strip() for line in (root / "requirements.txt").read_text().splitlines()]
    assert sorted(meta["project"]["dependencies"]) == sorted(line for line in lines if line)
    assert not any(d.split("=")[0].split(">")[0].strip() in ("torch", "torchvision", "torchaudio")
                   for d in meta["project"]["dependencies"]), "the host owns torch"
    comfy = meta["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(comfy)
    for folder in comfy["includes"]:
        assert (root / folder).is_dir(), folder
    assert (root / meta["project"]["license"]["file"]).is_file()


def test_registry_icon_classifiers_and_host_version():
    """The icon URL points at a file of the repo within the registry's limits (PNG, at most 800 x 400); accelerator
    classifiers are ones comfy-cli accepts (one unknown value makes it drop them all); requires-comfyui starts at the
    ComfyUI the tests run."""
    import re
    import tomllib
    from pathlib import Path

    from PIL import Image

    from support import host

    root = Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    icon_url = meta["tool"]["comfy"]["Icon"]
    match = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)", icon_url)
    assert match, f"Icon should be a raw.githubusercontent.com URL of a file in this repository: {icon_url}"
    icon = Image.open(root / match.group(1))
    assert icon.format == "PNG" and icon.width <= 800 and icon.height <= 400, (icon.format, icon.size)
    accelerators = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                    "GPU :: Apple Metal"}  # comfy_cli/registry/config_parser.py
    environments = [c[len("Environment :: "):] for c in meta["project"]["classifiers"] if c.startswith("Environment ::")]
    assert environments and set(environments) <= accelerators, environments
    version = re.search(r'__version__ = "([^"]+)"', (Path(host.comfyui_path()) / "comfyui_version.py").read_text())
    assert meta["tool"]["comfy"]["requires-comfyui"] == f">={version.group(1)}"


# ---------------------------------------------------------------- the demo (`make demo` = setup + this script)
def test_demo_runs_the_shipped_workflow_and_ends_with_the_image_path(tmp_path):
    import subprocess
    from pathlib import Path

    from support import host

    # the identity toy's part has its own test (test_identity_demo.py)
    done = subprocess.run([host.python_exe(), str(host.ROOT / "scripts" / "demo.py"), "--out-dir", str(tmp_path),
                           "--no-identity-toy"], capture_output=True, text=True, timeout=900, cwd=host.ROOT)
    assert done.returncode == 0, done.stderr[-6000:]
    assert "workflows/api/basic.json" in done.stderr  # the shipped face crop -> reference -> generation graph
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("Output image: "), done.stdout
    path = Path(last[len("Output image: "):])
    assert path.parent == tmp_path and path.is_file()
    assert png_array(path.read_bytes()).shape == (64, 64, 3)
