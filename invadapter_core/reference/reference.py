"""An identity reference: the inverted DDIM trajectory, its conditioning, and its diffusion features per sigma.

The reference branch depends on neither the prompt, the seed nor the generation latent, so the features captured at
a sigma are kept (``FeatureCache``) and serve every later generation at that sigma, as long as the weights are the
same: features are kept per model (``Reference.cache_for``), so a reference applied to other weights (another
checkpoint, a LoRA) computes features of its own instead of reusing ones the weights never produced.
Saved as one safetensors file (see ``save_reference``).
"""
from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch

from .inversion import latent_at
from .capture import Features
from ..comfyui.memory import TensorPack, fits_on_device
from ..files.format import FORMAT_VERSION, META
from ..files.safetensors_io import read_checked, save_atomic
from ..files.validation import ReferenceFileError, check_reference_file

CONTEXT = "c_crossattn"


def same_sigma(a: float, b: float, rel_tol: float = 1e-5) -> bool:
    """Sigmas pass through float32 tensors on their way to the model: equal within float32 rounding."""
    return abs(a - b) <= rel_tol * max(abs(a), 1e-8)


class FeatureCache:
    """Features per sigma, each step's tensors stored contiguously in a ``TensorPack``.

    The inversion's sigmas (``reserve``d, one pack for all of them) and a saved file's live as long as the cache.
    Entries a generation adds (sigmas off the inversion schedule: another step count, heun's midpoints, sigma_max)
    are kept while sampling runs use them: ``end_run`` drops those the run just ended did not touch, so changing steps
    or sampler never piles up features, and repeating the same settings never recomputes any.
    """

    def __init__(self, store_dtype: Optional[torch.dtype] = None):
        self.store_dtype = store_dtype  # None: the features' own dtype (the UNet's); e.g. float8 halves the memory
        self._entries: dict[float, tuple[TensorPack, int, bool]] = {}  # sigma -> (pack, step slot, has cross)
        self._layout: dict[TensorPack, list[tuple[str, str]]] = {}  # pack -> (kind, block) of each step
        self._reserved: list[float] = []
        self._reserved_pack: Optional[TensorPack] = None
        self.pinned: set[float] = set()
        self.passes = 0  # reference UNet passes that produced entries (tests and the benchmark read it)
        self._run = 0  # sampling-run counter: the run in which each unpinned entry was last used
        self._last_used: dict[float, int] = {}

    def _match(self, sigma: float) -> Optional[float]:
        for s in self._entries:
            if same_sigma(s, sigma):
                return s
        return None

    def reserve(self, sigmas: list[float]) -> None:
        """Features for these sigmas will come, all shaped alike: one pack holds them (allocated at the first put)."""
        self._reserved = [float(s) for s in sigmas]
        self._reserved_pack = None

    def put(self, sigma: float, features: Features, pin: bool = False) -> None:
        tensors = features.tensors()
        s = self._match(sigma)
        s = s if s is not None else float(sigma)
        slot = next((i for i, r in enumerate(self._reserved) if same_sigma(r, s)), None)
        if slot is None:
            pack, slot = self._new_pack(1, tensors), 0
        else:
            if self._reserved_pack is None:
                self._reserved_pack = self._new_pack(len(self._reserved), tensors)
            pack = self._reserved_pack
        for (kind, block), t in tensors.items():
            pack.write((slot, kind, block), t)
        previous = self._entries.get(s)
        self._entries[s] = (pack, slot, features.cross_attn is not None)
        if previous is not None:
            self._drop_if_unused(previous[0])
        self._last_used[s] = self._run
        if pin:
            self.pinned.add(s)

    def _new_pack(self, steps: int, tensors: dict) -> TensorPack:
        """A pack for ``steps`` steps shaped like ``tensors``: on their device while ComfyUI leaves the room, else
        in host memory (pinned: the device writes into it and reads from it without blocking)."""
        first = next(iter(tensors.values()))
        dtype = self.store_dtype or first.dtype
        shapes = {(i, kind, block): t.shape for i in range(steps) for (kind, block), t in tensors.items()}
        size = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
        pack = TensorPack(shapes, dtype, first.device if fits_on_device(size, first.device) else torch.device("cpu"))
        if pack.flat.device != first.device:
            pack.pin()
        self._layout[pack] = list(tensors)
        return pack

    def get(self, sigma: float, need_cross: bool = False, device=None) -> Optional[Features]:
        """Features at ``sigma`` as views on the pack's device (or copied to ``device``, one copy per step)."""
        s = self._match(sigma)
        if s is None:
            return None
        pack, slot, has_cross = self._entries[s]
        if need_cross and not has_cross:
            return None
        self._last_used[s] = self._run
        keys = [(slot, kind, block) for kind, block in self._layout[pack]]
        views = pack.views_on(keys, torch.device(device) if device is not None else pack.flat.device)
        self_attn = {k[2]: v for k, v in views.items() if k[1] == "self"}
        cross = {k[2]: v for k, v in views.items() if k[1] == "cross"} if has_cross else None
        return Features(self_attn, cross)

    def touch(self, sigmas: list[float]) -> None:
        """Mark the entries at ``sigmas`` as used by the current run (a run served from a K/V store built on them
        reads no features, but another application of the reference may)."""
        for sigma in sigmas:
            s = self._match(sigma)
            if s is not None:
                self._last_used[s] = self._run

    def start_run(self) -> None:
        self._run += 1

    def end_run(self) -> None:
        """Drop the unpinned entries the current run did not use (several applications of one reference in one
        run all start it before any of them uses an entry, so none prunes another's)."""
        for s in list(self._entries):
            if s not in self.pinned and self._last_used.get(s, -1) < self._run:
                pack = self._entries.pop(s)[0]
                self._last_used.pop(s, None)
                self._drop_if_unused(pack)

    def _drop_if_unused(self, pack: TensorPack) -> None:
        if not any(e[0] is pack for e in self._entries.values()):
            self._layout.pop(pack, None)
            if pack is self._reserved_pack:
                self._reserved_pack = None

    def sigmas(self) -> list[float]:
        return sorted(self._entries)

    def shapes(self) -> dict[tuple[str, str], tuple]:
        """(kind, block) -> shape of one step's features (empty when nothing is kept)."""
        for pack, layout in self._layout.items():
            return {entry: pack.slots[(0, *entry)][1] for entry in layout}
        return {}

    def packs(self) -> list[TensorPack]:
        return list(self._layout)

    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._layout)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class Reference:
    family: str                  # ComfyUI model config name of the model that encoded it, e.g. "SD15"
    resolution: tuple[int, int]  # (height, width) in pixels of the encoded images
    sigmas: torch.Tensor         # [n+1] ascending
    states: torch.Tensor         # [n+1, R, C, h, w] inversion trajectory in sampler space (R = images of the identity)
    conds: dict[str, torch.Tensor]  # apply_model's conditioning of the reference pass: c_crossattn [R|1, T, D], y ...
    features: FeatureCache = field(default_factory=FeatureCache)  # of the weights that encoded it
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    weights: Optional[Hashable] = None  # in-process key of the encoding weights; None: unknown (loaded from a file)
    convention: str = "lowest sigma"  # how the trajectory was inverted (ddim.CONVENTIONS)
    levels: Optional[list[str]] = None  # the block levels whose features are kept (None: every level)
    source: str = ""  # the file it was loaded from (named in errors)
    peak: Optional[float] = None  # a loaded file's largest magnitude the UNet computes with (None: made by a model)
    _other: dict = field(default_factory=dict, repr=False)  # weights key -> FeatureCache of other weights

    @property
    def context(self) -> torch.Tensor:
        return self.conds[CONTEXT]

    @property
    def images(self) -> int:
        return self.states.shape[1]

    @property
    def inverted(self) -> torch.Tensor:
        """The top of the trajectory: the inverted noise."""
        return self.states[-1]

    def latent_at(self, sigma: float) -> torch.Tensor:
        return latent_at(self.sigmas, self.states, sigma)

    def cache_for(self, weights: Hashable) -> FeatureCache:
        """The features computed with ``weights`` (the encoding model's, or a cache of their own for others)."""
        if weights == self.weights:
            return self.features
        return self._other.setdefault(weights, FeatureCache(self.features.store_dtype))

    def adopt(self, weights: Hashable) -> None:
        """The kept features are now known to come from ``weights`` (a file's features, verified by a probe)."""
        self.weights = weights
        self._other.pop(weights, None)

    def caches(self) -> list[FeatureCache]:
        return [self.features, *self._other.values()]


# --------------------------------------------------------------------------------------------------- file format
def save_reference(ref: Reference, path: str, with_features: bool = True) -> None:
    """trajectory.sigmas [n+1] (ascending), trajectory.states [n+1, R, C, h, w] (sampler space),
    cond.<name> (apply_model's conditioning: c_crossattn, y, c_concat), features.<i>.self.<block> /
    features.<i>.cross.<block> (at feature_sigmas[i]); metadata kind, format_version, base_family, resolution,
    feature_sigmas, convention, uid."""
    tensors = {
        "trajectory.sigmas": ref.sigmas.double().cpu().contiguous(),
        "trajectory.states": ref.states.float().cpu().contiguous(),
    }
    for name, t in ref.conds.items():
        tensors[f"cond.{name}"] = t.float().cpu().contiguous()
    feature_sigmas = ref.features.sigmas() if with_features else []
    for i, s in enumerate(feature_sigmas):
        f = ref.features.get(s, device="cpu")
        for (kind, block), t in f.tensors().items():
            tensors[f"features.{i}.{kind}.{block}"] = t.contiguous().clone()
    meta = {
        META + "kind": "reference",
        META + "format_version": str(FORMAT_VERSION),
        META + "base_family": ref.family,
        META + "resolution": json.dumps(list(ref.resolution)),
        META + "feature_sigmas": json.dumps(feature_sigmas),
        META + "convention": ref.convention,
        META + "uid": ref.uid,
    }
    if ref.levels is not None:
        meta[META + "levels"] = json.dumps(sorted(ref.levels))
    save_atomic(tensors, path, meta)


def load_reference(path: str) -> Reference:
    tensors, meta = read_checked(path, "reference file", ReferenceFileError, "save the reference again")
    parsed = check_reference_file(path, tensors, meta)
    stored = {t.dtype for k, t in tensors.items() if k.startswith("features.")}
    cache = FeatureCache(stored.pop() if len(stored) == 1 else None)
    cache.reserve(parsed["feature_sigmas"])
    for i, s in enumerate(parsed["feature_sigmas"]):
        prefix = f"features.{i}."
        self_attn = {k[len(prefix) + 5:]: v for k, v in tensors.items() if k.startswith(prefix + "self.")}
        cross = {k[len(prefix) + 6:]: v for k, v in tensors.items() if k.startswith(prefix + "cross.")}
        cache.put(float(s), Features(self_attn, cross or None), pin=True)
    conds = {k[len("cond."):]: v for k, v in tensors.items() if k.startswith("cond.")}
    if "caption.context" in tensors:  # format written before conditioning beyond the caption
        conds[CONTEXT] = tensors["caption.context"]
    return Reference(family=parsed["family"], resolution=parsed["resolution"], sigmas=tensors["trajectory.sigmas"],
                     states=tensors["trajectory.states"], conds=conds, features=cache,
                     uid=meta.get(META + "uid") or uuid.uuid4().hex, convention=parsed["convention"],
                     levels=parsed["levels"], source=path, peak=parsed["peak"])


# --------------------------------------------------------------------------------------------------- combining
def combine_references(refs: list[Reference]) -> Reference:
    """Several references of one identity -> one reference holding all their images (IDAdapter's mixed features).

    They must come from the same model family, resolution, inversion convention and sigmas; anything else that
    differs is named. What can be combined is: features are kept for the sigmas every reference holds (computed with
    the same weights), for the blocks every one keeps (other capture levels: their common levels, with a notice),
    cross-attention features only where all have them, all in one precision (the finest of theirs, with a notice).
    """
    if not refs:
        raise ReferenceFileError("no reference to combine")
    if len(refs) == 1:
        return refs[0]
    first = refs[0]
    for i, r in enumerate(refs[1:], start=2):
        _check_combinable(first, r, i)
    levels = _common_levels(refs)
    conds = {k: torch.cat([_per_image(r.conds[k], r.images) for r in refs]) for k in first.conds}
    same_weights = all(r.weights == first.weights for r in refs)
    store_dtype = _common_store_dtype(refs)
    cache = FeatureCache(store_dtype)
    shared = [s for s in first.features.sigmas() if all(r.features.get(s) is not None for r in refs)]
    cache.reserve(shared if same_weights else [])
    for s in (shared if same_weights else []):
        found = [r.features.get(s, device="cpu") for r in refs]
        self_attn = _concat([f.self_attn for f in found], store_dtype)
        cross = None
        if all(f.cross_attn is not None for f in found):
            cross = _concat([f.cross_attn for f in found], store_dtype)
        cache.put(s, Features(self_attn, cross), pin=True)
    peaks = [r.peak for r in refs if r.peak is not None]
    return Reference(first.family, first.resolution, first.sigmas, torch.cat([r.states for r in refs], dim=1),
                     conds, cache, weights=first.weights if same_weights else None, convention=first.convention,
                     levels=levels, source=", ".join(r.source for r in refs if r.source),
                     peak=max(peaks) if peaks else None)


def _check_combinable(first: Reference, r: Reference, i: int) -> None:
    """Refuse, naming exactly what differs between reference ``i`` and reference 1, what cannot be combined."""
    if r.family != first.family:
        raise ReferenceFileError(f"reference {i} was encoded with a {r.family} model, reference 1 with "
                                 f"{first.family}: encode every photo with the same checkpoint")
    if tuple(r.resolution) != tuple(first.resolution):
        raise ReferenceFileError(f"reference {i} has resolution {r.resolution}, reference 1 {first.resolution}: "
                                 f"encode every photo at the same resolution")
    if r.states.shape[2:] != first.states.shape[2:]:
        raise ReferenceFileError(f"reference {i}'s latents are {tuple(r.states.shape[2:])} (channels, height, width), "
                                 f"reference 1's {tuple(first.states.shape[2:])}: encode every photo with the same "
                                 f"checkpoint and resolution")
    if r.convention != first.convention:
        raise ReferenceFileError(f"reference {i} was inverted with the '{r.convention}' inversion, reference 1 "
                                 f"with '{first.convention}': use the same inversion in every encode node")
    steps, steps_1 = int((r.sigmas > 0).sum()), int((first.sigmas > 0).sum())  # the encode node's steps
    if r.sigmas.shape != first.sigmas.shape or steps != steps_1:
        raise ReferenceFileError(f"reference {i} was inverted over {steps} steps, reference 1 over {steps_1}: use "
                                 f"the same steps/scheduler in every InvAdapterEncodeReference")
    if not torch.allclose(r.sigmas.double(), first.sigmas.double()):
        at = int((~torch.isclose(r.sigmas.double(), first.sigmas.double())).nonzero()[0])
        raise ReferenceFileError(f"reference {i} was inverted over other sigmas than reference 1 (same {steps} "
                                 f"steps; sigma {at} is {float(r.sigmas[at]):.4g} against {float(first.sigmas[at]):.4g}"
                                 f"): use the same scheduler (and sampler) in every InvAdapterEncodeReference")
    if set(r.conds) != set(first.conds) or any(r.conds[k].shape[1:] != first.conds[k].shape[1:]
                                                 for k in first.conds):
        raise ReferenceFileError(f"the caption of reference {i} does not match reference 1's "
                                 f"({_cond_shapes(r)} against {_cond_shapes(first)}): keep the captions under "
                                 f"75 tokens and use the same model")


def _common_levels(refs: list[Reference]) -> Optional[list[str]]:
    """The block levels every reference keeps (None: all); a notice when some reference keeps more."""
    from ..comfyui.notify import notify

    kept = [set(r.levels) for r in refs if r.levels is not None]
    if not kept:
        return None
    common = set.intersection(*kept)
    if not common:
        described = "; ".join(f"reference {i}: {', '.join(r.levels) if r.levels else 'all levels'}"
                              for i, r in enumerate(refs, start=1))
        raise ReferenceFileError(f"the references keep features of no common block level ({described}): encode "
                                 f"every photo with the same capture setting")
    if any(r.levels is None or set(r.levels) != common for r in refs):
        notify(f"the references were encoded with other capture settings; the combined reference keeps the levels "
               f"they all hold ({', '.join(sorted(common))}): encode every photo with the same capture setting to "
               f"keep more")
    return sorted(common)


def _common_store_dtype(refs: list[Reference]) -> Optional[torch.dtype]:
    """One precision for the combined features: 8-bit only if every reference keeps 8-bit features, else the
    model's (the 8-bit ones are widened: no further rounding), with a notice."""
    from ..comfyui.notify import notify

    dtypes = {r.features.store_dtype for r in refs if len(r.features)}
    if len(dtypes) <= 1:
        return dtypes.pop() if dtypes else refs[0].features.store_dtype
    notify(f"the references keep their features in different precisions "
           f"({', '.join(sorted(_dtype_name(d) for d in dtypes))}); the combined reference keeps them all in the "
           f"model's precision")
    return None


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "the model's" if dtype is None else str(dtype).replace("torch.", "")


def _concat(parts: list[dict[str, torch.Tensor]], store_dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """The blocks every reference holds, their images concatenated (one dtype: the store's, else the widest)."""
    blocks = [k for k in parts[0] if all(k in p for p in parts)]
    out = {}
    for k in blocks:
        tensors = [p[k] for p in parts]
        dtype = store_dtype or max((t.dtype for t in tensors if t.dtype != torch.float8_e4m3fn),
                                   key=lambda d: d.itemsize, default=torch.float16)
        out[k] = torch.cat([t.to(dtype) for t in tensors])
    return out


def _per_image(t: torch.Tensor, images: int) -> torch.Tensor:
    return t.expand(images, *t.shape[1:]) if t.shape[0] == 1 else t


def _cond_shapes(r: Reference) -> str:
    return ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in sorted(r.conds.items()))
