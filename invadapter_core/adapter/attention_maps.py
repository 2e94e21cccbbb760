"""Where the generation attends in the reference (the paper's attention-map figures), recorded during sampling.

For every recorded self-attention EAA call: the attention distribution over reference tokens averaged over heads
and generated tokens (each map sums to one), and how strongly each generated token took the reference in
(the norm of its EAA term).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

RECORDER_KEY = "invadapter_attention_recorder"


def attention_over_reference(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """mean over heads and queries of softmax(q k^T / sqrt(d)): [B, Nk], each row sums to one."""
    b, nq, inner = q.shape
    d = inner // heads
    k = k.expand(b, -1, -1)
    total = torch.zeros(b, k.shape[1], dtype=torch.float32, device=q.device)
    for h in range(heads):  # one head at a time: [B, Nq, Nk] is the largest tensor held
        qh, kh = q[..., h * d:(h + 1) * d].float(), k[..., h * d:(h + 1) * d].float()
        total += torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1).mean(dim=1)
    return total / heads


@dataclass
class AttentionRecorder:
    levels: Optional[set[str]] = None  # None: every level
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    reference: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # application key -> [B, Nk] maps
    output: dict[str, list[torch.Tensor]] = field(default_factory=dict)     # application key -> [B, h, w] maps

    def wants(self, level: str, sigma: float) -> bool:
        return (self.levels is None or level in self.levels) and self.sigma_end <= sigma <= self.sigma_start

    def record(self, key: str, q: torch.Tensor, k: torch.Tensor, heads: int, delta: torch.Tensor,
               grid: tuple[int, int], cond_or_uncond: list[int]) -> None:
        """Keeps the positive prompt's rows: one map per generated image."""
        if 0 not in cond_or_uncond:
            return
        per_chunk = q.shape[0] // len(cond_or_uncond)
        rows = slice(cond_or_uncond.index(0) * per_chunk, (cond_or_uncond.index(0) + 1) * per_chunk)
        q, delta = q[rows], delta[rows]
        k = k[rows] if k.shape[0] > 1 else k
        self.reference.setdefault(key, []).append(attention_over_reference(q, k, heads).cpu())
        strength = delta.float().norm(dim=-1).reshape(delta.shape[0], *grid)
        self.output.setdefault(key, []).append(strength.cpu())


def reference_maps(maps: list[torch.Tensor], images: int, latent_hw: tuple[int, int], out_hw: tuple[int, int]
                   ) -> torch.Tensor:
    """Average recorded [B, Nk] maps of several blocks on the reference's pixel grid: [B, H, images * W], each
    summing to one. Nk is ``images`` token grids of the reference latent downscaled by the block's factor (with
    averaged features, one grid)."""
    total = None
    for m in maps:
        b, nk = m.shape
        per_image = images if nk % images == 0 and _grid(nk // images, latent_hw) else 1
        gh, gw = _grid(nk // per_image, latent_hw)
        grid = m.reshape(b * per_image, 1, gh, gw)
        up = F.interpolate(grid, size=out_hw, mode="bilinear", align_corners=False).reshape(b, per_image, *out_hw)
        up = torch.cat(list(up.unbind(1)), dim=-1)  # images side by side
        if up.shape[-1] != images * out_hw[1]:  # averaged features: one map, shown under every image
            up = up.repeat(1, 1, images)
        total = up if total is None else total + up
    total = total.clamp_min(0)
    return total / total.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def output_maps(maps: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
    """Average [B, h, w] EAA strengths of several blocks on the output's pixel grid, scaled to 0..1."""
    total = sum(F.interpolate(m[:, None], size=out_hw, mode="bilinear", align_corners=False)[:, 0] for m in maps)
    return total / total.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def _grid(tokens: int, latent_hw: tuple[int, int]) -> Optional[tuple[int, int]]:
    """The token grid of a latent of ``latent_hw`` after the UNet's downsamplings (ceil at each halving)."""
    h, w = latent_hw
    while h * w > tokens and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    return (h, w) if h * w == tokens else None


def heat_overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """IMAGE [B, H, W, 3] blended with a blue-to-red colouring of ``heat`` [B, H, W] in 0..1."""
    h = (heat / heat.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)).clamp(0, 1)
    colour = torch.stack([(2 * h - 1).clamp_min(0), 1 - (2 * h - 1).abs(), (1 - 2 * h).clamp_min(0)], -1)
    img = F.interpolate(image.movedim(-1, 1), size=heat.shape[-2:], mode="bilinear", align_corners=False).movedim(1, -1)
    a = alpha * h[..., None] ** 0.5
    return (img[..., :3] * (1 - a) + colour * a).clamp(0, 1)
