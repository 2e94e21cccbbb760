"""The seam between the method and a network: one layout object per model.

Everything the rest of the pack asks of a network goes through its ``Layout``: the attention blocks and their one id
convention (the block name, e.g. "input.4.1"), each block's level and widths, the token grid of each block for a
latent size, what one step of a reference's features costs, and where the pack's patches attach. A layout is built
once per model (``layout_of``, cached on the BaseModel that clones share). A second architecture is one new
``Layout`` subclass added to ``ARCHITECTURES`` (plus its inversion schedule), not edits across the core.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

KINDS = ("self", "cross")


class ModelFamilyError(ValueError):
    """A model the pack cannot serve, or one other than a reference or adapter was made for."""


def base_model(model):
    """The BaseModel of a ModelPatcher (or the BaseModel itself)."""
    return model.model if hasattr(model, "get_model_object") else model


def model_family(model) -> str:
    """ComfyUI's model config name (``SD15``, ``SDXL``, ``SSD1B`` ...) of a ModelPatcher or BaseModel."""
    return type(base_model(model).model_config).__name__


def diffusion_model(model) -> torch.nn.Module:
    """The denoising network of a ModelPatcher (or of a BaseModel)."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("diffusion_model")
    return model.diffusion_model


def weights_key(model) -> tuple:
    """In-process identity of the weights a ModelPatcher runs: its BaseModel and its weight patches (LoRA).
    Clones share both until a patch is added, which gives them a new ``patches_uuid``."""
    return (id(model.model), model.patches_uuid)


class Layout:
    """What the pack knows of one network: ``blocks`` (name -> attention block, in execution order), the ComfyUI
    call key of each block, ``levels`` (name -> level). An architecture's subclass finds them in the network and
    implements ``_compute_grids``."""

    # the list patches of ComfyUI's attention the EAA uses, per attention kind: (input patch, output patch)
    PATCH_SLOTS = {"self": ("attn1_patch", "attn1_output_patch"), "cross": ("attn2_patch", "attn2_output_patch")}
    SERVES = ""  # the families this architecture covers, in words (for refusals)

    def __init__(self, blocks: dict[str, torch.nn.Module], call_keys: dict[tuple, str], levels: dict[str, str],
                 family: str = "", downscale: int = 8, latent_channels: int = 4, adm_channels: Optional[int] = None,
                 dims: Optional[dict[str, tuple[int, int]]] = None, context_dim: Optional[int] = None):
        self.family = family
        self.downscale = downscale  # pixels per latent cell
        self.latent_channels = latent_channels
        self.adm_channels = adm_channels  # width of the ADM vector the network takes (SDXL), None: none
        self.blocks = blocks
        self._name_at = call_keys  # ComfyUI's transformer_options call key -> block name
        self.levels = levels
        # name -> (width of the attention's input, width of its q/k/v); the width of the text conditioning. Read off
        # the blocks' attn1/attn2 (ComfyUI's BasicTransformerBlock) unless the architecture gives them.
        self.dims = dims if dims is not None else {
            name: (tb.attn1.to_q.in_features, tb.attn1.to_q.out_features) for name, tb in blocks.items()}
        self.context_dim = context_dim if context_dim is not None else \
            next(iter(blocks.values())).attn2.to_k.in_features
        self._grids: dict[tuple[int, int], dict[str, tuple[int, int]]] = {}

    @staticmethod
    def model_facts(model) -> dict:
        """What a layout records of the model around the network (family, latent format, ADM input)."""
        base = base_model(model)
        return {"family": model_family(base),
                "downscale": int(getattr(base.latent_format, "spacial_downscale_ratio", 8) or 8),
                "latent_channels": int(base.latent_format.latent_channels),
                "adm_channels": base.model_config.unet_config.get("adm_in_channels")}

    @classmethod
    def describes(cls, net: torch.nn.Module) -> bool:
        """Whether ``net`` has this architecture's structure (what ``layout_of`` dispatches on)."""
        raise NotImplementedError

    @classmethod
    def refuses(cls, net: torch.nn.Module) -> Optional[str]:
        """Why the pack does not serve this network although it has the structure (None: it does)."""
        return None

    @staticmethod
    def is_block_name(name: str) -> bool:
        raise NotImplementedError

    # --- blocks ------------------------------------------------------------------------------------------------
    def block_at(self, extra_options: dict) -> str:
        """The name of the block an attention patch is running in."""
        return self._name_at[(extra_options["block"], extra_options.get("block_index", 0))]

    def attention(self, kind: str, name: str) -> torch.nn.Module:
        """The self- (``attn1``) or cross-attention (``attn2``) module of a block."""
        block = self.blocks[name]
        return block.attn1 if kind == "self" else block.attn2

    def capture_patches(self, capture, cross: bool) -> dict[str, list]:
        """The patch lists of a reference pass recording into ``capture`` (a ``reference.capture.FeatureCapture``):
        ComfyUI's input patch of each attention kind, called as ``p(n, context, value, extra_options)``."""
        patches = {self.PATCH_SLOTS["self"][0]: [capture.capture_self]}
        if cross:
            patches[self.PATCH_SLOTS["cross"][0]] = [capture.capture_cross]
        return patches

    def feature_width(self, name: str) -> int:
        """The width of what a reference keeps per token of a block (a UNet: the self-attention's input)."""
        return self.dims[name][0]

    def at_levels(self, levels: Optional[set[str]]) -> Optional[set[str]]:
        """The blocks at these levels (None: every block)."""
        return None if levels is None else {name for name, lv in self.levels.items() if lv in levels}

    # --- sizes -------------------------------------------------------------------------------------------------
    def grids(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Each block's token grid (h, w) for a latent of ``latent_hw`` (memoised: it depends on nothing else)."""
        key = tuple(latent_hw)
        if key not in self._grids:
            self._grids[key] = self._compute_grids(key)
        return self._grids[key]

    def _compute_grids(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def latent_side(self, pixels: int) -> int:
        return -(-pixels // self.downscale)

    def tokens(self, resolution: int) -> dict[str, int]:
        """N of every block for a square reference of ``resolution`` pixels."""
        side = self.latent_side(resolution)
        return {name: h * w for name, (h, w) in self.grids((side, side)).items()}

    def feature_bytes_per_step(self, resolution: int, bytes_per_value: int = 2, with_cross: bool = False,
                               levels: Optional[set[str]] = None) -> int:
        """What one step of a reference's features costs: the sum over blocks (those at ``levels``; None: all) of
        tokens x width x bytes (self-attention inputs; the cross-attention inputs of a trained adapter cost the
        same again)."""
        tokens, kept = self.tokens(resolution), self.at_levels(levels)
        return sum(tokens[n] * self.dims[n][0] * bytes_per_value for n in self.dims
                   if kept is None or n in kept) * (2 if with_cross else 1)

    def skip_patches(self, keep: Optional[set[str]]) -> dict:
        """``patches_replace`` entries that skip the blocks a features-only reference pass needs not run (those
        after the last block of ``keep``); none where the network has no such seam."""
        return {}


ARCHITECTURES: list[type[Layout]] = []  # filled by the architecture modules (arch/__init__ imports them)
_LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def served_families() -> str:
    """The families the nodes serve (a layout with no SERVES is known to the core but not offered yet)."""
    return "; ".join(cls.SERVES for cls in ARCHITECTURES if cls.SERVES)


def layout_of(model) -> Layout:
    """The layout of a ModelPatcher's (or BaseModel's) network, built on first use and cached per BaseModel."""
    base = base_model(model)
    found = _LAYOUTS.get(base)
    if found is None:
        net = diffusion_model(model)
        cls = next((c for c in ARCHITECTURES if c.describes(net)), None)
        if cls is None:
            raise ModelFamilyError(f"this {model_family(base)} model's network is a {type(net).__name__}, which "
                                   f"Inv-Adapter has no layout for; it serves {served_families()}")
        found = _LAYOUTS[base] = cls(model, net)
    return found


def is_block_name(name: str) -> bool:
    """A block name of any architecture the pack knows (what adapter and reference files may hold)."""
    return any(cls.is_block_name(name) for cls in ARCHITECTURES)
