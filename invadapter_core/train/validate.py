"""Validation images: a few references sampled with the adapter through ComfyUI's own sampler, saved as PNGs.

The adapter is installed exactly as InvAdapterApply installs it (``adapter.application.install``), with a Reference
built from the sample's inversion trajectory, so these images show what a user of the current weights would get. The
baseline (no adapter) is sampled once, at the first validation; the adapter's images from the first validation
after step 0 on (at step 0 they would only show the initialisation).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..adapter.application import Application, install
from ..reference.reference import Reference
from ..arch.layout import layout_of, model_family
from .config import ValidationConfig
from .data import TrainingSample

log = logging.getLogger("InvAdapter.train")


def save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = (image.clamp(0, 1).cpu().float().numpy() * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(arr).save(path)


def reference_from_sample(sample: TrainingSample, family: str, resolution: int) -> Reference:
    conds = {"c_crossattn": sample.reference_context[None].contiguous()}
    if sample.reference_adm is not None:
        conds["y"] = sample.reference_adm[None].contiguous()
    return Reference(family=family, resolution=(resolution, resolution), sigmas=sample.reference_sigmas.double(),
                     states=sample.reference_states[:, None].contiguous(), conds=conds)


def prompt_options(pooled: Optional[torch.Tensor]) -> dict:
    """A CONDITIONING entry's options: the pooled output ComfyUI builds an SDXL UNet's ADM vector from."""
    return {} if pooled is None else {"pooled_output": pooled.reshape(1, -1)}


class Validator:
    def __init__(self, cfg: ValidationConfig, model, vae, source, resolution: int, empty_context, out_dir: Path,
                 prompt_contexts: Optional[list[tuple[torch.Tensor, dict]]] = None):
        self.cfg, self.model, self.vae, self.resolution = cfg, model, vae, resolution
        self.out = out_dir
        self.samples = [s for _, s in zip(range(cfg.images), source)] if vae is not None else []
        self.empty_context = empty_context
        self.empty_options = prompt_options(getattr(source, "empty_pooled", None))
        self.prompts = prompt_contexts  # None: each sample's own prompt; else (context [1, T, D], options)
        self.baseline_done = False
        self.references: dict = {}

    def due(self, step: int, max_steps: int) -> bool:
        return self.cfg.every > 0 and (step % self.cfg.every == 0 or step == max_steps)

    @torch.no_grad()
    def run(self, adapter, step: int) -> list[Path]:
        import comfy.model_management

        want_baseline = self.cfg.baseline and not self.baseline_done
        if not self.samples or (step == 0 and not want_baseline):
            return []
        self.out.mkdir(parents=True, exist_ok=True)
        family = model_family(self.model)
        written = []
        jobs = [(i, p, c) for i, sample in enumerate(self.samples) for p, c in enumerate(self.prompts or [None])]
        total = len(jobs) * (int(want_baseline) + int(step > 0))
        started = time.time()
        for i, p, context in jobs:
            sample = self.samples[i]
            ref = self.references.setdefault(i, reference_from_sample(sample, family, self.resolution))
            if not (self.out / f"reference-{i}.png").exists():
                save_png(self.vae.decode(self.model.model.process_latent_out(ref.states[0]))[0],
                         self.out / f"reference-{i}.png")
            context = (sample.context[None], prompt_options(sample.pooled)) if context is None else context
            runs = ([("baseline", self.model, f"baseline-ref{i}-p{p}.png")] if want_baseline else []) + \
                ([("adapter", None, f"step-{step:08d}-ref{i}-p{p}.png")] if step > 0 else [])
            for what, model, name in runs:
                if model is None:
                    model = install(self.model, Application(adapter, ref, self.model, 1.0, 1.0))
                written.append(self._sample(model, context, sample.target.shape, self.out / name))
                print(f"validation at step {step}: image {len(written)}/{total} ({what}, reference {i}, prompt {p}), "
                      f"{time.time() - started:.1f} s", flush=True)
        self.baseline_done = True
        comfy.model_management.load_models_gpu([self.model], force_full_load=True)  # back for training
        return written

    def _sample(self, model, prompt: tuple[torch.Tensor, dict], latent_shape, path: Path) -> Path:
        import comfy.sample

        context, options = prompt
        channels, h, w = latent_shape
        if self.cfg.size:
            h = w = layout_of(self.model).latent_side(self.cfg.size)
        latent = torch.zeros(1, channels, h, w)
        noise = comfy.sample.prepare_noise(latent, self.cfg.seed)
        negative = self.empty_context.reshape(context.shape) if self.empty_context is not None \
            else torch.zeros_like(context)
        size = {"width": w * layout_of(self.model).downscale, "height": h * layout_of(self.model).downscale}
        samples = comfy.sample.sample(model, noise, self.cfg.steps, self.cfg.cfg, self.cfg.sampler,
                                      self.cfg.scheduler, [[context, dict(options, **size)]],
                                      [[negative, dict(self.empty_options, **size)]], latent, denoise=1.0,
                                      disable_pbar=True, seed=self.cfg.seed)
        save_png(self.vae.decode(samples)[0], path)
        return path
