"""Inv-Adapter's cost against plain sampling, in one process, on one model and one set of settings.

    python benchmarks/overhead.py [--checkpoint PATH] [--size 256] [--ref-size 256] [--steps 20] ...

Times (median of --repeats): plain sampling; Inv-Adapter cold (inversion of the face + sampling, features of the
inversion reused); warm (the same reference again: its features are cached); naive (the paper's straightforward
pipeline: inversion, then a fresh reference pass at every step, nothing reused). Then checks that memory does not
grow over --rss-runs warm generations. The last line printed is one JSON object.
Without --checkpoint it uses the full-size random SD1.5 checkpoint the tests generate (cached outside the repo).
A Flux-family checkpoint (a Flux or Chroma UNET file, or one checkpoint with its text encoders), or ``tiny-flux``
(the tests' tiny random Flux, in-process), runs the MM-DiT benchmark (``overhead_dit.py``): the same times, plus the
host work per patched block call and the model calls of each run.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from invadapter_core.comfyui.host import use_comfyui  # noqa: E402

use_comfyui()

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
from invadapter_core.adapter.application import Application, install  # noqa: E402
from invadapter_core.arch.fit import default_resolution  # noqa: E402
from invadapter_core.arch.layout import layout_of  # noqa: E402
from invadapter_core.reference.encode import encode_reference  # noqa: E402
from invadapter_core.adapter.weights import init_from_model  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="an SD1.x/2.x or SDXL-family checkpoint (default: the full-size random SD1.5 "
                                        "test checkpoint), a Flux-family UNET file or checkpoint, or tiny-flux")
    p.add_argument("--size", type=int, default=256, help="output width and height in pixels")
    p.add_argument("--ref-size", type=int, default=256, help="reference (face) resolution in pixels")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="simple")
    p.add_argument("--cfg", type=float, default=None, help="default 7 (UNets), 1 (MM-DiTs: guidance embedding)")
    p.add_argument("--guidance", type=float, default=3.5, help="MM-DiTs: the distilled guidance (Flux-dev)")
    p.add_argument("--capture", default="all levels", help="MM-DiTs: which blocks the reference keeps "
                                                           "(all levels, double blocks, early blocks)")
    p.add_argument("--feature-precision", default="model", help="MM-DiTs: model, or fp8 (half the memory)")
    p.add_argument("--threads", type=int, default=0, help="MM-DiTs: torch CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rss-runs", type=int, default=20, help="warm generations for the memory check (0: skip)")
    p.add_argument("--image", default=str(REPO / "assets" / "face.png"))
    return p.parse_args()


def load_face(path: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)[None]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> int:
    args = parse()
    if args.checkpoint is not None:
        import overhead_dit

        if overhead_dit.is_dit_checkpoint(args.checkpoint):
            return overhead_dit.main(args)
    if args.cfg is None:
        args.cfg = 7.0
    if args.checkpoint is None:
        sys.path.insert(0, str(REPO / "tests"))
        from support.models import full_sd15_checkpoint
        args.checkpoint = str(full_sd15_checkpoint())
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)[:3]
    encode_text = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))  # noqa: E731
    caption, positive, negative = (encode_text("a photo of a woman's face"),
                                   encode_text("a portrait of a woman as an astronaut"), encode_text("blurry"))
    face = load_face(args.image)
    latent = torch.zeros(1, layout_of(model).latent_channels, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 42)

    def sample(m):
        return comfy.sample.sample(m, noise, args.steps, args.cfg, args.sampler, args.scheduler, positive, negative,
                                   latent, disable_pbar=True, seed=42)

    def encode(keep: bool):
        return encode_reference(model, vae, face, caption, args.steps, args.scheduler, args.ref_size, keep)

    def apply(ref, reuse=True):
        return install(model, Application(init_from_model(""), ref, model, 1.0, 1.0, 1e9, 0.0, reuse_features=reuse))

    sample(model)  # warm-up: loads the model, builds kernels
    times = {"plain": [], "cold": [], "warm": [], "naive": []}
    encode_times = []  # the inversion part of cold: VAE encode + one batch-1 UNet pass per inversion step
    passes = {}
    for _ in range(args.repeats):
        times["plain"].append(timed(lambda: sample(model))[0])
        t_encode, ref = timed(lambda: encode(True))
        t_sample, _ = timed(lambda: sample(apply(ref)))
        times["cold"].append(t_encode + t_sample)
        encode_times.append(t_encode)
        passes["cold"] = ref.features.passes
        before = ref.features.passes
        times["warm"].append(timed(lambda: sample(apply(ref)))[0])
        passes["warm"] = ref.features.passes - before
        t_naive, naive_ref = timed(lambda: (lambda r: (sample(apply(r, reuse=False)), r)[1])(encode(False)))
        times["naive"].append(t_naive)
        passes["naive"] = naive_ref.features.passes
        print(f"repeat {len(times['plain'])}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    entries = max(len(ref.features), 1)
    per_step_mb = ref.features.nbytes() / entries / 2**20

    rss = []
    for _ in range(args.rss_runs):
        sample(apply(ref))
        rss.append(rss_mb())
    result = {
        "plain_s": round(med["plain"], 3), "cold_s": round(med["cold"], 3), "warm_s": round(med["warm"], 3),
        "naive_s": round(med["naive"], 3),
        "ratio_cold": round(med["cold"] / med["plain"], 3), "ratio_warm": round(med["warm"] / med["plain"], 3),
        "ratio_naive": round(med["naive"] / med["plain"], 3),
        "encode_s": round(statistics.median(encode_times), 3),
        "ref_cache_mb": round(ref.features.nbytes() / 2**20, 2), "ref_cache_mb_per_step": round(per_step_mb, 2),
        "ref_cache_dtype": str(next(iter(ref.features.get(ref.features.sigmas()[0]).self_attn.values())).dtype),
        "ref_cache_mb_per_step_fp16_formula": round(
            layout_of(model).feature_bytes_per_step(default_resolution(model)) / 2**20, 2),
        "formula_resolution": default_resolution(model),
        "reference_passes": passes, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_first_mb": round(rss[0], 1) if rss else None, "rss_last_mb": round(rss[-1], 1) if rss else None,
        "rss_runs": args.rss_runs, "runs": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "settings": {"checkpoint": Path(args.checkpoint).name, "size": args.size, "ref_size": args.ref_size,
                     "steps": args.steps, "sampler": args.sampler, "scheduler": args.scheduler, "cfg": args.cfg,
                     "repeats": args.repeats, "device": str(mm.get_torch_device()),
                     "dtype": str(model.model.get_dtype_inference()), "torch": torch.__version__},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
