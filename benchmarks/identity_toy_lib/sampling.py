"""Sampling the toy through ComfyUI's own sampler (what KSampler runs), with seeded, repeatable noise."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.sample

from .base import latent_to_images


@dataclass
class SamplerSettings:
    steps: int = 50
    sampler: str = "euler_ancestral"  # stochastic DDIM (eta = 1): ancestral sampling in sigma space
    scheduler: str = "normal"
    cfg: float = 1.0


def generate(model, context: torch.Tensor, empty: torch.Tensor, seed: int, settings: SamplerSettings
             ) -> torch.Tensor:
    """Images [B, 3, 32, 32] for contexts [B, 2, 32]; the same seed and batch size give the same noise (initial
    and ancestral) whatever ``model`` carries."""
    b = context.shape[0]
    latent = torch.zeros(b, 12, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, settings.steps, settings.cfg, settings.sampler, settings.scheduler,
                                  [[context, {}]], [[empty.expand(b, -1, -1), {}]], latent, denoise=1.0,
                                  disable_pbar=True, seed=seed)
    return latent_to_images(samples)
