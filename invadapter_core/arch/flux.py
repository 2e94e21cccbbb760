"""The layout of ComfyUI's Flux network (``comfy.ldm.flux.model.Flux``: Flux.1 dev and schnell, their fine-tunes,
Kontext) and of Chroma (``comfy.ldm.chroma.model.Chroma``, built from the same blocks): an MM-DiT.

Blocks are the ``double_blocks`` (text and image streams, attention over both) and the ``single_blocks`` (one joint
stream), named "double.3" and "single.12". ComfyUI's attention patches find ``block_type`` ("double", "single") and
``block_index`` in their ``extra_options``. Both kinds call one joint attention, its patches as
``attn1_patch(q, k, v, pe=pe, attn_mask=attn_mask, extra_options=...)`` (q, k after QK-norm and before RoPE,
[B, heads, L, d], text tokens first, the image tokens at ``extra_options["img_slice"]``), which may return a dict
replacing q/k/v/pe/attn_mask, and ``attn1_output_patch(attn, extra_options)`` on the joint output [B, L, heads x d]
before the output projection; both patches of one block get the same ``extra_options`` dict.

What a reference keeps of a block (``reference.capture.FeatureCapture.capture_joint``): its image tokens' K (after
QK-norm, before RoPE) and V, as one [B, N, 2 x hidden] tensor (``join_kv``). They are what the attention patch is
handed, so capturing costs no projection, no hook and no weight access (single blocks compute q/k/v and the MLP input
in one ``linear1``, whose K/V part would have to be sliced out of fp8 or GGUF weights to project normed states); the
EAA then adds them with no per-call projection. That is twice the memory of the normed hidden states
(``feature_bytes_per_step``); positions are not kept, RoPE is applied at use (``positions``) so where the reference
sits is an option of the application.

Served by the nodes: InvAdapterApply routes it to ``adapter.joint``.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from .layout import ARCHITECTURES, Layout
from .levels import dit_level_of

STREAMS = ("double", "single")
_NAME = re.compile(r"^(double|single)\.(\d+)$")


def join_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K and V [B, heads, N, d] as one [B, N, 2 x heads x d] tensor (K's heads, then V's), what a reference keeps."""
    b, h, n, d = k.shape
    return torch.cat((k, v), dim=1).transpose(1, 2).reshape(b, n, 2 * h * d)


def split_kv(f: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``join_kv``: [B, N, 2 x heads x d] -> K, V [B, heads, N, d]."""
    b, n, width = f.shape
    kv = f.reshape(b, n, 2 * heads, width // (2 * heads)).transpose(1, 2)
    return kv[:, :heads], kv[:, heads:]


def _pass_double(args: dict, extra: dict) -> dict:
    return {"img": args["img"], "txt": args["txt"]}


def _pass_single(args: dict, extra: dict) -> dict:
    return {"img": args["img"]}


def parse_block_name(name: str) -> tuple[str, int]:
    found = _NAME.match(name)
    if found is None:
        raise ValueError(f"not a Flux block name: {name!r} (expected e.g. 'double.3' or 'single.12')")
    return found.group(1), int(found.group(2))


class FluxLayout(Layout):
    SERVES = "Flux.1 (dev, schnell, their fine-tunes, Kontext) and Chroma"
    FAMILIES = "Flux.1 (dev, schnell, their fine-tunes, Kontext) and Chroma"
    PATCH_SLOTS = {"self": ("attn1_patch", "attn1_output_patch")}  # one joint attention per block, no cross
    ADDS_TERM = "output patch"  # where adapter.joint adds the EAA term: attn1_output_patch (or "attention override")

    def __init__(self, model, net: torch.nn.Module):
        self.net = net
        blocks, call_keys, levels = {}, {}, {}
        for stream in STREAMS:
            found = list(getattr(net, f"{stream}_blocks"))
            for i, block in enumerate(found):
                name = f"{stream}.{i}"
                blocks[name] = block
                call_keys[(stream, i)] = name
                levels[name] = dit_level_of(stream, i, len(found))
        hidden = int(net.hidden_size)
        facts = self.model_facts(model)
        facts["adm_channels"] = getattr(net.params, "vec_in_dim", None) if getattr(net, "vector_in", None) else None
        super().__init__(blocks, call_keys, levels, **facts, dims={name: (hidden, hidden) for name in blocks},
                         context_dim=int(net.txt_in.in_features))
        self.heads = int(net.num_heads)
        self.head_dim = hidden // self.heads
        self.patch_size = int(net.patch_size)
        self.axes = len(net.params.axes_dim)
        self.guidance_embed = bool(getattr(net.params, "guidance_embed", False))  # Flux-dev style: needs guidance

    def feature_width(self, name: str) -> int:
        """What a reference keeps per token of a block: its K and V (``join_kv``)."""
        return 2 * self.dims[name][1]

    @classmethod
    def describes(cls, net: torch.nn.Module) -> bool:
        """Flux and Chroma themselves (their subclasses, such as Chroma Radiance's pixel-space model, differ)."""
        from comfy.ldm.chroma.model import Chroma
        from comfy.ldm.flux.model import Flux

        return type(net) in (Flux, Chroma)

    @staticmethod
    def is_block_name(name: str) -> bool:
        return _NAME.match(name) is not None

    def block_at(self, extra_options: dict) -> str:
        return self._name_at[(extra_options["block_type"], extra_options["block_index"])]

    def attention(self, kind: str, name: str) -> torch.nn.Module:
        raise NotImplementedError("a Flux block has one joint attention; its EAA is adapter.joint's")

    def capture_patches(self, capture, cross: bool) -> dict[str, list]:
        return {"attn1_patch": [capture.capture_joint]}

    # --- sizes -------------------------------------------------------------------------------------------------
    def token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The image-token grid of a latent: patches of patch_size², the latent padded up (as ``Flux.process_img``)."""
        p = self.patch_size
        return tuple((s + p // 2) // p for s in latent_hw)

    def _compute_grids(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        grid = self.token_grid(latent_hw)
        return dict.fromkeys(self.blocks, grid)

    def feature_bytes_per_step(self, resolution: int, bytes_per_value: int = 2, with_cross: bool = False,
                               levels: Optional[set[str]] = None) -> int:
        """K and V of every block's image tokens (the blocks at ``levels``; None: all): tokens x 2 x hidden x bytes,
        summed over blocks. An application's K/V store costs the same per step it keeps (``adapter.joint_store``)."""
        tokens, kept = self.tokens(resolution), self.at_levels(levels)
        return sum(tokens[n] * 2 * self.dims[n][1] * bytes_per_value for n in self.dims if kept is None or n in kept)

    def skip_patches(self, keep: Optional[set[str]]) -> dict:
        """Block replacements (``patches_replace["dit"]``, ComfyUI's own seam) that pass the hidden states through
        every block after the last of ``keep``: a reference pass that only records K/V needs none of them (with
        double blocks only kept, that is half of Flux's compute). The pass's output is then meaningless."""
        if keep is None:
            return {}
        order = list(self.blocks)
        last = max((order.index(name) for name in keep), default=-1)
        skipped = {}
        for name in order[last + 1:]:
            stream, i = parse_block_name(name)
            skipped[(f"{stream}_block", i)] = _pass_double if stream == "double" else _pass_single
        return {"dit": skipped} if skipped else {}

    # --- positions ---------------------------------------------------------------------------------------------
    def positions(self, grid_hw: tuple[int, int], index: float = 0.0, device=None) -> torch.Tensor:
        """RoPE of an image-token grid as the network builds it (``Flux.process_img``, ``EmbedND``): axis 0 is
        ``index`` (0: the generation's own frame; 1: a Kontext reference's), axes 1 and 2 the row and column.
        Returns pe [1, 1, h x w, d / 2, 2, 2] (float32)."""
        h, w = grid_hw
        ids = torch.zeros(h, w, self.axes, device=device, dtype=torch.float32)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(h, device=device, dtype=torch.float32)[:, None]
        ids[..., 2] = torch.arange(w, device=device, dtype=torch.float32)[None, :]
        return self.net.pe_embedder(ids.reshape(1, h * w, self.axes))


ARCHITECTURES.append(FluxLayout)
