"""The pack's one piece of glue to ComfyUI's memory manager, and where the reference features and the EAA's
keys/values live (the cache residency policy).

Anything the pack keeps in memory is handed to ComfyUI as a model through ``managed_patcher``: a ``ModelPatcher``
around a torch module, so ComfyUI lists it, loads it beside the UNet and evicts or releases it like its own models.
Two kinds of things use it: ``TensorPack``s (feature and K/V stores, below) and ``ManagedObject``s (things built on
first use that are not torch weights, e.g. the face recognizers' ONNX sessions and dlib networks).

Each store is a ``TensorPack``: named tensors in ONE flat buffer that ComfyUI's memory manager handles as a model
(wrapped in a ``ModelPatcher``; the application's patch object lists it in ``models()``):
- ``load_models_gpu`` loads it beside the UNet when there is room: one bulk copy, non-blocking from pinned memory;
- ``free_memory`` evicts it like any other model when a model needs the room. Eviction drops the device copy and
  keeps a host copy; that copy is made once, non-blocking into pinned memory, so moving out never blocks a prompt;
- when it does not fit, it stays in host memory and every step takes its own slice (one contiguous non-blocking
  copy per step, never one copy per block).
A store written on the compute device (the inversion's features, the keys/values of a run) stays there after the
run: nothing moves between runs unless ComfyUI needs the memory.
"""
from __future__ import annotations

import logging
import math
import threading
import weakref
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Optional

import torch

if TYPE_CHECKING:
    import comfy.model_patcher

Shape = tuple[int, ...]
log = logging.getLogger("InvAdapter")


def _mm():
    """ComfyUI's memory manager, imported on first use (importing this module needs no ComfyUI)."""
    import comfy.model_management

    return comfy.model_management


def managed_patcher(module: torch.nn.Module, load_device: Optional[torch.device] = None,
                    offload_device: Optional[torch.device] = None, size: Optional[int] = None,
                    on_release: Optional[Callable[[], None]] = None) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher through which ComfyUI's memory manager handles ``module`` (``size`` bytes when the module's
    own parameters do not say what it holds); ``on_release`` runs when ComfyUI unloads it for good."""
    import comfy.model_patcher
    from comfy.patcher_extension import CallbacksMP

    mm = _mm()
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device or mm.get_torch_device(),
                                               offload_device=offload_device or mm.unet_offload_device(),
                                               size=max(int(size), 1) if size is not None else 0)
    if on_release is not None:
        # unpatch_all False = ComfyUI re-registering the same model, which stays loaded
        patcher.add_callback(CallbacksMP.ON_DETACH, lambda p, unpatch_all: on_release() if unpatch_all else None)
    return patcher


def load(patchers: list) -> None:
    """Have ComfyUI load these (evicting others if it needs the room)."""
    if patchers:
        _mm().load_models_gpu(patchers)


class TensorPack(torch.nn.Module):
    """Tensors of one dtype under hashable keys, laid out one after another in ``flat`` (insertion order, so keys
    written together, e.g. one step's blocks, are one contiguous slice)."""

    def __init__(self, shapes: dict[Hashable, Shape], dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.slots: dict[Hashable, tuple[int, Shape]] = {}
        total = 0
        for key, shape in shapes.items():
            self.slots[key] = (total, tuple(shape))
            total += math.prod(shape)
        self.flat = torch.nn.Parameter(torch.empty(total, dtype=dtype, device=device), requires_grad=False)
        self.written: set = set()
        self._host: Optional[torch.Tensor] = None  # host copy of the current contents (pinned where possible)
        self._host_done = None  # CUDA event: the non-blocking copy into _host has finished
        self.transfers = 0  # copies between devices, and their bytes (tests and the benchmark read them)
        self.bytes_moved = 0
        self._patcher = None
        # What ComfyUI's ModelPatcher reads: a pack made on the compute device is already loaded there (else the
        # first load_models_gpu would reserve its size a second time and might evict other models for nothing).
        self.model_loaded_weight_memory = 0 if self.flat.device.type == "cpu" else self.nbytes
        self.model_lowvram = False

    # ComfyUI's ModelPatcher reads and writes ``model.device``.
    @property
    def device(self) -> torch.device:
        return self.flat.device

    @device.setter
    def device(self, value) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def view(self, key: Hashable) -> torch.Tensor:
        start, shape = self.slots[key]
        return self.flat.data[start:start + math.prod(shape)].view(shape)

    def write(self, key: Hashable, value: torch.Tensor) -> None:
        if self.flat.data is not self._host:
            self._host = None  # the host copy no longer matches
        self.view(key).copy_(value.reshape(self.slots[key][1]), non_blocking=True)
        self.written.add(key)

    def span(self, keys: Iterable[Hashable]) -> tuple[int, int]:
        """The [start, end) range of ``flat`` covering ``keys`` (contiguous when they were declared together)."""
        starts = [(self.slots[k][0], self.slots[k][0] + math.prod(self.slots[k][1])) for k in keys]
        return min(s for s, _ in starts), max(e for _, e in starts)

    def views_on(self, keys: Iterable[Hashable], device: torch.device) -> dict[Hashable, torch.Tensor]:
        """Views of ``keys`` on ``device``: as they are when the pack is there, else one copy of their span."""
        keys = list(keys)
        if self.flat.device == device:
            return {k: self.view(k) for k in keys}
        start, end = self.span(keys)
        host = self._pinned_host()
        chunk = self._copy(host[start:end], device)
        out = {}
        for k in keys:
            s, shape = self.slots[k]
            out[k] = chunk[s - start:s - start + math.prod(shape)].view(shape)
        return out

    def host_data(self) -> torch.Tensor:
        """The contents in host memory, safe to read on the CPU (waits for a pending non-blocking copy)."""
        if self.flat.device.type == "cpu":
            data = self.flat.data
        else:
            data = self._to_host()
        if self._host_done is not None:
            self._host_done.synchronize()
            self._host_done = None
        return data

    def _pinned_host(self) -> torch.Tensor:
        """The host contents, pinned in place (ComfyUI's pin budget permitting) so per-step copies don't block."""
        data = self.host_data()
        self.pin()
        self._host = data
        return data

    def pin(self) -> None:
        """Pin a host-resident pack in place, so the device writes into it and reads from it without blocking."""
        data = self.flat.data
        if data.device.type == "cpu" and not data.is_pinned() and _mm().pin_memory(data):
            weakref.finalize(self, _mm().unpin_memory, data)

    # --- moves (ComfyUI calls .to(device) when it loads or evicts the pack) ----------------------------------------
    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and torch.device(device) != self.flat.device:
            target = torch.device(device)
            self.flat.data = self._to_host() if target.type == "cpu" else self._copy(self.flat.data, target)
        return self

    def _to_host(self) -> torch.Tensor:
        if self._host is None or self._host.shape != self.flat.shape:
            host = torch.empty(self.flat.shape, dtype=self.flat.dtype, device="cpu")
            pinned = _mm().pin_memory(host)
            if pinned:
                weakref.finalize(self, _mm().unpin_memory, host)
            host.copy_(self.flat.data, non_blocking=pinned)
            if pinned and self.flat.device.type == "cuda":
                self._host_done = torch.cuda.Event()
                self._host_done.record()
            self._count(host)
            self._host = host
        return self._host

    def _copy(self, data: torch.Tensor, device: torch.device) -> torch.Tensor:
        if data.device == device:
            return data
        moved = data.to(device, non_blocking=data.is_pinned() and _mm().device_supports_non_blocking(device))
        self._count(data)
        return moved

    def _count(self, data: torch.Tensor) -> None:
        self.transfers += 1
        self.bytes_moved += data.numel() * data.element_size()

    # --- ComfyUI memory management -------------------------------------------------------------------------------
    def patcher(self, load_device: Optional[torch.device] = None) -> comfy.model_patcher.ModelPatcher:
        """The ModelPatcher through which ComfyUI loads and evicts this pack (made once, for the device of the
        UNet that uses it)."""
        if self._patcher is None:
            self._patcher = managed_patcher(self, load_device)
        return self._patcher


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Room for ``nbytes`` more on ``device`` while keeping ComfyUI's own inference reserve free."""
    if device.type == "cpu":
        return True
    return _mm().get_free_memory(device) - nbytes > _mm().minimum_inference_memory()


def register(packs: Iterable[TensorPack], device: torch.device) -> None:
    """Hand packs made directly on the compute device to ComfyUI's memory manager, so it can evict them when a model
    needs the room (they are already where they belong: nothing is copied)."""
    load([p.patcher(device) for p in packs])


# --------------------------------------------------------------------------------------------- managed objects
class _Holder(torch.nn.Module):
    """What ComfyUI's model management holds for a ManagedObject: no torch weights; the object hangs off it."""

    def __init__(self):
        super().__init__()
        self.value = None


class ManagedObject:
    """Something that is not torch weights (an ONNX session, dlib networks), built at most once per process on first
    use and dropped when ComfyUI unloads it (the "Unload models" button / ``POST /free``, ``unload_all_models()``,
    or another model needing the memory); the next use builds it again."""

    def __init__(self, kind: str, build: Callable[[], object], size_bytes: int, what: str = "face recognizer"):
        self.kind, self.what, self.build = kind, what, build
        self.loads = 0  # how many times it was built (tests and logs)
        self.holder = _Holder()
        self.patcher = managed_patcher(self.holder, offload_device=torch.device("cpu"), size=size_bytes,
                                       on_release=self._release)

    def _release(self) -> None:
        if self.holder.value is not None:
            self.holder.value = None
            log.info("InvAdapter: %s %s released by ComfyUI's model management", self.what, self.kind)

    @property
    def loaded(self) -> bool:
        return self.holder.value is not None

    def get(self):
        load([self.patcher])
        if self.holder.value is None:
            self.holder.value = self.build()
            self.loads += 1
        return self.holder.value


_MANAGED: dict[tuple, ManagedObject] = {}
_LOCK = threading.Lock()


def managed(key: tuple, kind: str, build: Callable[[], object], size: Callable[[], int]) -> ManagedObject:
    """The process's one ManagedObject for ``key`` (made on first request)."""
    with _LOCK:
        entry = _MANAGED.get(key)
        if entry is None:
            entry = _MANAGED[key] = ManagedObject(kind, build, size())
    return entry
