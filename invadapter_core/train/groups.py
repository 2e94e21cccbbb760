"""Identity groups in the shards: which photos of the person serve as a target's references, and which people are
held out.

A manifest line's ``"identity"`` (kept in the shards by ``preprocess``) names the person in the photo. With such
groups a target's reference is, by default, **another photo of the same person** (``data.reference = "other"``,
what ``"auto"`` picks): the adapter then has to carry the face across pose, light and expression, as it must for a
user's photo, instead of copying the target's pixels back. ``train.references`` = K > 1 adds K - 1 further photos
of that person (``TrainingSample.more_references``: MFF). ``"self"`` keeps the paper's setting (the target is its
own first reference) and still takes the K - 1 further photos from the group.

Each draw's photos come from a generator seeded by (``train.seed``, draw id), as its noise does (``step.draw``): a
resumed run draws the same photos, and N processes draw what one process with N x the batch would.

Small identities: a target is trained only when its person has enough distinct photos: K + 1 with "other" (the
target and K others), K with "self"; the other targets are skipped and counted in one log line. Images without an
identity count as a person of one photo. Held out (``validation.holdout``): whole people, the last ones by name with
enough photos (named people before nameless images), until at least that many images are out, so the held-out loss
is measured on people the adapter never trained on.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .config import Config
from .data import EMPTY_PROMPT, DataError, ShardSet, TrainingSample

log = logging.getLogger("InvAdapter.train")
REFERENCE_MODES = ("auto", "self", "other")
MANIFEST_HINT = "give the manifest's lines an \"identity\" (docs/training.md, Data) and preprocess again"


def check_grouping(shards: ShardSet, cfg: Config) -> None:
    """Refuses, in one line naming the key and the fix, settings that need photos grouped by person on shards
    without identities."""
    if shards.grouped:
        return
    k, where = cfg.train.references, cfg.data.cache_dir
    if k > 1:
        raise DataError(f"train.references = {k} needs several photos per person, and the shards in {where} name no "
                        f"identities: {MANIFEST_HINT}, or set train.references = 1")
    if cfg.data.reference == "other":
        raise DataError(f"data.reference = \"other\" needs several photos per person, and the shards in {where} name "
                        f"no identities: {MANIFEST_HINT}, or set data.reference = \"auto\"")


def reference_mode(cfg: Config, grouped: bool) -> str:
    if cfg.data.reference not in REFERENCE_MODES:
        raise DataError(f"data.reference = {cfg.data.reference!r}: must be one of {', '.join(REFERENCE_MODES)}")
    if cfg.data.reference == "auto":
        return "other" if grouped else "self"
    return cfg.data.reference


AUTO_REFERENCES = 2  # train.references = 0 (auto): MFF with two photos, IDAdapter's setting the toy measured
AUTO_KEEP = 0.9  # ... when it keeps at least this share of the targets one photo would train


def auto_references(shards: ShardSet, cfg: Config) -> tuple[int, str]:
    """train.references = 0: (K, why). K = 2 when the shards name people and at least 90 % of the targets K = 1
    trains have a further photo of their person (a person needs K + 1 photos with "other", K with "self"), else 1:
    MFF should not cost a dataset of pairs most of its targets."""
    if not shards.grouped:
        return 1, "the shards name no people"
    mode = reference_mode(cfg, True)
    sizes: dict[tuple, int] = {}
    for i in range(len(shards)):
        sizes[person(shards, i)] = sizes.get(person(shards, i), 0) + 1

    def targets(k: int) -> int:
        return sum(n for n in sizes.values() if n >= k + (mode == "other"))

    one, more = targets(1), targets(AUTO_REFERENCES)
    enough = more >= AUTO_KEEP * one
    why = (f"{more} of {one} targets keep enough photos of their person with K = {AUTO_REFERENCES} "
           f"({'at least' if enough else 'below'} {AUTO_KEEP:.0%})")
    return (AUTO_REFERENCES, why) if enough else (1, why + f"; set train.references = {AUTO_REFERENCES} to train "
                                                         f"those {more} alone")


def person(shards: ShardSet, i: int) -> tuple:
    """The group key of image i: its identity, or the image alone when it names none."""
    identity = shards.identities[i]
    return ("identity", identity) if identity is not None else ("image", i)


class IdentitySource:
    """The shard images ``indices`` (the training part, or the held-out part) as a map-style data source: target i
    with its reference(s) drawn from the photos of its person within the same part."""

    def __init__(self, shards: ShardSet, indices, mode: str, references: int):
        self.shards, self.mode, self.k = shards, mode, references
        for name in EMPTY_PROMPT:
            setattr(self, name, getattr(shards, name, None))
        self.members: dict[tuple, list[int]] = {}
        for i in indices:
            self.members.setdefault(person(shards, i), []).append(i)
        self.needed = references + 1 if mode == "other" else references
        self.targets = [i for i in indices if len(self.members[person(shards, i)]) >= self.needed]
        self.skipped = len(indices) - len(self.targets)
        self.people = len({person(shards, i) for i in self.targets})

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> TrainingSample:
        return self.sample_for_draw(i, i, 0)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def photos(self, i: int, draw_id: int, seed: int) -> list[int]:
        """The shard images serving target i as references at this draw (the first is the reference)."""
        target = self.targets[i]
        if self.mode == "self" and self.k == 1:
            return [target]
        others = [j for j in self.members[person(self.shards, target)] if j != target]
        # its own stream, apart from step.draw's (same seed and draw id): which photos does not move the noise
        g = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + draw_id * 0x2545F4914F6CDD1D + 1) % (2 ** 63))
        order = torch.randperm(len(others), generator=g).tolist()
        picked = [others[p] for p in order[:self.k - (self.mode == "self")]]
        return ([target] if self.mode == "self" else []) + picked

    def sample_for_draw(self, i: int, draw_id: int, seed: int) -> TrainingSample:
        photos = self.photos(i, draw_id, seed)
        sample = self.shards[self.targets[i]]
        if photos[0] != self.targets[i]:
            first = self.shards.view(photos[0])
            sample.reference_states, sample.reference_context = first.states, first.context
            sample.reference_adm = first.adm
        sample.more_references = tuple(self.shards.view(j) for j in photos[1:])
        return sample


def identity_split(shards: ShardSet, cfg: Config, holdout: int, global_batch: int, announce: bool = True
                   ) -> tuple[IdentitySource, Optional[list[TrainingSample]]]:
    """(training source, held-out samples or None) for shards whose images name their person; ``holdout``: at least
    this many images held out, as whole identities (0: none)."""
    mode, k = reference_mode(cfg, shards.grouped), cfg.train.references
    members: dict[tuple, list[int]] = {}
    for i in range(len(shards)):
        members.setdefault(person(shards, i), []).append(i)
    needed = k + 1 if mode == "other" else k
    held: list[int] = []
    # the last people by name that can serve as targets themselves, until enough images are out
    named_first = lambda key: (key[0] == "identity", key)  # noqa: E731 - people with a name before nameless images
    for key in sorted((key for key, photos in members.items() if len(photos) >= needed), key=named_first,
                      reverse=True):
        if len(held) >= holdout:
            break
        held += members[key]
    held_set = set(held)
    train = IdentitySource(shards, [i for i in range(len(shards)) if i not in held_set], mode, k)
    out = IdentitySource(shards, sorted(held), mode, k) if held else None
    what = {"other": "another photo of the same person", "self": "the target itself"}[mode]
    more = f" + {k - 1} more photo(s) of the person" if k > 1 else ""
    skipped = train.skipped + (out.skipped if out else 0)
    if announce:
        log.info("identity groups: %d images of %d people; reference = %s%s (data.reference = %s, train.references "
                 "= %d); %d target(s) skipped, their person having fewer than %d photos; held out: %d person(s) "
                 "(%d images)", len(shards), len(members), what, more, cfg.data.reference, k, skipped, needed,
                 out.people if out else 0, len(held))
    if len(train) < global_batch:
        self_hint = ", set data.reference = \"self\"" if mode == "other" else ""
        raise DataError(f"{len(train)} training targets (of {len(shards)} images; {train.skipped} skipped: their "
                        f"person has fewer than {needed} photos with data.reference = {mode!r} and train.references "
                        f"= {k}; {len(held)} held out by validation.holdout = {holdout}) are fewer than one global "
                        f"batch of {global_batch}: lower train.references or validation.holdout"
                        f"{self_hint}, or add photos")
    if out is None:
        return train, None
    seed = cfg.validation.seed  # fixed draws: the held-out loss compares like with like across validations
    return train, [out.sample_for_draw(j, j, seed) for j in range(len(out))]
