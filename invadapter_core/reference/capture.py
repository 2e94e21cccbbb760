"""The reference branch: one frozen-UNet pass of the reference latent that records every block's attention inputs.

The pass gets fresh transformer_options holding only the capture patches, so no wrapper, no other pack's patch and no
ControlNet reaches it (LoRA is baked into the weights and does apply). The conditioning is the reference's own:
its caption (``c_crossattn``) and, for UNets that take them, the ADM vector ``y`` (SDXL's pooled text and size
conditioning) and ``c_concat`` (inpainting models).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..arch.flux import join_kv
from ..arch.layout import Layout


@dataclass
class Features:
    """Diffusion features of one reference pass: per block name, f_s (self-attn input), f_c (cross-attn input)."""
    self_attn: dict[str, torch.Tensor]
    cross_attn: Optional[dict[str, torch.Tensor]] = None  # None: not captured (the adapter had no cross EAA)

    def tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        found = {("self", k): v for k, v in self.self_attn.items()}
        found.update({("cross", k): v for k, v in (self.cross_attn or {}).items()})
        return found

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class FeatureCapture:
    """attn1_patch / attn2_patch for a reference pass: records the block inputs, changes nothing."""

    def __init__(self, layout: Layout, cross: bool, keep: Optional[set[str]] = None):
        self.layout = layout
        self.keep = keep  # the block names to record (None: every block)
        self.self_attn: dict[str, torch.Tensor] = {}
        self.cross_attn: Optional[dict[str, torch.Tensor]] = {} if cross else None

    def _name(self, extra_options) -> Optional[str]:
        name = self.layout.block_at(extra_options)
        return name if self.keep is None or name in self.keep else None

    def capture_self(self, n, context, value, extra_options):
        name = self._name(extra_options)
        if name is not None:
            self.self_attn[name] = n.detach()
        return n, context, value

    def capture_cross(self, n, context, value, extra_options):
        name = self._name(extra_options)
        if name is not None:
            self.cross_attn[name] = n.detach()
        return n, context, value

    def capture_joint(self, q, k, v, pe=None, attn_mask=None, extra_options=None):
        """An MM-DiT's (Flux's) attn1_patch: the image tokens' K (after QK-norm, before RoPE) and V, kept as one
        [B, N, 2 x width] tensor (``arch.flux.join_kv``; why K/V and not the normed states: ``arch/flux.py``)."""
        name = self._name(extra_options)
        if name is not None:
            start, end = extra_options["img_slice"]
            self.self_attn[name] = join_kv(k[:, :, start:end], v[:, :, start:end]).detach()
        return {}

    def features(self) -> Features:
        return Features(self.self_attn, self.cross_attn)


def batched(conds: dict[str, torch.Tensor], batch: int, device) -> dict[str, torch.Tensor]:
    """Conditioning tensors on ``device`` with the pass's batch (one entry for every sample, or one each)."""
    out = {}
    for key, t in conds.items():
        t = t.to(device)
        if t.shape[0] != batch:
            if t.shape[0] != 1:
                raise ValueError(f"reference conditioning '{key}' has batch {t.shape[0]}, the latent {batch}")
            t = t.expand(batch, *t.shape[1:])
        out[key] = t
    return out


def reference_pass(base_model, x: torch.Tensor, sigma, conds: dict[str, torch.Tensor], layout: Layout,
                   cross: bool, keep: Optional[set[str]] = None, features_only: bool = False
                   ) -> tuple[torch.Tensor, Features]:
    """(x0 prediction, captured features) of ``base_model`` (a loaded BaseModel) at ``sigma`` (a float, or one
    per sample). ``conds`` are apply_model's keyword tensors (c_crossattn, y, c_concat) with batch 1 or x's batch;
    ``keep`` limits which blocks are recorded (``layout.at_levels``). ``features_only``: the caller wants the
    features, not the prediction (which is then meaningless): blocks after the last kept one are skipped where the
    layout can (``Layout.skip_patches``)."""
    capture = FeatureCapture(layout, cross, keep)
    patches = layout.capture_patches(capture, cross)
    options = {"patches": patches}
    if features_only:
        skipped = layout.skip_patches(keep)
        if skipped:
            options["patches_replace"] = skipped
    if torch.is_tensor(sigma) and sigma.numel() > 1:
        sigmas = sigma.to(device=x.device, dtype=torch.float32)
    else:
        sigmas = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=torch.float32)
    with torch.no_grad():
        denoised = base_model.apply_model(x, sigmas, transformer_options=options,
                                          **batched(conds, x.shape[0], x.device))
    return denoised, capture.features()
