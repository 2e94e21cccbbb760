"""SDXL-family checkpoints end to end: the benchmark on the Vega layout, and one full-size SDXL smoke run
(random weights, generated at test time; the server graphs are in tests/test_graphs_sdxl.py)."""
import json
import subprocess

import pytest
import torch

import comfy.sample
import comfy.sd
from invadapter_core.adapter.application import apply_identity
from invadapter_core.reference.encode import encode_reference
from invadapter_core.arch.layout import layout_of
from invadapter_core.adapter.weights import init_from_model
from support import host
from support.sdxl_models import full_sdxl_checkpoint, vega_sdxl_checkpoint


def test_the_benchmark_takes_an_sdxl_checkpoint_and_its_cache_formula_follows_the_family():
    cmd = [host.python_exe(), str(host.ROOT / "benchmarks" / "overhead.py"), "--checkpoint",
           str(vega_sdxl_checkpoint()), "--size", "64", "--ref-size", "64", "--steps", "2", "--repeats", "1",
           "--rss-runs", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=host.ROOT)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reference_passes"] == {"cold": 1, "warm": 0, "naive": 2}
    # Vega at 1024 px: 2 blocks of 4096 x 640 and 4 + 4 of 1024 x 1280 ... in half precision (see the README)
    assert result["formula_resolution"] == 1024 and result["ref_cache_mb_per_step_fp16_formula"] > 40


@pytest.mark.slow
def test_full_size_sdxl_smoke_run():
    """The standard SDXL layout (70 transformer blocks, depth 10 at the lowest resolution): encode a face, apply,
    sample, decode; and the cache formula the README quotes (about 210 MB per step at 1024 px in half precision)."""
    import numpy as np
    from PIL import Image

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(full_sdxl_checkpoint()), output_vae=True,
                                                                output_clip=True,
                                                                model_options={"dtype": torch.float16})
    assert type(model.model.model_config).__name__ == "SDXL"
    assert layout_of(model).feature_bytes_per_step(1024) / 1e6 == pytest.approx(209.7, abs=0.1)  # 200 MiB
    face = torch.from_numpy(np.asarray(Image.open(host.ROOT / "assets" / "face.png").convert("RGB"),
                                       dtype=np.float32) / 255.0)[None]
    encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))  # noqa: E731
    ref = encode_reference(model, vae, face, encode("a photo of a face"), 2, "simple", 128)
    applied = apply_identity(model, init_from_model(""), ref, 1.0, 1.0, 0.0, 1.0)
    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(applied, noise, 2, 5.0, "euler", "simple", encode("an astronaut"), encode("blurry"),
                              latent, disable_pbar=True, seed=0)
    assert torch.isfinite(out).all() and ref.features.passes == 1
    assert vae.decode(out).shape == (1, 128, 128, 3)
