"""Unseen identities: does the adapter carry a face it never saw, or pick one of a few memorised ones?

- The base draws every attribute combination (``base.ALL_COMBINATIONS``, 1,280), prompted with the pose only.
- ``split``: a fixed, seeded set of held-out identities the adapter never sees (neither as a reference nor as a
  target), and the training identities it trains on, drawn from the rest.
- The judge (``AttributeJudge``): the attribute classifier (trained on renders of all 1,280 combinations; the same
  recipe and seed as ``classifiers``'): each attribute, all five exactly, and an embedding similarity (cosine of
  its pooled features between the sample and the reference's identity drawn in the sample's pose).
- ``score``: those measures on samples; chance rates in ``CHANCE``.
The recognizer the identity loss trains against is another network on another split (``recognizer.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import classifiers, render, store
from .evaluate import Plan

SPLIT_SEED = 1234  # fixed: every training seed is judged on the same held-out identities
JUDGE_SEED = 10  # classifiers.load_or_train's attribute classifier seed: the same judge
CHANCE = {
    "per_attribute": {name: 1 / n for name, n in render.ATTRIBUTES.items()},
    "identity_accuracy": sum(1 / n for n in render.ATTRIBUTES.values()) / len(render.ATTRIBUTES),
    "exact_identity_rate": 1 / len(render.all_identities()),
}


@dataclass
class Split:
    train: torch.Tensor    # [N] indices into render.all_identities(): the identities the adapter trains on
    heldout: torch.Tensor  # [M] indices it never sees


def split(heldout: int, train: int, seed: int = SPLIT_SEED) -> Split:
    """``heldout`` identities held out, ``train`` training identities from the others (both sorted)."""
    total = len(render.all_identities())
    if heldout < 1 or train < 1 or heldout + train > total:
        raise ValueError(f"held-out {heldout} + training {train} identities: each at least 1, together at most "
                         f"{total}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return Split(order[heldout:heldout + train].sort().values, order[:heldout].sort().values)


def make_plan(identities: torch.Tensor, count: int, poses: int, references: int, seed: int) -> Plan:
    """``count`` references of distinct identities drawn from ``identities`` (seeded), ``poses`` targets each;
    ``references`` > 1: each reference also has that many - 1 more photos (other poses) of its identity."""
    gen = torch.Generator().manual_seed(seed)
    count = min(count, len(identities))
    who = identities[torch.randperm(len(identities), generator=gen)[:count]]
    plan = Plan(who, render.random_poses(count, gen), render.random_poses(count * poses, gen).reshape(count, poses, -1),
                torch.randint(0, 2 ** 31 - 1, (count,), generator=gen))
    more = render.random_poses(count * (references - 1), gen).reshape(count, references - 1, render.POSE_DIM)
    plan.more_reference_poses = more  # drawn last: the plan for 1 and for K references is the same otherwise
    return plan


class AttributeJudge:
    """The attribute classifier as the judge of unseen identities."""

    def __init__(self, classifier: classifiers.Classifier):
        self.classifier = classifier

    @torch.no_grad()
    def tuples(self, images: torch.Tensor) -> torch.Tensor:
        found = []
        for chunk in images.split(256):
            logits = self.classifier(chunk)
            found.append(torch.stack([logits[name].argmax(-1) for name in render.ATTRIBUTES], dim=1))
        return torch.cat(found)

    @torch.no_grad()
    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 128] L2-normalised pooled features."""
        return torch.cat([F.normalize(self.classifier.features(c * 2 - 1).mean(dim=(2, 3)), dim=-1)
                          for c in images.split(256)])


def load_or_train_judge(steps: int = 600, batch: int = 128, log: Callable[[str], None] = print
                        ) -> tuple[AttributeJudge, dict]:
    path = store.cache_path("attributes", steps=steps, batch=batch, seed=JUDGE_SEED)
    # the 16-identity benchmark's judges hold the very same attribute classifier (same recipe and seed)
    shared = store.cache_path("classifiers", ids=16, steps=steps, batch=batch, seed=0)
    info = {"path": str(path if path.exists() or not shared.exists() else shared), "cached": path.exists()}
    heads = dict(render.ATTRIBUTES)
    if not path.exists() and shared.exists():
        tensors, _ = store.load(shared)
        model = classifiers.Classifier(heads)
        model.load_state_dict({k: v.float() for k, v in store.prefixed(tensors, "attributes.").items()})
        info["cached"] = True
        return AttributeJudge(model.eval().requires_grad_(False)), info
    if path.exists():
        tensors, _ = store.load(path)
        model = classifiers.Classifier(heads)
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
        return AttributeJudge(model.eval().requires_grad_(False)), info
    model = classifiers.train_classifier(heads, classifiers.attribute_draw, steps, batch, JUDGE_SEED, log)
    store.save(path, model.state_dict(), {"kind": "attribute judge"})
    return AttributeJudge(model), info


def score(judge: AttributeJudge, base, plan: Plan, images: torch.Tensor, reference_images: torch.Tensor) -> dict:
    """Judged against the reference's identity: identity_accuracy is the mean per-attribute accuracy (chance
    ``CHANCE``), exact_identity_rate all five right; embedding_similarity the judge's cosine between the sample and
    the reference identity drawn in the sample's pose, beside the same with another identity of the plan in that
    pose (embedding_similarity_other: what a sample unrelated to the reference scores); anti_copy as in
    ``evaluate.Evaluation.score``."""
    k = plan.target_pose.shape[1]
    who = plan.identity.repeat_interleave(k)
    truth = base.identities[who]
    poses = plan.target_pose.reshape(-1, render.POSE_DIM)
    right = judge.tuples(images) == truth  # [B, 5]
    in_pose = base.render(who, poses)
    other = base.render(plan.identity.roll(1).repeat_interleave(k), poses)
    e = judge.embedding(images)
    mse = lambda a, b: ((a - b) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    reference = reference_images.repeat_interleave(k, dim=0)
    r = lambda x: round(float(x), 4)  # noqa: E731
    return {
        "identity_accuracy": r(right.float().mean()),
        "exact_identity_rate": r(right.all(-1).float().mean()),
        "per_attribute": {name: r(right[:, i].float().mean()) for i, name in enumerate(render.ATTRIBUTES)},
        "embedding_similarity": r((e * judge.embedding(in_pose)).sum(-1).mean()),
        "embedding_similarity_other": r((e * judge.embedding(other)).sum(-1).mean()),
        "anti_copy": r((mse(images, in_pose) < mse(images, reference)).float().mean()),
    }
