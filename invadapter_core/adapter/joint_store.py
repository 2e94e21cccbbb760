"""Where an MM-DiT application's K/V live (``adapter.joint``): the reference's RoPE'd K and λ-scaled V per block,
per step of the run's schedule, kept in the SD path's ``KVStore`` (one ``TensorPack`` under ComfyUI's memory
manager), so ComfyUI loads it beside the model, evicts it when a model needs the room, and never sees memory it
cannot free.

- A run (an OUTER_SAMPLE wrapper) says which weights sample and on which schedule; the store is kept for that pair
  and made again for another.
- The store lives on the model's load device in its inference dtype (``comfy.model_management`` via the
  ModelPatcher), and is only made when ComfyUI leaves room for it (``fits_on_device``); otherwise each step's K/V
  are made from the reference's kept features (a RoPE and a scale per block) or, where none are kept, from one
  reference pass, and dropped after the step.
- A reference's features are already K and V (``arch.flux``), so the store is the same size as the steps it keeps
  (not twice, as on a UNet) and adds nothing the features could not give at a few elementwise ops per block.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from comfy.ldm.flux.math import apply_rope1

from ..arch.flux import FluxLayout, split_kv
from ..comfyui.memory import TensorPack, fits_on_device, register
from ..reference.capture import Features
from ..reference.reference import same_sigma
from .kv_store import KVStore

JOINT_CACHE_SLOT = "invadapter_joint_cache"  # a patch list ComfyUI never calls: it asks its objects for models()
KV = dict[str, tuple[torch.Tensor, torch.Tensor]]


def reference_kv(layout: FluxLayout, features: Features, pe: torch.Tensor, scales: dict[str, float], device,
                 dtype, project: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None, combine: str = "concat"
                 ) -> KV:
    """Per block with a non-zero scale: the reference's K with RoPE at ``pe`` and V times the scale, each
    [1, heads, R x N, d] (R photos of the identity: their tokens side by side, every photo in the same frame).
    ``project(name, kept)``: a trained adapter's maps of the kept K/V (None: the block's own, training-free)."""
    kv = {}
    for name, f in features.self_attn.items():
        scale = scales.get(name, 0.0)
        if scale == 0:
            continue
        if project is not None:
            f = project(name, f)
        k, v = split_kv(f.to(device=device, dtype=dtype), layout.heads)  # [R, heads, N, d]
        k = apply_rope1(k, pe)  # as the network applies it (joint.rope_rows)
        kv[name] = tuple(combine_photos(t, combine) for t in (k, v * scale))
    return kv


def combine_photos(t: torch.Tensor, mode: str) -> torch.Tensor:
    """K or V of R photos of one identity [R, heads, N, d] as one reference [1, heads, N', d]: their tokens
    concatenated (N' = R x N) or averaged (every photo sits at the same positions, so averaging after RoPE equals
    RoPE of the average)."""
    if mode == "average":
        return t.mean(dim=0, keepdim=True)
    return t.transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[3])


class JointKVCache:
    """One application's K/V store and the run it serves."""

    def __init__(self, load_device: torch.device, keep: bool = True):
        self.load_device = load_device
        self.keep = keep  # False: no store (every step makes its K/V and drops them)
        self.run: Optional[tuple[tuple, list[float]]] = None  # (weights, sigmas > 0) of the sampling run
        self.store: Optional[KVStore] = None
        self._last: Optional[tuple[float, KV]] = None  # the step just made, for the next batch chunk at its sigma

    def begin_run(self, weights, sigmas: list[float]) -> None:
        self.run = (weights, [float(s) for s in sigmas if s > 0])

    def end_run(self) -> None:
        """The run is over: a store made on the device during it is handed to ComfyUI's memory manager."""
        self.run, self._last = None, None
        if self.store is not None and self.store.pack._patcher is None:
            register([self.store.pack], self.load_device)

    def _current(self) -> Optional[KVStore]:
        store, run = self.store, self.run
        if store is None or run is None or (store.weights, store.sigmas) != run:
            return None
        return store

    def get(self, sigma: float, device) -> Optional[KV]:
        store = self._current()
        i = store.index(sigma) if store is not None else None
        if i is not None and i in store.filled:
            return store.get(i, device)
        last = self._last
        return last[1] if last is not None and same_sigma(last[0], sigma) else None

    def put(self, sigma: float, kv: KV, dtype: torch.dtype, device) -> None:
        """Keep ``kv`` for this run's schedule (off-schedule sigmas, such as heun's midpoints, are not kept); the
        last step is held until the next, so batch chunks of one step (cond and uncond in separate calls) share
        it even without a store."""
        self._last = (sigma, kv) if self.run is not None else None
        if not self.keep or not kv or self.run is None or not any(same_sigma(s, sigma) for s in self.run[1]):
            return
        store = self._current()
        if store is None:
            self.store = None  # another schedule or other weights: the old store is dropped first
            if not fits_on_device(KVStore.nbytes(len(self.run[1]), kv, dtype), torch.device(device)):
                return
            store = self.store = KVStore(self.run[0], self.run[1], kv, dtype, torch.device(device))
        store.put(store.index(sigma), kv)

    def packs_for_run(self, needed: list[float], features: list[TensorPack]) -> list[TensorPack]:
        """What a run reads: the store when it holds every step the run needs, else the features it makes K/V of."""
        store = self._current()
        if store is not None and all(store.index(s) in store.filled for s in needed):
            return [store.pack]
        return features + ([store.pack] if store is not None else [])

    def nbytes(self) -> int:
        return self.store.pack.nbytes if self.store is not None else 0


class JointCacheHook:
    """Sits in a patch list ComfyUI never calls: when ComfyUI loads the model it asks for ``models()``, so the
    run's K/V store (or the features it is made of) loads beside it, and can be evicted like it."""

    def __init__(self, app):
        self.app = app

    def models(self):
        return [pack.patcher(self.app.cache.load_device) for pack in self.app.packs_for_run()]

    def to(self, *args, **kwargs):
        return self
