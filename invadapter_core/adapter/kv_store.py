"""The reference's K and V for every step of one schedule in one TensorPack under ComfyUI's memory manager: what a
warm run reads instead of recomputing them (the UNet path's ``application`` and the MM-DiT path's ``joint_store``)."""
from __future__ import annotations

from typing import Optional

import torch

from ..comfyui.memory import TensorPack
from ..reference.reference import same_sigma
from .injection import KV


class KVStore:
    """The reference's K and V (V scaled) for every step of one schedule, computed with one set of weights, in one
    TensorPack (the step's blocks contiguous, so a step that must come from host memory is one copy)."""

    def __init__(self, weights, sigmas: list[float], like: KV, dtype: torch.dtype, device: torch.device):
        self.weights, self.sigmas = weights, sigmas
        self.keys = list(like)
        shapes = {(i, key, part): t.shape for i in range(len(sigmas)) for key, (k, v) in like.items()
                  for part, t in (("k", k), ("v", v))}
        self.pack = TensorPack(shapes, dtype, device)
        self.filled: set[int] = set()
        self._views: dict = {}

    @staticmethod
    def nbytes(steps: int, like: KV, dtype: torch.dtype) -> int:
        return steps * sum(k.numel() + v.numel() for k, v in like.values()) * dtype.itemsize

    def index(self, sigma: float) -> Optional[int]:
        return next((i for i, s in enumerate(self.sigmas) if same_sigma(s, sigma)), None)

    def put(self, i: int, kv: KV) -> None:
        for key, (k, v) in kv.items():
            self.pack.write((i, key, "k"), k)
            self.pack.write((i, key, "v"), v)
        self.filled.add(i)

    def get(self, i: int, device: torch.device) -> KV:
        memo_key = (i, self.pack.flat.data_ptr(), device)
        if memo_key in self._views:
            return self._views[memo_key]
        views = self.pack.views_on([(i, key, part) for key in self.keys for part in ("k", "v")], device)
        kv = {key: (views[(i, key, "k")], views[(i, key, "v")]) for key in self.keys}
        if self.pack.flat.device == device:  # views of a resident pack stay valid until it moves
            self._views = {k: v for k, v in self._views.items() if k[1] == memo_key[1]}
            self._views[memo_key] = kv
        return kv
