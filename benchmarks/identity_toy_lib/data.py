"""The toy's training data, as a data source of the pack's trainer (``invadapter_core.train.data.TrainingSample``).

A reference pool: ``per_identity`` renders of each identity in random poses, inverted once with the pack's own
inversion (``invadapter_core.reference.encode.invert_latent``, the encode node's code) under their own pose as the caption.
Sample i (a pure function of the seed and i, so the trainer's epoch order and resume are exact): an identity, a
fresh render of it in a random target pose as the target, and a pool reference of the same identity, which is in
another pose than the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from invadapter_core.reference.encode import invert_latent
from invadapter_core.train.data import TrainingSample

from . import render, store
from .base import ToyBase, images_to_latent


@dataclass
class ReferencePool:
    identity: torch.Tensor  # [P]
    pose: torch.Tensor      # [P, 11]
    context: torch.Tensor   # [P, 2, 32] each reference's own pose as its caption
    sigmas: torch.Tensor    # [n+1]
    states: torch.Tensor    # [P, n+1, 12, 16, 16] inversion trajectories in sampler space

    def of_identity(self, who: int) -> torch.Tensor:
        return (self.identity == who).nonzero().flatten()


def load_or_build_pool(base: ToyBase, base_name: str, per_identity: int, steps: int, scheduler: str, sampler: str,
                       convention: str, seed: int) -> tuple[ReferencePool, bool]:
    """The pool for this base and these settings from the cache, or built (then cached); and whether it was cached."""
    path = store.cache_path(f"pool-{base_name}", per=per_identity, steps=steps, sched=scheduler, sampler=sampler,
                            inv=convention.replace(" ", "_"), seed=seed)
    if path.exists():
        tensors, _ = store.load(path)
        return ReferencePool(**tensors), True
    pool = build_pool(base, per_identity, steps, scheduler, sampler, convention, seed)
    store.save(path, dict(vars(pool)), {"base": base_name})
    return pool, False


@torch.no_grad()
def build_pool(base: ToyBase, per_identity: int, steps: int, scheduler: str, sampler: str, convention: str,
               seed: int, batch: int = 64) -> ReferencePool:
    gen = torch.Generator().manual_seed(seed)
    who = torch.arange(len(base.identities)).repeat_interleave(per_identity)
    pose = render.random_poses(len(who), gen)
    context = base.context(pose)
    states, sigmas = [], None
    for start in range(0, len(who), batch):
        part = slice(start, start + batch)
        latent = images_to_latent(base.render(who[part], pose[part]))
        ref = invert_latent(base.model, latent, context[part], steps, scheduler, (render.SIZE, render.SIZE),
                            keep_features=False, convention=convention, sampler_name=sampler)
        states.append(ref.states.movedim(1, 0))
        sigmas = ref.sigmas
    return ReferencePool(who, pose, context, sigmas, torch.cat(states))


class ToySamples:
    """Map-style data source: ``size`` samples, sample i drawn from ``seed`` and i. ``other_identity``: the
    reference shows another identity than the target (a control: an adapter that reads identity from the reference
    does worse there than with the right one)."""

    def __init__(self, base: ToyBase, pool: ReferencePool, size: int, seed: int, other_identity: bool = False):
        self.base, self.pool, self.size, self.seed = base, pool, size, seed
        self.other_identity = other_identity
        self.empty_context = base.empty_context(1)[0]  # [2, 32]: the null pose token
        self.by_identity = [pool.of_identity(i) for i in range(len(base.identities))]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> TrainingSample:
        if not 0 <= i < self.size:
            raise IndexError(i)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        n = len(self.by_identity)
        who = int(torch.randint(0, n, (1,), generator=gen))
        shown = who
        if self.other_identity:  # its own generator: the target, its pose and the reference's index stay the same
            other = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 500_009)
            shown = (who + int(torch.randint(1, n, (1,), generator=other))) % n
        choices = self.by_identity[shown]
        r = int(choices[torch.randint(0, len(choices), (1,), generator=gen)])
        pose = render.random_poses(1, gen)
        target = self.base.model.model.process_latent_in(images_to_latent(self.base.render(torch.tensor([who]), pose)))
        return TrainingSample(target[0], self.base.context(pose)[0], self.pool.sigmas, self.pool.states[r],
                              self.pool.context[r], caption=f"identity {who}")
