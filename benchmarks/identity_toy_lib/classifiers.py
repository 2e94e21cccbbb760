"""Judges of the toy's samples: an identity classifier (which of the known identities) and an attribute classifier
(each of the five attributes, trained on all 1,280 combinations, so "exactly a known identity" can be checked).

Both are a 6-conv CNN (width 32, 0.29 M parameters) trained on renders in random poses with pixel noise
sigma ~ U(0, 0.25): without the noise augmentation they collapse on generated samples, which are never quite clean.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import render, store


class Classifier(nn.Module):
    """Six 3x3 convs (stride 2 at the 2nd, 4th and 6th), GroupNorm + SiLU, global average pool, one linear head
    per output; images [B, 3, 32, 32] in 0..1 -> {head: logits}."""

    def __init__(self, heads: dict[str, int], width: int = 32):
        super().__init__()
        channels = [3, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
        layers = []
        for i in range(6):
            layers += [nn.Conv2d(channels[i], channels[i + 1], 3, stride=2 if i % 2 else 1, padding=1),
                       nn.GroupNorm(8, channels[i + 1]), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(channels[-1], n) for name, n in heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images * 2 - 1).mean(dim=(2, 3))
        return {name: head(f) for name, head in self.heads.items()}


def train_classifier(heads: dict[str, int], draw: Callable[[int, torch.Generator], tuple], steps: int,
                     batch: int, seed: int, log: Callable[[str], None]) -> Classifier:
    """``draw(batch, generator)`` -> (images, {head: labels}); noise-augmented, AdamW with a cosine decay."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(heads)
    gen = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    started = time.time()
    for step in range(steps):
        images, labels = draw(batch, gen)
        noise = torch.rand(batch, 1, 1, 1, generator=gen) * 0.25
        images = images + noise * torch.randn(images.shape, generator=gen)
        logits = model(images)
        loss = sum(F.cross_entropy(logits[name], labels[name]) for name in heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            log(f"classifier {'/'.join(heads)} step {step + 1}/{steps}: loss {float(loss):.4f}, "
                f"{time.time() - started:.0f} s")
    return model.eval().requires_grad_(False)


def identity_draw(identities: torch.Tensor):
    def draw(batch, gen):
        who = torch.randint(0, len(identities), (batch,), generator=gen)
        return render.render(identities[who], render.random_poses(batch, gen)), {"identity": who}
    return draw


def attribute_draw(batch, gen):
    combos = render.all_identities()
    tuples = combos[torch.randint(0, len(combos), (batch,), generator=gen)]
    labels = {name: tuples[:, i] for i, name in enumerate(render.ATTRIBUTES)}
    return render.render(tuples, render.random_poses(batch, gen)), labels


class Judges:
    """Both classifiers, and what the benchmark measures with them."""

    def __init__(self, identity: Classifier, attributes: Classifier, identities: torch.Tensor):
        self.identity, self.attributes, self.identities = identity, attributes, identities

    @torch.no_grad()
    def identity_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.identity(chunk)["identity"].softmax(-1) for chunk in images.split(256)])

    @torch.no_grad()
    def attribute_tuples(self, images: torch.Tensor) -> torch.Tensor:
        found = []
        for chunk in images.split(256):
            logits = self.attributes(chunk)
            found.append(torch.stack([logits[name].argmax(-1) for name in render.ATTRIBUTES], dim=1))
        return torch.cat(found)

    def known_identity(self, images: torch.Tensor) -> torch.Tensor:
        """[B] index of the known identity whose exact attribute tuple the image shows, -1 for none."""
        tuples = self.attribute_tuples(images)
        match = (tuples[:, None, :] == self.identities[None]).all(-1)
        return torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(match[:, 0], -1, dtype=torch.long))


def load_or_train(identities: torch.Tensor, steps: int = 600, batch: int = 128, seed: int = 0,
                  log: Callable[[str], None] = print) -> tuple[Judges, dict]:
    path = store.cache_path("classifiers", ids=len(identities), steps=steps, batch=batch, seed=seed)
    identity_heads, attribute_heads = {"identity": len(identities)}, dict(render.ATTRIBUTES)
    info = {"path": str(path), "cached": path.exists(), "seconds": 0.0}
    if path.exists():
        tensors, _ = store.load(path)
        return from_tensors(tensors, identities), info
    started = time.time()
    identity = train_classifier(identity_heads, identity_draw(identities), steps, batch, seed, log)
    attributes = train_classifier(attribute_heads, attribute_draw, steps, batch, seed + 10, log)
    info["seconds"] = round(time.time() - started, 1)
    judges = Judges(identity, attributes, identities)
    store.save(path, to_tensors(judges), {"seconds": str(info["seconds"])})
    return judges, info


def to_tensors(judges: Judges) -> dict[str, torch.Tensor]:
    """Both classifiers as one file's tensors, under "identity." and "attributes."."""
    return {**{f"identity.{k}": v for k, v in judges.identity.state_dict().items()},
            **{f"attributes.{k}": v for k, v in judges.attributes.state_dict().items()}}


def from_tensors(tensors: dict[str, torch.Tensor], identities: torch.Tensor) -> Judges:
    """``to_tensors`` undone (float32 whatever the file's dtype)."""
    identity, attributes = Classifier({"identity": len(identities)}), Classifier(dict(render.ATTRIBUTES))
    identity.load_state_dict({k: v.float() for k, v in store.prefixed(tensors, "identity.").items()})
    attributes.load_state_dict({k: v.float() for k, v in store.prefixed(tensors, "attributes.").items()})
    return Judges(identity.eval().requires_grad_(False), attributes.eval().requires_grad_(False), identities)
