"""The layout of ComfyUI's Qwen-Image network (``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel``: Qwen-Image,
its fine-tunes and Qwen-Image-Edit), the second MM-DiT family, on the Flux layout's conventions.

Why Qwen-Image and not SD3.5 (checked against the vendored ComfyUI 0.30.0): Qwen-Image's joint attention calls every
``attn1_patch`` exactly as Flux's does (``p(q, k, v, pe=pe, attn_mask=..., extra_options=...)``, q and k after
QK-norm and before RoPE, text tokens first, ``img_slice``, ``block_type`` "double" and ``block_index`` in the
options), with Flux's RoPE (``EmbedND``, ``apply_rope1``), so the reference's K/V are captured by the same patch, the
positions option means the same thing and the EAA is the same formula. SD3's ``mmdit.py`` has no attention patch at
all (only ``("double_block", i)`` replacement and the ``optimized_attention_override`` slot), no RoPE (absolute
position embeddings: no positions option), and runs its blocks under gradient checkpointing by default; capture and
EAA would both live in the override, a second mechanism for a family fewer checkpoints use.

What differs from Flux: 60 blocks of one kind (all "double", text and image streams attending jointly), each with its
own image and text output projections applied right after the attention, so there is no ``attn1_output_patch``. The
EAA term is added in ComfyUI's ``optimized_attention_override`` slot instead (``ADDS_TERM``; ``adapter.joint``), which
the attention receives after RoPE: the term is the same softmax(RoPE(q) RoPE(K_ref)ᵀ/√d) V_ref, added to the image
rows of the joint output before ``to_out``. Latents are 5-D ([B, 16, 1, h, w], ``Wan21`` format); the image ids are
centred on the grid (``process_img``); an edit model's reference images sit at frame index 1, 2 ... after the image.

Served by the nodes as Flux is (InvAdapterApply routes it to ``adapter.joint``). Its levels are "double_early" and
"double_late" only (every block is a double block), so the block weights' "double only" preset is every block there.
"""
from __future__ import annotations

import torch

from .flux import FluxLayout
from .layout import ARCHITECTURES, Layout
from .levels import dit_level_of


class QwenImageLayout(FluxLayout):
    SERVES = "Qwen-Image (and Qwen-Image-Edit)"
    FAMILIES = "Qwen-Image (and Qwen-Image-Edit)"
    ADDS_TERM = "attention override"  # no attn1_output_patch in its attention: the override slot (adapter.joint)

    def __init__(self, model, net: torch.nn.Module):
        self.net = net
        found = list(net.transformer_blocks)
        blocks = {f"double.{i}": block for i, block in enumerate(found)}
        call_keys = {("double", i): f"double.{i}" for i in range(len(found))}
        levels = {f"double.{i}": dit_level_of("double", i, len(found)) for i in range(len(found))}
        hidden = int(net.inner_dim)
        facts = self.model_facts(model)
        facts["adm_channels"] = None  # no pooled vector: the timestep alone modulates
        Layout.__init__(self, blocks, call_keys, levels, **facts, dims=dict.fromkeys(blocks, (hidden, hidden)),
                        context_dim=int(net.txt_in.in_features))
        self.heads = int(found[0].attn.heads) if found else 1
        self.head_dim = hidden // self.heads
        self.patch_size = int(net.patch_size)
        self.axes = len(net.pe_embedder.axes_dim)
        self.guidance_embed = False

    @classmethod
    def describes(cls, net: torch.nn.Module) -> bool:
        """Qwen-Image itself (subclasses with other blocks, such as Mage-Flow's, are not described)."""
        from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

        return type(net) is QwenImageTransformer2DModel

    def positions(self, grid_hw: tuple[int, int], index: float = 0.0, device=None) -> torch.Tensor:
        """RoPE of an image-token grid as ``process_img`` builds it: axis 0 the frame ``index`` (0: the generation;
        1: where an edit model puts its first reference image), axes 1 and 2 the row and column centred on the grid
        (row − h // 2, column − w // 2). Returns pe [1, 1, h x w, d / 2, 2, 2] (float32)."""
        h, w = grid_hw
        ids = torch.zeros(h, w, self.axes, device=device, dtype=torch.float32)
        ids[..., 0] = index
        ids[..., 1] = (torch.arange(h, device=device, dtype=torch.float32) - h // 2)[:, None]
        ids[..., 2] = (torch.arange(w, device=device, dtype=torch.float32) - w // 2)[None, :]
        return self.net.pe_embedder(ids.reshape(1, h * w, self.axes))


ARCHITECTURES.append(QwenImageLayout)
