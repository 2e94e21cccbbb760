"""Shared pytest fixtures (loaded by tests/conftest.py as a plugin)."""
from __future__ import annotations

import pytest

from . import browser, flux_files, models
from .server import ComfyServer

CHECKPOINT = "invadapter-test-sd15-shallow.safetensors"
CONTROLNET = "invadapter-test-controlnet-sd15-shallow.safetensors"
LORA = "invadapter-test-lora-sd15-shallow.safetensors"
ADAPTER = "invadapter-test-adapter-sd15-shallow.safetensors"  # random weights in a trained adapter's layout
# The Segmind Vega-layout SDXL checkpoint and its add-ons (sdxl_models.server_models("vega")).
SDXL_CHECKPOINT = "invadapter-test-sdxl-vega.safetensors"
SDXL_CONTROLNET = "invadapter-test-controlnet-sdxl-vega.safetensors"
SDXL_LORA = "invadapter-test-lora-sdxl-vega.safetensors"
# The tiny random Flux UNET, its LoRA, the Flux-style VAE and the CLIP-L file (support.flux_files.server_models()).
FLUX_UNET = "invadapter-test-flux-tiny.safetensors"
FLUX_LORA = "invadapter-test-lora-flux-tiny.safetensors"
FLUX_VAE = "invadapter-test-flux-vae.safetensors"
FLUX_CONTROLNET = "invadapter-test-controlnet-flux-tiny.safetensors"
CLIP_L = "invadapter-test-clip-l.safetensors"
CHROMA_UNET = "invadapter-test-chroma.safetensors"  # the smallest Chroma a server loads (support.flux_files)
# The standard files the shipped graphs name -> the test file that stands in for each (what a user would pick).
STAND_INS = {"v1-5-pruned-emaonly-fp16.safetensors": CHECKPOINT,
             "control_v11p_sd15_openpose_fp16.safetensors": CONTROLNET,
             "sd_xl_base_1.0.safetensors": SDXL_CHECKPOINT,
             "OpenPoseXL2.safetensors": SDXL_CONTROLNET,
             "flux1-dev.safetensors": FLUX_UNET, "ae.safetensors": FLUX_VAE, "Chroma1-HD.safetensors": CHROMA_UNET,
             "diffusion_pytorch_model.safetensors": FLUX_CONTROLNET,  # the Flux ControlNet Union Pro's file
             "t5xxl_fp16.safetensors": CLIP_L, "clip_l.safetensors": CLIP_L,  # see graphs.STAND_IN_WIDGETS
             "your_lora.safetensors": LORA,  # the LoRA template's placeholder for the user's own
             "invadapter.safetensors": ADAPTER}  # what the trainer writes (docs/training.md)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: generates or loads a full-size test checkpoint (SD1.5 or SDXL; "
                                       "deselect with -m 'not slow')")


def _running_server(test_files: dict, base_dir):
    """A real headless ComfyUI (subprocess) with the pack and ``test_files``, for a fixture to yield; fails if
    the pack didn't load."""
    server = ComfyServer(models=test_files, base_dir=base_dir)
    server.start()
    yield server
    server.stop()


def test_files() -> dict:
    """Every test model a server gets, by model folder: the shallow SD1.5 checkpoint and the Segmind Vega-layout
    SDXL checkpoint, each with its ControlNet and LoRA, and the tiny Flux files (generated once, then cached). One
    server holds them all: it only loads a model when a graph uses it, and the SDXL and Flux graphs (templates
    included) run beside the SD1.5 ones."""
    files: dict[str, dict] = {}
    for kind in ("shallow", "vega", "flux"):
        found = flux_files.server_models() if kind == "flux" else models.server_models(kind)
        for folder, named in found.items():
            files.setdefault(folder, {}).update(named)
    return files


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """The real server with the test files (CHECKPOINT, CONTROLNET, LORA and their SDXL_* counterparts)."""
    yield from _running_server(test_files(), tmp_path_factory.mktemp("comfyui"))


@pytest.fixture(scope="session")
def comfy_client(comfy_server):
    return comfy_server.client


@pytest.fixture(scope="module")
def frontend(comfy_server):
    """The real ComfyUI frontend of ``comfy_server`` in headless Chromium (a playwright page; skipped without
    chromium unless INVADAPTER_REQUIRE_BROWSER=1)."""
    if browser.CHROMIUM is None:
        message = "chromium is not installed: `apt-get install chromium` (make setup does it as root)"
        if browser.REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    with browser.frontend_page(comfy_server.url) as page:
        yield page


@pytest.fixture(scope="session")
def comfy_server_sdxl(comfy_server):
    """The server with the SDXL test files (SDXL_CHECKPOINT, SDXL_CONTROLNET, SDXL_LORA): the same one."""
    return comfy_server


@pytest.fixture(scope="session")
def comfy_client_sdxl(comfy_server_sdxl):
    return comfy_server_sdxl.client


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small models (``pytestmark = pytest.mark.usefixtures("one_thread")``): on
    a shared 2-core machine two threads spin-wait on each other (measured: a tiny-model training step 0.37 s with one
    thread, 7 s with two under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model():
    """One tiny SD1.5-shaped UNet per test module (training leaves it bit-identical, which test_train checks)."""
    return models.tiny_sd15_model()


@pytest.fixture(scope="module")
def clip_vae():
    """The shallow SD1.5 test checkpoint's CLIP and VAE, loaded by ComfyUI's own checkpoint loader."""
    import comfy.sd

    _, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(models.shallow_sd15_checkpoint()), output_vae=True,
                                                            output_clip=True, output_model=False)
    return clip, vae


@pytest.fixture(scope="session")
def model():
    """The small in-process SD1.5-shaped ModelPatcher (tiny_sd15_model), shared by the math tests."""
    return models.tiny_sd15_model()


@pytest.fixture(scope="session")
def caption():
    """A fixed random caption context [1, 77, 768] for the tiny model."""
    return models.text_context(seed=11)


@pytest.fixture(scope="session")
def photos():
    """Real labelled face photos (face_recognition 1.3.0's test photos, fetched once): name -> IMAGE [1, H, W, 3]."""
    from . import faces

    return {name: faces.load(path) for name, path in faces.labelled_photos().items()}


@pytest.fixture(scope="session")
def dlib_recognizer():
    """The dlib face recognizer as ComfyUI's model management holds it (skips without dlib-bin installed)."""
    pytest.importorskip("dlib", reason="pip install dlib-bin face-recognition-models (requirements-dev.txt)")
    from invadapter_core.face import recognize as face_id

    return face_id.get_recognizer("dlib")
