"""An identity reference: the inverted DDIM trajectory, its caption, and its diffusion features per sigma.

The reference branch depends on neither the prompt, the seed nor the generation latent, so the features captured
at a sigma are kept (``FeatureCache``) and serve every later generation at that sigma.
Saved as one safetensors file:
    trajectory.sigmas [n+1] (ascending), trajectory.states [n+1, R, C, h, w] (sampler space), caption.context
    features.<i>.self.<block> / features.<i>.cross.<block>   (features at feature_sigmas[i])
with metadata ``invadapter.kind`` = "reference", format_version, base_family, resolution, feature_sigmas (JSON).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import FORMAT_VERSION
from .ddim import latent_at
from .safetensors_io import read_checked, save_atomic

META = "invadapter."


class ReferenceFileError(ValueError):
    """A reference file or object that cannot be used, with what was wrong and how to fix it."""


@dataclass
class Features:
    """Diffusion features of one reference pass: per block name, f_s (self-attn input), f_c (cross-attn input)."""
    self_attn: dict[str, torch.Tensor]
    cross_attn: Optional[dict[str, torch.Tensor]] = None  # None: not captured (the adapter had no cross EAA)

    def nbytes(self) -> int:
        tensors = list(self.self_attn.values()) + list((self.cross_attn or {}).values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device=None, dtype=None) -> "Features":
        move = lambda d: None if d is None else {k: v.to(device=device, dtype=dtype) for k, v in d.items()}  # noqa
        return Features(move(self.self_attn), move(self.cross_attn))


class FeatureCache:
    """Features per sigma, matched with a relative tolerance (sigmas pass through float32 tensors).

    Entries put with ``pin=True`` (the inversion's sigmas, a saved file's) live as long as the reference. Entries a
    generation adds (sigmas off the inversion schedule: another step count, heun's midpoints, sigma_max) are kept
    while sampling runs use them: ``end_run`` drops those the run just ended did not touch, so changing steps or
    sampler never piles up features, and repeating the same settings never recomputes any.
    """

    def __init__(self, rel_tol: float = 1e-5):
        self.rel_tol = rel_tol
        self.entries: dict[float, Features] = {}
        self.pinned: set[float] = set()
        self.passes = 0  # reference UNet passes that produced entries (tests and the benchmark read it)
        self._run = 0  # sampling-run counter: the run in which each unpinned entry was last used
        self._last_used: dict[float, int] = {}

    def _match(self, sigma: float) -> Optional[float]:
        for s in self.entries:
            if abs(s - sigma) <= self.rel_tol * max(abs(s), 1e-8):
                return s
        return None

    def get(self, sigma: float, need_cross: bool = False) -> Optional[Features]:
        s = self._match(sigma)
        if s is None:
            return None
        found = self.entries[s]
        if need_cross and found.cross_attn is None:
            return None
        self._last_used[s] = self._run
        return found

    def put(self, sigma: float, features: Features, pin: bool = False) -> None:
        s = self._match(sigma)
        s = s if s is not None else float(sigma)
        self.entries[s] = features
        self._last_used[s] = self._run
        if pin:
            self.pinned.add(s)

    def start_run(self) -> None:
        self._run += 1

    def end_run(self) -> None:
        """Drop the unpinned entries the current run did not use (several applications of one reference in one
        run all start it before any of them uses an entry, so none prunes another's)."""
        for s in list(self.entries):
            if s not in self.pinned and self._last_used.get(s, -1) < self._run:
                del self.entries[s]
                self._last_used.pop(s, None)

    def sigmas(self) -> list[float]:
        return sorted(self.entries)

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in self.entries.values())

    def to_(self, device) -> None:
        """Move every entry (e.g. to the offload device between runs); a memo, so in place is fine."""
        for s in list(self.entries):
            self.entries[s] = self.entries[s].to(device=device)


@dataclass
class Reference:
    family: str                 # ComfyUI model config name of the model that encoded it, e.g. "SD15"
    resolution: tuple[int, int]  # (height, width) in pixels of the encoded images
    sigmas: torch.Tensor        # [n+1] ascending
    states: torch.Tensor        # [n+1, R, C, h, w] inversion trajectory in sampler space (R = images of the identity)
    context: torch.Tensor       # [1, T, D] caption conditioning
    features: FeatureCache = field(default_factory=FeatureCache)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    model_key: Optional[tuple] = None  # in-process identity of the encoding model (for a mismatch warning)

    @property
    def images(self) -> int:
        return self.states.shape[1]

    def latent_at(self, sigma: float) -> torch.Tensor:
        return latent_at(self.sigmas, self.states, sigma)

    @property
    def inverted(self) -> torch.Tensor:
        """The top of the trajectory: the inverted noise."""
        return self.states[-1]


def save_reference(ref: Reference, path: str, with_features: bool = True) -> None:
    tensors = {
        "trajectory.sigmas": ref.sigmas.float().cpu().contiguous(),
        "trajectory.states": ref.states.float().cpu().contiguous(),
        "caption.context": ref.context.float().cpu().contiguous(),
    }
    feature_sigmas = ref.features.sigmas() if with_features else []
    for i, s in enumerate(feature_sigmas):
        f = ref.features.entries[s]
        for kind, d in (("self", f.self_attn), ("cross", f.cross_attn or {})):
            for block, t in d.items():
                tensors[f"features.{i}.{kind}.{block}"] = t.cpu().contiguous()
    meta = {
        META + "kind": "reference",
        META + "format_version": str(FORMAT_VERSION),
        META + "base_family": ref.family,
        META + "resolution": json.dumps(list(ref.resolution)),
        META + "feature_sigmas": json.dumps(feature_sigmas),
        META + "uid": ref.uid,
    }
    save_atomic(tensors, path, meta)


def load_reference(path: str) -> Reference:
    tensors, meta = read_checked(path, "reference file", ReferenceFileError, "save the reference again")
    if meta.get(META + "kind") != "reference":
        raise ReferenceFileError(f"{path} is not an Inv-Adapter reference (no '{META}kind=reference' metadata); "
                                 f"save one with InvAdapterSaveReference")
    if int(meta.get(META + "format_version", "0")) > FORMAT_VERSION:
        raise ReferenceFileError(f"{path} was written by a newer ComfyUI-InvAdapter: update the pack")
    try:
        cache = FeatureCache()
        for i, s in enumerate(json.loads(meta[META + "feature_sigmas"])):
            prefix = f"features.{i}."
            self_attn = {k[len(prefix) + 5:]: v for k, v in tensors.items() if k.startswith(prefix + "self.")}
            cross = {k[len(prefix) + 6:]: v for k, v in tensors.items() if k.startswith(prefix + "cross.")}
            cache.put(float(s), Features(self_attn, cross or None), pin=True)
        return Reference(family=meta[META + "base_family"], resolution=tuple(json.loads(meta[META + "resolution"])),
                         sigmas=tensors["trajectory.sigmas"], states=tensors["trajectory.states"],
                         context=tensors["caption.context"], features=cache, uid=meta.get(META + "uid", uuid.uuid4().hex))
    except KeyError as e:
        raise ReferenceFileError(f"reference file {path} is incomplete (missing {e}); save it again") from None


def combine_references(refs: list[Reference]) -> Reference:
    """Several references of one identity -> one reference holding all their images (IDAdapter's mixed features).

    They must come from the same model family, resolution and inversion sigmas. Features are kept for the sigmas
    every reference holds; cross-attention features only where all have them.
    """
    if not refs:
        raise ReferenceFileError("no reference to combine")
    if len(refs) == 1:
        return refs[0]
    first = refs[0]
    for i, r in enumerate(refs[1:], start=2):
        if r.family != first.family:
            raise ReferenceFileError(f"reference {i} was encoded with a {r.family} model, reference 1 with "
                                     f"{first.family}: encode every photo with the same checkpoint")
        if tuple(r.resolution) != tuple(first.resolution) or r.states.shape[2:] != first.states.shape[2:]:
            raise ReferenceFileError(f"reference {i} has resolution {r.resolution}, reference 1 {first.resolution}: "
                                     f"encode every photo at the same resolution")
        if r.sigmas.shape != first.sigmas.shape or not torch.allclose(r.sigmas.double(), first.sigmas.double()):
            raise ReferenceFileError(f"reference {i} was inverted with other steps/scheduler than reference 1: "
                                     f"use the same steps and scheduler in every InvAdapterEncodeReference")
        if r.context.shape[1:] != first.context.shape[1:]:
            raise ReferenceFileError(f"the caption of reference {i} has {r.context.shape[1]} tokens, reference 1's "
                                     f"{first.context.shape[1]}: keep the captions under 75 tokens")
    context = torch.cat([r.context.expand(r.images, *r.context.shape[1:]) for r in refs])
    cache = FeatureCache()
    for s in first.features.sigmas():
        found = [r.features.get(s) for r in refs]
        if any(f is None for f in found):
            continue
        self_attn = {k: torch.cat([f.self_attn[k].to(found[0].self_attn[k].device) for f in found])
                     for k in found[0].self_attn}
        cross = None
        if all(f.cross_attn is not None for f in found):
            cross = {k: torch.cat([f.cross_attn[k].to(found[0].cross_attn[k].device) for f in found])
                     for k in found[0].cross_attn}
        cache.put(s, Features(self_attn, cross), pin=True)
    return Reference(first.family, first.resolution, first.sigmas, torch.cat([r.states for r in refs], dim=1),
                     context, cache)
