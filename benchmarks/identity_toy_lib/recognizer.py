"""The identity loss's recognizer in the toy: the stand-in for ArcFace, never the judge.

It differs from the judges in architecture and data: four 5x5 convs with ReLU and max-pooling, no normalisation,
global max-pooling (the judges: six 3x3 strided convs with GroupNorm, SiLU and average pooling), a 64-d embedding trained as a cosine
classifier with an additive margin (CosFace, as face recognizers are trained) over the **training identities only**
(the judge's attribute classifier sees all 1,280 combinations with attribute labels; the recognizer never sees a
held-out identity nor an attribute label), its own seed. Noise-augmented like the judges, and also on blurred
renders: the denoised prediction at high noise is a blur.

``Recognizer.latent_embedding`` is what the trainer calls (``step.identity_loss``): a clean latent in sampler space
-> the toy's pixel "VAE" decode (pixel_shuffle, differentiable) -> embedding.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import render, store

SEED = 77


class Recognizer(nn.Module):
    def __init__(self, classes: int, width: int = 24, dim: int = 64):
        super().__init__()
        c = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(c[i], c[i + 1], 5, padding=2), nn.ReLU()]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.embed = nn.Linear(c[-1], dim)
        self.classes = nn.Parameter(torch.randn(classes, dim) / dim ** 0.5)  # class centres (training only)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, 32, 32] in 0..1 -> L2-normalised embeddings [B, dim]."""
        f = self.features(images - 0.5).amax(dim=(2, 3))
        return F.normalize(self.embed(f), dim=-1)

    def latent_embedding(self, latent: torch.Tensor) -> torch.Tensor:
        """A clean latent in sampler space (the toy's process_latent_in is the identity) -> embedding; the decode is
        the toy VAE's, without its clamp (a clamp would cut the gradient where the prediction overshoots)."""
        return self(((F.pixel_shuffle(latent.float(), 2) + 1) / 2))


def train(identities: torch.Tensor, steps: int, batch: int = 128, log: Callable[[str], None] = print,
          seed: int = SEED) -> Recognizer:
    """CosFace (scale 16, margin 0.2) over ``identities`` [N, 5]; renders noised (sigma ~ U(0, 0.3)) and, for half
    of them, blurred."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Recognizer(len(identities))
    gen = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    started = time.time()
    for step in range(steps):
        who = torch.randint(0, len(identities), (batch,), generator=gen)
        images = render.render(identities[who], render.random_poses(batch, gen))
        blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        images = torch.where(torch.rand(batch, 1, 1, 1, generator=gen) < 0.5, blurred, images)
        images = images + torch.rand(batch, 1, 1, 1, generator=gen) * 0.3 * torch.randn(images.shape, generator=gen)
        cos = model(images) @ F.normalize(model.classes, dim=-1).t()
        logits = 16 * (cos - 0.2 * F.one_hot(who, len(identities)))
        loss = F.cross_entropy(logits, who)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            log(f"recognizer step {step + 1}/{steps}: loss {float(loss.detach()):.4f}, {time.time() - started:.0f} s")
    return model.eval().requires_grad_(False)


def load_or_train(identities: torch.Tensor, tag: str, steps: int = 600, log: Callable[[str], None] = print
                  ) -> tuple[Recognizer, dict]:
    """Cached by the training identities' ``tag`` and the steps."""
    path = store.cache_path("recognizer", ids=tag, steps=steps, seed=SEED)
    info = {"path": str(path), "cached": path.exists()}
    if path.exists():
        tensors, _ = store.load(path)
        model = Recognizer(len(identities))
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
        return model.eval().requires_grad_(False), info
    started = time.time()
    model = train(identities, steps, log=log)
    info["seconds"] = round(time.time() - started, 1)
    store.save(path, model.state_dict(), {"kind": "identity-loss recognizer"})
    return model, info
