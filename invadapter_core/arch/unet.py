"""The layout of ComfyUI's SD-family UNet (``openaimodel.UNetModel``): SD1.x, SD2.x, SDXL and its distilled variants.

Read from the module tree ComfyUI built, so every layout ComfyUI detects (transformer depth above one included) is
described the same way. Nothing here runs the model.

Blocks are the UNet's ``BasicTransformerBlock``s, named "stage.id.index": the stage (input, middle, output), the
block's position in that stage's list, and its index inside the SpatialTransformer ("input.4.1"). ComfyUI's
attention patches find ``block`` = (stage, id) and ``block_index`` in their ``extra_options``.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .layout import ARCHITECTURES, Layout, ModelFamilyError, model_family
from .levels import level_of

STAGES = ("input", "middle", "output")


def parse_block_name(name: str) -> tuple[str, int, int]:
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in STAGES or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"not a block name: {name!r} (expected e.g. 'input.1.0')")
    return parts[0], int(parts[1]), int(parts[2])


def _stages(unet) -> Iterator[tuple[str, int, torch.nn.Module]]:
    for stage, seqs in (("input", list(unet.input_blocks)), ("middle", [unet.middle_block]),
                        ("output", list(unet.output_blocks))):
        for number, seq in enumerate(seqs):
            yield stage, number, seq


class UNetLayout(Layout):
    SERVES = ("SD1.x, SD2.x (512 and 768-v), SDXL and its family (SDXL fine-tunes such as Pony, Illustrious or "
              "NoobAI, SSD-1B, Segmind Vega, KOALA, the SDXL refiner) and their inpainting checkpoints")

    def __init__(self, model, unet: torch.nn.Module):
        self.unet = unet
        blocks, call_keys = {}, {}
        for stage, number, seq in _stages(unet):
            for module in (seq if seq is not None else []):
                for index, tb in enumerate(getattr(module, "transformer_blocks", [])):
                    name = f"{stage}.{number}.{index}"
                    blocks[name] = tb
                    call_keys[((stage, number), index)] = name
        if not blocks:
            raise_no_blocks(model)
        super().__init__(blocks, call_keys, {}, **self.model_facts(model))
        self.levels = self._levels()

    @classmethod
    def describes(cls, net: torch.nn.Module) -> bool:
        """ComfyUI's UNetModel itself: its subclasses (SVD's VideoUNet) add layers the EAA does not know."""
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        return type(net) is UNetModel

    @staticmethod
    def is_block_name(name: str) -> bool:
        try:
            parse_block_name(name)
        except ValueError:
            return False
        return True

    def _compute_grids(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """A Downsample halves each side (rounding up, a stride-2 conv), an Upsample restores its skip's size."""
        from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

        names = {id(tb): name for name, tb in self.blocks.items()}
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

        for seq in self.unet.input_blocks:
            walk(seq)
            skips.append(size)
        walk(self.unet.middle_block)
        for seq in self.unet.output_blocks:
            skips.pop()
            walk(seq)
        return found

    def _levels(self) -> dict[str, str]:
        """Each block's stage and the rank of its token grid among the UNet's transformer resolutions."""
        grids = self.grids((64, 64))
        sides = sorted({w for name, (h, w) in grids.items() if not name.startswith("middle")}, reverse=True)
        return {name: level_of(name.split(".")[0], sides.index(w) if w in sides else 0, len(sides))
                for name, (h, w) in grids.items()}


def raise_no_blocks(model) -> None:
    raise ModelFamilyError(f"this {model_family(model)} model has no UNet with spatial transformers; "
                           f"Inv-Adapter serves {UNetLayout.SERVES}")


ARCHITECTURES.append(UNetLayout)
