"""What the pack needs to know about a model's UNet: its transformer blocks, their widths, token grids and levels.

Read from the module tree ComfyUI built (``openaimodel.UNetModel``), so every layout ComfyUI detects (SD1.x,
SD2.x, SDXL and its distilled variants, transformer depth above one) is described the same way. Nothing here runs
the model.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .block_weights import level_of
from .blocks import block_name


class ModelFamilyError(ValueError):
    """A model the pack cannot serve, or one other than a reference or adapter was made for."""


def model_family(model) -> str:
    """ComfyUI's model config name (``SD15``, ``SDXL``, ``SSD1B`` ...) of a ModelPatcher."""
    return type(model.model.model_config).__name__


def diffusion_model(model) -> torch.nn.Module:
    """The UNet of a ModelPatcher (or of a BaseModel)."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("diffusion_model")
    return model.diffusion_model


def _stages(unet) -> Iterator[tuple[str, int, torch.nn.Module]]:
    for stage, seqs in (("input", list(unet.input_blocks)), ("middle", [unet.middle_block]),
                        ("output", list(unet.output_blocks))):
        for number, seq in enumerate(seqs):
            yield stage, number, seq


def transformer_blocks(model) -> dict[str, torch.nn.Module]:
    """Every BasicTransformerBlock of the UNet, by block name ("input.4.1"), in execution order."""
    unet = diffusion_model(model)
    found = {}
    if all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        for stage, number, seq in _stages(unet):
            for module in (seq if seq is not None else []):
                for index, tb in enumerate(getattr(module, "transformer_blocks", [])):
                    found[block_name((stage, number, index))] = tb
    if not found:
        raise ModelFamilyError(f"this {model_family(model)} model has no UNet with spatial transformers; "
                               f"Inv-Adapter serves SD1.x, SD2.x and SDXL-family checkpoints")
    return found


def block_dims(blocks: dict[str, torch.nn.Module]) -> dict[str, tuple[int, int]]:
    """(C, inner) of each block's self-attention: input width and heads x head dim."""
    return {name: (tb.attn1.to_q.in_features, tb.attn1.to_q.out_features) for name, tb in blocks.items()}


def latent_downscale(model) -> int:
    """Pixels per latent cell (8 for every SD-family VAE)."""
    return int(getattr(model.model.latent_format, "spacial_downscale_ratio", 8) or 8)


def block_grids(model, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Each transformer block's token grid (h, w) for a latent of ``latent_hw``, from the UNet's structure: a
    Downsample halves each side (rounding up, a stride-2 conv), an Upsample restores its skip's size."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    unet = diffusion_model(model)
    names = {id(tb): name for name, tb in transformer_blocks(model).items()}
    size, skips, found = tuple(latent_hw), [], {}

    def walk(seq):
        nonlocal size
        for module in seq:
            if isinstance(module, Downsample):
                size = tuple((s + 1) // 2 if module.use_conv else s // 2 for s in size)
            elif isinstance(module, Upsample):
                size = skips[-1] if skips else tuple(2 * s for s in size)
            for tb in getattr(module, "transformer_blocks", []):
                found[names[id(tb)]] = size

    for seq in unet.input_blocks:
        walk(seq)
        skips.append(size)
    walk(unet.middle_block)
    for seq in unet.output_blocks:
        skips.pop()
        walk(seq)
    return found


def tokens_per_block(model, resolution: int) -> dict[str, int]:
    """N of every transformer block for a square reference of ``resolution`` pixels."""
    side = -(-resolution // latent_downscale(model))
    return {name: h * w for name, (h, w) in block_grids(model, (side, side)).items()}


def block_levels(model) -> dict[str, str]:
    """Each block's level ("input_high" ... "output_low", "middle"): its stage and how far below the latent
    resolution its token grid is. Fixed by the UNet, so computed once, not per attention call."""
    grids = block_grids(model, (64, 64))
    return {name: level_of(name.split(".")[0], max(1, round(64 / w))) for name, (h, w) in grids.items()}


def block_keys(blocks: dict[str, torch.nn.Module]) -> dict[tuple, str]:
    """ComfyUI's (block, block_index) pair of each block name: what a patch finds in extra_options."""
    keys = {}
    for name in blocks:
        stage, number, index = name.split(".")
        keys[((stage, int(number)), int(index))] = name
    return keys


def call_key(extra_options: dict) -> tuple:
    """The (block, block_index) pair of the block an attention patch runs in."""
    return extra_options["block"], extra_options.get("block_index", 0)


def weights_key(model) -> tuple:
    """In-process identity of the weights a ModelPatcher runs: its BaseModel and its weight patches (LoRA).
    Clones share both until a patch is added, which gives them a new ``patches_uuid``."""
    return (id(model.model), model.patches_uuid)
