"""The toy's training data, as a data source of the pack's trainer (``invadapter_core.train.data.TrainingSample``).

A reference pool: ``per_identity`` renders of each identity in random poses, inverted once with the pack's own
inversion (``invadapter_core.reference.encode.invert_latent``, the encode node's code) under their own pose as the caption.
Sample i (a pure function of the seed and i, so the trainer's epoch order and resume are exact): an identity, a
fresh render of it in a random target pose as the target, and a pool reference of the same identity, which is in
another pose than the target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from invadapter_core.reference.encode import invert_latent
from invadapter_core.train.data import ReferenceView, TrainingSample

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
                       convention: str, seed: int, identities: Optional[torch.Tensor] = None, tag: str = ""
                       ) -> tuple[ReferencePool, bool]:
    """The pool for this base and these settings from the cache, or built (then cached); and whether it was cached.
    ``identities``: only these (indices into ``base.identities``; default all), named in the cache by ``tag``."""
    extra = {"ids": tag} if tag else {}
    path = store.cache_path(f"pool-{base_name}", per=per_identity, steps=steps, sched=scheduler, sampler=sampler,
                            inv=convention.replace(" ", "_"), seed=seed, **extra)
    if path.exists():
        tensors, _ = store.load(path)
        return ReferencePool(**tensors), True
    pool = build_pool(base, per_identity, steps, scheduler, sampler, convention, seed, identities=identities)
    store.save(path, dict(vars(pool)), {"base": base_name})
    return pool, False


@torch.no_grad()
def build_pool(base: ToyBase, per_identity: int, steps: int, scheduler: str, sampler: str, convention: str,
               seed: int, batch: int = 64, identities: Optional[torch.Tensor] = None) -> ReferencePool:
    gen = torch.Generator().manual_seed(seed)
    identities = torch.arange(len(base.identities)) if identities is None else identities
    who = identities.repeat_interleave(per_identity)
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
    """Map-style data source: ``size`` samples, sample i drawn from ``seed`` and i, of the pool's identities (all
    16, or a training subset of the 1,280 combinations). ``other_identity``: the reference shows another identity
    than the target (a control: an adapter that reads identity from the reference does worse there than with the
    right one). ``references`` > 1: K different pool references of the identity (``more_references``: MFF)."""

    def __init__(self, base: ToyBase, pool: ReferencePool, size: int, seed: int, other_identity: bool = False,
                 references: int = 1):
        self.base, self.pool, self.size, self.seed = base, pool, size, seed
        self.other_identity, self.references = other_identity, references
        self.empty_context = base.empty_context(1)[0]  # [2, 32]: the null pose token
        self.identities = pool.identity.unique()  # sorted: for the 16-identity pool, 0..15 as before
        self.by_identity = [pool.of_identity(int(i)) for i in self.identities]
        fewest = min(len(c) for c in self.by_identity)
        if references > fewest:
            raise ValueError(f"{references} references per target, but the pool has {fewest} per identity: "
                             f"raise --pool to at least {references}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> TrainingSample:
        if not 0 <= i < self.size:
            raise IndexError(i)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        n = len(self.by_identity)
        at = int(torch.randint(0, n, (1,), generator=gen))  # position in self.identities
        shown = at
        if self.other_identity:  # its own generator: the target, its pose and the reference's index stay the same
            other = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 500_009)
            shown = (at + int(torch.randint(1, n, (1,), generator=other))) % n
        choices = self.by_identity[shown]
        r = int(choices[torch.randint(0, len(choices), (1,), generator=gen)])
        pose = render.random_poses(1, gen)
        who = int(self.identities[at])
        target = self.base.model.model.process_latent_in(images_to_latent(self.base.render(torch.tensor([who]), pose)))
        more = ()
        if self.references > 1:  # its own generator: sample i is the same with 1 or K references otherwise
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 900_007)
            rest = choices[choices != r]
            picked = rest[torch.randperm(len(rest), generator=g)[:self.references - 1]].tolist()
            more = tuple(ReferenceView(self.pool.states[j], self.pool.context[j]) for j in picked)
        return TrainingSample(target[0], self.base.context(pose)[0], self.pool.sigmas, self.pool.states[r],
                              self.pool.context[r], caption=f"identity {who}", more_references=more)
