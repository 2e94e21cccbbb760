"""Validation images: a few references sampled with the adapter through ComfyUI's own sampler, saved as PNGs.

The adapter is installed exactly as InvAdapterApply installs it (``comfy_model.install``), with a Reference built
from the cached inversion trajectory, so these images show what a user of the current weights would get.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..comfy_model import Application, install
from ..reference import Reference
from .config import ValidationConfig
from .data import ShardSet

log = logging.getLogger("InvAdapter.train")


def save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = (image.clamp(0, 1).cpu().float().numpy() * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(arr).save(path)


def reference_from_sample(shards: ShardSet, index: int, family: str) -> Reference:
    sample = shards[index]
    resolution = shards.layout["resolution"]
    return Reference(family=family, resolution=(resolution, resolution), sigmas=shards.sigmas.clone(),
                     states=sample.states[:, None].contiguous(), conds={"c_crossattn": sample.context[None].contiguous()})


class Validator:
    def __init__(self, cfg: ValidationConfig, model, vae, shards: ShardSet, out_dir: Path,
                 prompt_contexts: Optional[list[torch.Tensor]] = None):
        self.cfg, self.model, self.vae, self.shards = cfg, model, vae, shards
        self.out = out_dir
        self.indices = list(range(min(cfg.images, len(shards))))
        self.prompts = prompt_contexts  # None: each reference's own caption
        self.baseline_done = False
        self.references: dict = {}

    def due(self, step: int, max_steps: int) -> bool:
        return self.cfg.every > 0 and (step % self.cfg.every == 0 or step == max_steps)

    @torch.no_grad()
    def run(self, adapter, step: int) -> list[Path]:
        import comfy.model_management

        if self.vae is None:
            return []
        self.out.mkdir(parents=True, exist_ok=True)
        family = adapter.family
        written = []
        for i in self.indices:
            ref = self.references.setdefault(i, reference_from_sample(self.shards, i, family))
            if not (self.out / f"reference-{i}.png").exists():
                save_png(self.vae.decode(self.model.model.process_latent_out(ref.states[0]))[0],
                         self.out / f"reference-{i}.png")
            contexts = self.prompts or [ref.context]
            for p, context in enumerate(contexts):
                if self.cfg.baseline and not self.baseline_done:
                    written.append(self._sample(self.model, context, self.out / f"baseline-ref{i}-p{p}.png"))
                # a fresh Application every time: its cast copies of the adapter must not outlive these weights
                app = Application(adapter, ref, self.model, 1.0, 1.0)
                written.append(self._sample(install(self.model, app), context,
                                            self.out / f"step-{step:08d}-ref{i}-p{p}.png"))
        self.baseline_done = True
        comfy.model_management.load_models_gpu([self.model], force_full_load=True)  # back for training
        return written

    def _sample(self, model, context: torch.Tensor, path: Path) -> Path:
        import comfy.sample

        size = self.cfg.size or self.shards.layout["resolution"]
        latent = torch.zeros(1, 4, size // 8, size // 8)
        noise = comfy.sample.prepare_noise(latent, self.cfg.seed)
        negative = self.shards.empty_context[None]
        samples = comfy.sample.sample(model, noise, self.cfg.steps, self.cfg.cfg, self.cfg.sampler,
                                      self.cfg.scheduler, [[context, {}]], [[negative, {}]], latent, denoise=1.0,
                                      disable_pbar=True, seed=self.cfg.seed)
        save_png(self.vae.decode(samples)[0], path)
        return path
