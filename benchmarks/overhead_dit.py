"""``overhead.py`` for MM-DiTs (Flux, Chroma; ``adapter.joint``): plain vs cold vs warm vs naive sampling, and the
host work per patched block call (``host_overhead``'s machinery), on one model and one set of settings.

The model is a Flux-family diffusion-model file (a UNET file, as UNETLoader loads it; or one checkpoint with its
text encoders and VAE), or ``tiny-flux``: the tiny random Flux of the tests, built in-process (2 double + 2 single
blocks, hidden 32; every kernel takes microseconds there, so its times are host overhead, what a launch-bound GPU
pays per call). A UNET file has no text encoder or VAE beside it: the prompts are random tensors of the model's text
width and the face is a random latent (the EAA's cost does not depend on what they say).
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import comfy.model_management as mm
import comfy.sample
import comfy.sd
from invadapter_core.adapter.joint import JointApplication, install_joint, joint_add, joint_stash
from invadapter_core.arch.layout import layout_of
from invadapter_core.reference.encode import (DIT_CAPTURE, FEATURE_PRECISION, invert_latent, kept_sigmas,
                                              prepare_images, reference_conds)

from host_overhead import aten_ops, timed_patches

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny-flux"
TEXT_TOKENS = 256  # Flux-dev's T5 length in ComfyUI's default (schnell: 256 too)


def is_dit_checkpoint(path: str) -> bool:
    """A Flux-family file (its double-stream blocks, with or without a ``model.diffusion_model.`` prefix), or the
    in-process tiny Flux."""
    if path == TINY:
        return True
    if not path.endswith(".safetensors"):
        return False
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return any(".double_blocks.0." in f".{k}" for k in f.keys())


def load(path: str):
    """(model, encode_text, vae) where the file has them; encode_text and vae None for a UNET file or tiny-flux."""
    if path == TINY:
        sys.path.insert(0, str(REPO / "tests"))
        from support.flux_models import tiny_flux_model

        return tiny_flux_model(), None, None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        whole = any(k.startswith(("first_stage_model.", "vae.")) for k in f.keys())
    if whole:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3]
        return model, (lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))), vae
    return comfy.sd.load_diffusion_model(path), None, None


def random_text(model, seed: int):
    """A CONDITIONING entry of the model's text width (T5 context, CLIP-L pooled vector where it takes one)."""
    net = model.get_model_object("diffusion_model")
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, TEXT_TOKENS, int(net.txt_in.in_features), generator=g)
    vec = getattr(net.params, "vec_in_dim", None)
    return [[context, {"pooled_output": torch.randn(1, vec, generator=g)} if vec else {}]]


def with_guidance(conditioning, guidance: float):
    return [[c, dict(o, guidance=guidance)] for c, o in conditioning]


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, encode_text, vae = load(args.checkpoint)
    layout = layout_of(model)
    cfg = 1.0 if args.cfg is None else args.cfg
    if encode_text is not None:
        caption, positive, negative = (encode_text("a photo of a woman's face"),
                                       encode_text("a portrait of a woman as an astronaut"), encode_text(""))
    else:
        caption, positive, negative = random_text(model, 1), random_text(model, 2), random_text(model, 3)
    caption, positive, negative = (with_guidance(c, args.guidance) for c in (caption, positive, negative))
    side = args.size // layout.downscale
    latent = torch.zeros(1, layout.latent_channels, side, side)
    noise = comfy.sample.prepare_noise(latent, 42)
    ref_side = args.ref_size // layout.downscale
    if vae is not None:  # a whole checkpoint: the face photo, as the encode node takes it
        import numpy as np
        from PIL import Image

        photo = torch.from_numpy(np.asarray(Image.open(args.image).convert("RGB"), dtype=np.float32) / 255.0)[None]
        face = vae.encode(prepare_images(photo, args.ref_size))
    else:
        face = torch.randn(1, layout.latent_channels, ref_side, ref_side, generator=torch.Generator().manual_seed(7))
    context, options = caption[0][0], caption[0][1]
    x0 = model.model.process_latent_in(face)
    conds = reference_conds(model, context, options, x0, (args.ref_size, args.ref_size))
    levels = DIT_CAPTURE[args.capture]
    store_dtype = torch.float8_e4m3fn if args.feature_precision.startswith("fp8") else \
        FEATURE_PRECISION[args.feature_precision]

    def sample(m):
        return comfy.sample.sample(m, noise, args.steps, cfg, args.sampler, args.scheduler, positive, negative,
                                   latent, disable_pbar=True, seed=42)

    def encode(keep: bool):
        return invert_latent(model, face, conds, args.steps, args.scheduler, (args.ref_size, args.ref_size), keep,
                             levels=levels, store_dtype=store_dtype)

    def apply(ref, reuse=True):
        app = JointApplication(model, ref, 1.0, reuse_features=reuse)
        return install_joint(model, app), app

    calls = []
    handle = model.get_model_object("diffusion_model").register_forward_pre_hook(lambda m, a: calls.append(1))

    def counted(fn):
        calls.clear()
        out = fn()
        return out, len(calls)

    sample(model)  # warm-up: loads the model, builds kernels
    times = {"plain": [], "cold": [], "warm": [], "naive": []}
    encode_times, passes, model_calls = [], {}, {}
    for _ in range(args.repeats):
        t_plain, (_, model_calls["plain"]) = timed(lambda: counted(lambda: sample(model)))
        times["plain"].append(t_plain)
        (t_encode, ref), model_calls["encode"] = counted(lambda: timed(lambda: encode(True)))
        m, app = apply(ref)
        t_sample, (_, model_calls["cold_sampling"]) = timed(lambda: counted(lambda: sample(m)))
        times["cold"].append(t_encode + t_sample)
        encode_times.append(t_encode)
        passes["cold"] = app.passes
        t_warm, (_, model_calls["warm"]) = timed(lambda: counted(lambda: sample(m)))
        times["warm"].append(t_warm)
        passes["warm"] = app.passes - passes["cold"]

        def naive():
            r = encode(False)
            nm, napp = apply(r, reuse=False)
            sample(nm)
            return napp

        t_naive, (naive_app, model_calls["naive"]) = timed(lambda: counted(naive))
        times["naive"].append(t_naive)
        passes["naive"] = naive_app.passes
        print(f"repeat {len(times['plain'])}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    handle.remove()

    # host work per patched block call, on the warm model (host_overhead's wall-time wrapper around our patches)
    totals = {"s": 0.0, "calls": 0}
    timed_model = timed_patches(m, totals, ours={joint_stash, joint_add})
    per_call = []
    for _ in range(args.repeats):
        totals.update(s=0.0, calls=0)
        sample(timed_model)
        per_call.append(totals["s"] / max(totals["calls"] // 2, 1))  # a stash and an add per patched block call
    unet_calls = model_calls["plain"]
    plain_ops, warm_ops = aten_ops(lambda: sample(model)), aten_ops(lambda: sample(m))
    blocks = len(app.cache.store.keys) if app.cache.store is not None else len(layout.blocks)
    med = {k: statistics.median(v) for k, v in times.items()}
    kept_steps = len(kept_sigmas(model, ref.sigmas.tolist()[:-1]))
    bpv = (store_dtype or model.model.get_dtype_inference()).itemsize
    return {
        "plain_s": round(med["plain"], 4), "cold_s": round(med["cold"], 4), "warm_s": round(med["warm"], 4),
        "naive_s": round(med["naive"], 4),
        "ratio_cold": round(med["cold"] / med["plain"], 3), "ratio_warm": round(med["warm"] / med["plain"], 3),
        "ratio_naive": round(med["naive"] / med["plain"], 3),
        "encode_s": round(statistics.median(encode_times), 4),
        "host_us_per_patched_block_call": round(statistics.median(per_call) * 1e6, 1),
        "aten_ops_per_model_call": {"plain": round(plain_ops / unet_calls, 1), "warm": round(warm_ops / unet_calls, 1),
                                    "extra_per_block": round((warm_ops - plain_ops) / unet_calls / blocks, 2)},
        "reference_passes": passes, "model_calls": model_calls,
        "ref_cache_mb": round(ref.features.nbytes() / 2**20, 3),
        "ref_cache_mb_formula": round(kept_steps * layout.feature_bytes_per_step(args.ref_size, bpv, levels=levels)
                                      / 2**20, 3),
        "kv_store_mb": round(app.cache.nbytes() / 2**20, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "runs": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "settings": {"checkpoint": Path(args.checkpoint).name, "family": layout.family, "size": args.size,
                     "ref_size": args.ref_size, "steps": args.steps, "sampler": args.sampler,
                     "scheduler": args.scheduler, "cfg": cfg, "guidance": args.guidance, "capture": args.capture,
                     "feature_precision": args.feature_precision, "repeats": args.repeats,
                     "blocks_patched": blocks, "threads": torch.get_num_threads(),
                     "device": str(mm.get_torch_device()), "dtype": str(model.model.get_dtype_inference()),
                     "torch": torch.__version__},
    }


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(args) -> int:
    print(json.dumps(run(args)))
    return 0
