"""The README's size table for MM-DiT references, computed by each layout's own ``feature_bytes_per_step`` on the
real networks built on the meta device (no weights, no memory), from the configs ComfyUI's model detection gives
their files (``comfy/model_detection.py``), and ComfyUI's own sampling-memory estimate for the 24 GB arithmetic.

    python benchmarks/memory_table.py [--steps 20]

Prints markdown: per model and reference resolution, the kept K/V per step and for --steps steps, for every block,
the double blocks only, and fp8 storage; then what is left of a 24 GB card beside a bf16 and an fp8 Flux-dev.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from invadapter_core.comfyui.host import use_comfyui  # noqa: E402

use_comfyui()

import torch  # noqa: E402

import comfy.model_detection  # noqa: E402
import comfy.model_management as mm  # noqa: E402
from invadapter_core.arch.layout import ModelFamilyError, layout_of  # noqa: E402
from invadapter_core.reference.encode import DIT_CAPTURE  # noqa: E402

FLUX = {"image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
        "out_channels": 16, "qkv_bias": True, "txt_ids_dims": [], "in_channels": 16, "hidden_size": 3072,
        "context_in_dim": 4096, "patch_size": 2, "vec_in_dim": 768, "depth": 19, "depth_single_blocks": 38}
CHROMA = {**FLUX, "image_model": "chroma", "in_channels": 64, "out_channels": 64, "in_dim": 64, "out_dim": 3072,
          "hidden_dim": 5120, "n_layers": 5, "vec_in_dim": None}
MODELS = {  # what comfy.model_detection.detect_unet_config makes of each file
    "Flux.1-dev": {**FLUX, "guidance_embed": True},
    "Flux.1-schnell": {**FLUX, "guidance_embed": False},
    "Chroma": CHROMA,
    "Qwen-Image": {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60},
}
GB = 1e9
CARD = 24 * 2**30  # a "24 GB" card: 24 GiB
FLUX_DEV_WEIGHTS = {"bf16": 23.8e9, "fp8": 11.9e9}  # the released files' sizes (flux1-dev.safetensors, _fp8)


def meta_model(unet_config: dict):
    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if config is None:
        raise ValueError(f"ComfyUI finds no model config for {unet_config['image_model']}")
    config.set_inference_dtype(torch.bfloat16, None)
    return config.get_model({}, device=torch.device("meta"))


def per_step(name: str, base, resolution: int) -> dict:
    """Bytes per step by the layout of this network: every block, double blocks only, and fp8 of both. A network
    the core has no layout for yet gets the same K+V arithmetic from its own sizes, marked as such."""
    try:
        layout = layout_of(base)
    except ModelFamilyError:
        return arithmetic(base, resolution)
    dit_levels = set(layout.levels.values())
    double = DIT_CAPTURE["double blocks"]
    has_double = bool(dit_levels & double) and not dit_levels <= double
    out = {"blocks": len(layout.blocks), "source": type(layout).__name__,
           "all": layout.feature_bytes_per_step(resolution, 2), "all_fp8": layout.feature_bytes_per_step(resolution, 1)}
    if has_double:
        out["double"] = layout.feature_bytes_per_step(resolution, 2, levels=double)
        out["double_blocks"] = len(layout.at_levels(double))
        out["double_fp8"] = layout.feature_bytes_per_step(resolution, 1, levels=double)
    return out


def arithmetic(base, resolution: int) -> dict:
    """K and V of every block's image tokens (as ``FluxLayout.feature_bytes_per_step``) from the network's sizes."""
    net = base.diffusion_model
    blocks = len(net.transformer_blocks)
    hidden = int(net.inner_dim)
    side = -(-resolution // 8)
    tokens = ((side + net.patch_size // 2) // net.patch_size) ** 2
    each = tokens * 2 * hidden
    return {"blocks": blocks, "source": "arithmetic (no layout on this branch)", "all": blocks * each * 2,
            "all_fp8": blocks * each}


def fmt(b: float) -> str:
    return f"{b / 1e6:.0f} MB" if b < GB else f"{b / GB:.2f} GB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    n = args.steps
    rows, sources = [], {}
    flux_dev = None
    for name, config in MODELS.items():
        base = meta_model(config)
        flux_dev = flux_dev or base
        for res in (512, 1024):
            s = per_step(name, base, res)
            sources[name] = s["source"]
            double = (f"{fmt(s['double'])} · {fmt(n * s['double'])} · {fmt(n * s['double_fp8'])}"
                      if "double" in s else "— (no single-stream blocks)")
            rows.append(f"| {name} at {res}² | {s['blocks']} | {fmt(s['all'])} | {fmt(n * s['all'])} | "
                        f"{fmt(n * s['all_fp8'])} | {double} |")
    print(f"| reference | blocks | per step (bf16) | {n} steps | {n} steps fp8 | double blocks only: per step · "
          f"{n} steps · fp8 |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("Computed by: " + "; ".join(f"{k}: {v}" for k, v in sources.items()))
    print()
    # a 24 GB card beside Flux-dev generating at 1024²: ComfyUI's sampling estimate as a CUDA card with PyTorch
    # attention computes it (BaseModel.memory_required's flash-attention branch: area x dtype size x 0.01 x the
    # family's memory_usage_factor MiB; Flux-dev runs cfg 1, batch 1) and its inference reserve
    area = 1 * 128 * 128
    sampling = area * 2 * 0.01 * flux_dev.memory_usage_factor * 2**20
    reserve = mm.minimum_inference_memory()
    print(f"A 24 GB card ({CARD / GB:.1f} GB) with Flux-dev generating at 1024²: ComfyUI's sampling estimate "
          f"{fmt(sampling)}, its inference reserve {fmt(reserve)}.")
    dev = {res: per_step("Flux.1-dev", flux_dev, res) for res in (512, 1024)}
    # (what, the kept steps, the application's K/V store beside them: bf16, the steps' blocks)
    options = [(f"{res}² {what}", n * dev[res][key], n * dev[res][key.replace("_fp8", "")])
               for res in (512, 1024) for what, key in (("all blocks", "all"), ("all blocks fp8", "all_fp8"),
                                                         ("double blocks", "double"),
                                                         ("double blocks fp8", "double_fp8"))]
    for kind, weights in FLUX_DEV_WEIGHTS.items():
        left = CARD - weights - sampling - reserve
        if left <= 0:
            print(f"- {kind} Flux-dev ({weights / GB:.1f} GB): {fmt(-left)} short before any cache (ComfyUI runs the "
                  f"model partly offloaded); every kept step lives in pinned host memory")
            continue
        fits = [f"{what} ({fmt(b)})" for what, b, _ in options if b <= left]
        with_store = [f"{what} ({fmt(b + kv)})" for what, b, kv in options if b + kv <= left]
        print(f"- {kind} Flux-dev ({weights / GB:.1f} GB): {fmt(left)} left; the kept steps fit for "
              f"{', '.join(fits) or 'none'}; with the application's bf16 K/V store beside them: "
              f"{', '.join(with_store) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
