"""InvAdapterApply's runtime: the EAA injection installed on a cloned ModelPatcher, fed per sampling step.

- An OUTER_SAMPLE wrapper opens a run: which weights sample (features are kept per weights, see ``Reference``),
  which sigmas, and what ComfyUI should load beside the UNet (``CacheHook.models``, see ``comfyui.memory``).
- An APPLY_MODEL wrapper gives each UNet call the reference's K/V at its sigma (``kv_at``): from the application's
  K/V store when this schedule ran before; else projected from the reference's cached features; else from one
  fresh reference pass, shared by every batch chunk at that sigma.
- The attention math is ``injection``'s, shared with the trainer; its list patches stack with other packs' patches
  and never replace one.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.patcher_extension as ext

from ..arch.fit import check_served, is_joint
from ..arch.layout import layout_of, model_family, weights_key
from ..comfyui.memory import TensorPack, fits_on_device, register
from ..comfyui.notify import notify
from ..reference.capture import Features, reference_pass
from ..reference.reference import FeatureCache, Reference
from .block_weights import BlockWeights
from .eaa import InvAdapter
from .fit import check_adapter_fits, check_levels_fit, check_magnitudes, check_reference_fits
from .injection import ADD, CALL, SLOTS, STASH, KV, Call, EAAInjection, Step, ordered_patches
from .kv_store import KVStore
from .joint import apply_joint

log = logging.getLogger("InvAdapter")
HOOK_SLOT = "invadapter_cache"  # a patch list ComfyUI never calls: it only asks its objects for models() and .to()
# Relative error under which a file's features count as computed by these weights: float rounding of the same
# computation stays far below 1e-3; an 8-bit store rounds each value by up to 6 % (3.3 % RMS measured).
PROBE_TOLERANCE = {torch.float8_e4m3fn: 0.06}
PROBE_TOLERANCE_DEFAULT = 1e-3


@dataclass
class Run:
    """One sampling run of one application."""
    weights: Optional[tuple]  # what samples: features and K/V are only reused for the same weights
    sigmas: list[float]       # the run's schedule
    cache: FeatureCache
    started: list = field(default_factory=list)  # caches whose run was started (ended in the same order)
    checked: bool = False     # the cache is known to hold features of these weights


class CacheHook:
    """Sits in a patch list ComfyUI never calls: ComfyUI asks it for ``models()`` when it loads the UNet (so the
    run's feature or K/V store loads beside it) and calls ``.to()`` on it (nothing to move: the stores are models)."""

    def __init__(self, app: "Application"):
        self.app = app

    def models(self):
        return [pack.patcher(self.app.load_device) for pack in self.app.packs_for_run()]

    def to(self, *args, **kwargs):
        return self


class Application:
    """One InvAdapterApply: adapter + reference + strengths on one cloned model."""

    _ids = itertools.count()

    def __init__(self, adapter: InvAdapter, reference: Reference, model, weight_self: float, weight_cross: float,
                 sigma_start: float = math.inf, sigma_end: float = 0.0, combine: str = "concat",
                 apply_to: str = "cond and uncond", mask: Optional[torch.Tensor] = None,
                 block_weights: Optional[BlockWeights] = None, reuse_features: bool = True, keep_kv: bool = True):
        self.layout = layout_of(model)
        self.adapter, self.reference, self.combine = adapter, reference, combine
        self.injection = EAAInjection(self.layout, weight_self, weight_cross, block_weights, mask, apply_to)
        self.kinds = self.injection.active_kinds(adapter.has_cross)
        self.uses_cross = "cross" in self.kinds
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.reuse_features = reuse_features  # False: the paper's pipeline, a fresh reference pass at every call
        self.keep_kv = keep_kv and reuse_features
        self.load_device = model.load_device
        self.key = f"invadapter:{reference.uid}:{id(adapter):x}"
        self.run: Optional[Run] = None
        self.kv_store: Optional[KVStore] = None
        self._adapter_copies: dict = {}
        self._told: set = set()  # weights the user was already told about

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    # --- runs --------------------------------------------------------------------------------------------------
    def outer_sample_wrapper(self, executor, *args, **kwargs):
        guider = executor.class_obj
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        self.begin_run(weights_key(guider.model_patcher), [float(s) for s in sigmas if s > 0])
        try:
            return executor(*args, **kwargs)
        finally:
            self.end_run()

    def begin_run(self, weights, sigmas: list[float]) -> None:
        ref = self.reference
        cache = ref.features if ref.weights is None else ref.cache_for(weights)  # a file's features: checked later
        self.run = Run(weights, sigmas, cache, checked=ref.weights is not None)
        self._start(cache)
        store = self.kv_store
        if store is not None and store.weights == weights and store.sigmas == sigmas:
            cache.touch(sigmas)  # what the store was built from stays while the schedule is in use
        if ref.weights is not None and weights != ref.weights and len(ref.features):
            self._tell_recomputed(weights)

    def _start(self, cache: FeatureCache) -> None:
        cache.start_run()
        self.run.started.append(cache)

    def end_run(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        for cache in run.started:
            cache.end_run()
        self.injection.reset()
        packs = [p for p in run.cache.packs() + ([self.kv_store.pack] if self.kv_store else [])
                 if p._patcher is None]
        register(packs, self.load_device)

    def packs_for_run(self) -> list[TensorPack]:
        """What this run reads: the K/V store when it covers the schedule, else the features it projects from."""
        run = self.run
        if run is None or not self.reuse_features:
            return []
        store = self.kv_store
        needed = [i for i, s in enumerate(run.sigmas) if self.active(s)]
        if store is not None and store.weights == run.weights and store.sigmas == run.sigmas \
                and all(i in store.filled for i in needed):
            return [store.pack]
        return run.cache.packs() + ([store.pack] if store is not None else [])

    # --- per UNet call -------------------------------------------------------------------------------------------
    def apply_model_wrapper(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        call = transformer_options.get(CALL)
        sigma = call.sigma if call is not None else float(t.reshape(-1)[0])
        if not self.active(sigma):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        kv = self.kv_at(executor.class_obj, sigma, x.device)
        if call is None:
            options = transformer_options.copy()
            options[CALL] = call = Call(sigma=sigma)
            reordered = ordered_patches(options.get("patches", {}))
            if reordered is not None:
                options["patches"] = reordered
        else:
            options = transformer_options
        call.steps.append(Step(self.injection, kv, sigma, self.key))
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    def kv_at(self, base_model, sigma: float, device: torch.device) -> KV:
        """The reference's K/V at ``sigma`` for every block with a non-zero strength."""
        if self.run is None:  # apply_model called outside a sampling run: trust the reference's own features
            self.run = Run(self.reference.weights, [], self.reference.features, checked=True)
        run = self.run
        dtype = base_model.get_dtype_inference()
        store = self.kv_store
        if not (self.keep_kv and store is not None and store.weights == run.weights and store.sigmas == run.sigmas):
            store = None
        i = store.index(sigma) if store is not None else None
        if i is not None and i in store.filled:
            return store.get(i, device)
        features = self.features_at(base_model, sigma, device)
        kv = self.injection.project_kv(self._adapter_on(device, dtype), features, self.combine, device, dtype)
        if self.keep_kv and kv:
            store = store or self._new_store(kv, dtype, device)
            i = store.index(sigma) if store is not None else None
            if i is not None:  # off-schedule sigmas (heun's midpoints, sde noise levels) are not kept
                store.put(i, kv)
        return kv

    def _new_store(self, like: KV, dtype, device) -> Optional[KVStore]:
        """A K/V store for this run's schedule, on the compute device if ComfyUI leaves the room for it."""
        run = self.run
        if not run.sigmas:
            return None
        self.kv_store = None  # another schedule or other weights: the old store is dropped
        if not fits_on_device(KVStore.nbytes(len(run.sigmas), like, dtype), device):
            return None
        self.kv_store = KVStore(run.weights, run.sigmas, like, dtype, device)
        return self.kv_store

    def features_at(self, base_model, sigma: float, device: torch.device) -> Features:
        if not self.run.checked:
            self._check_kept_features(base_model, device)
        cache = self.run.cache
        found = cache.get(sigma, need_cross=self.uses_cross, device=device) if self.reuse_features else None
        if found is None:
            found = self._reference_pass(base_model, sigma, device)
            cache.passes += 1
            if self.reuse_features:
                cache.put(sigma, found)
        return found

    def _reference_pass(self, base_model, sigma: float, device: torch.device) -> Features:
        ref = self.reference
        keep = self.layout.at_levels(set(ref.levels) if ref.levels is not None else None)
        return reference_pass(base_model, ref.latent_at(sigma).to(device), sigma, ref.conds, self.layout,
                              self.uses_cross, keep)[1]

    def _check_kept_features(self, base_model, device: torch.device) -> None:
        """A loaded file's features are used only if these weights reproduce them: one reference pass at the lowest
        kept sigma, compared block by block; otherwise this model computes its own."""
        run, ref = self.run, self.reference
        run.checked = True
        if not len(ref.features) or run.weights is None:
            return
        s = ref.features.sigmas()[0]
        kept = ref.features.get(s, device=device)
        fresh = self._reference_pass(base_model, s, device)
        tolerance = PROBE_TOLERANCE.get(ref.features.store_dtype, PROBE_TOLERANCE_DEFAULT)
        if same_features(kept, fresh, tolerance):
            ref.adopt(run.weights)
            return
        run.cache = ref.cache_for(run.weights)
        self._start(run.cache)
        run.cache.put(s, fresh)
        run.cache.passes += 1
        self._tell_recomputed(run.weights)

    def _tell_recomputed(self, weights) -> None:
        if weights in self._told:
            return
        self._told.add(weights)
        notify("the reference's kept features come from other weights than this model (another checkpoint, or a "
               "LoRA), so they are computed again for this model (extra UNet passes on first use). Encode the face "
               "with this model to skip them.")

    def _adapter_on(self, device, dtype) -> InvAdapter:
        """The adapter's layers in the UNet's device and dtype (the training-free adapter has none of its own)."""
        if self.adapter.self_from_base and not self.adapter.has_cross:
            return self.adapter
        key = (str(device), dtype)
        if key not in self._adapter_copies:
            self._adapter_copies[key] = copy.deepcopy(self.adapter).to(device=device, dtype=dtype)
        return self._adapter_copies[key]


def same_features(a: Features, b: Features, tolerance: float = PROBE_TOLERANCE_DEFAULT) -> bool:
    """Features of the same weights: the same blocks, each within ``tolerance`` (relative L2)."""
    ta, tb = a.tensors(), b.tensors()
    if set(ta) - set(tb) or any(ta[k].shape != tb[k].shape for k in ta):
        return False
    for k in ta:
        x, y = ta[k].float(), tb[k].float()
        if (x - y).norm() > tolerance * y.norm().clamp_min(1e-12):
            return False
    return True


def apply_identity(model, adapter: InvAdapter, reference: Reference, weight_self: float, weight_cross: float,
                   start_percent: float, end_percent: float, combine: str = "concat",
                   apply_to: str = "cond and uncond", mask: Optional[torch.Tensor] = None,
                   block_weights: Optional[BlockWeights] = None, rows: str = "image", positions: str = "own"):
    """InvAdapterApply: every fit checked before anything runs, then a clone of ``model`` with the EAA installed
    (the same clone without it when both strengths are 0). An MM-DiT (Flux, Chroma, Qwen-Image) gets the EAA inside its
    joint attention (``joint``): ``weight_cross`` has nothing to act on there (no cross-attention), ``rows`` and
    ``positions`` act there only."""
    check_served(model)
    check_reference_fits(model, reference)
    check_adapter_fits(adapter, model, reference)
    check_levels_fit(model, reference)
    check_magnitudes(model, adapter, reference)
    joint = is_joint(model)
    if weight_self == 0 and (joint or weight_cross == 0):
        return model.clone()
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): the adapter would "
                         f"never act; set start_percent below end_percent")
    if start_percent == end_percent:
        notify(f"start_percent equals end_percent ({start_percent}): the adapter acts on at most the one step at "
               f"that point; widen the range to see it")
    ms = model.get_model_object("model_sampling")
    if block_weights is not None and block_weights.misses(set(layout_of(model).levels.values())):
        notify(f"the block weights set levels this {model_family(model)} model does not have (its levels: "
               f"{', '.join(sorted(set(layout_of(model).levels.values())))}), so every block acts at full strength: "
               f"use a preset or sliders for its levels")
    if joint:
        return apply_joint(model, adapter, reference, weight_self, ms.percent_to_sigma(start_percent),
                           ms.percent_to_sigma(end_percent), block_weights, rows, positions, mask, apply_to, combine)
    app = Application(adapter, reference, model, weight_self, weight_cross,
                      sigma_start=ms.percent_to_sigma(start_percent), sigma_end=ms.percent_to_sigma(end_percent),
                      combine=combine, apply_to=apply_to, mask=mask, block_weights=block_weights)
    if reference.levels is not None:
        wanted = {app.layout.levels[name] for (kind, name), s in app.injection.scales.items() if s != 0}
        missing = sorted(wanted - set(reference.levels))
        if missing:
            notify(f"the reference keeps the features of {', '.join(reference.levels)} only (its capture setting), so "
                   f"the blocks at {', '.join(missing)} get no EAA: encode with capture 'all levels', or set their "
                   f"block weights to 0")
    return install(model, app)


def install(model, app: Application):
    """A clone of ``model`` with ``app`` installed; an earlier application of the same reference + adapter is
    replaced (with a warning), so applying twice never silently doubles the work or the effect."""
    m = model.clone()
    if _remove_application(m, app.key):
        # the same reference object reaches a model twice when one encoded reference feeds two chains, or when two
        # slots hold the same photo (ComfyUI's cache hands both the one encoding): say so, and what to change
        notify("this reference and adapter were already applied to the model: the same reference reached it twice "
               "(e.g. the same photo in both photo slots, or one reference wired to two InvAdapterApply nodes), so "
               "the later InvAdapterApply replaces the earlier one and only one identity is used. For two people, "
               "load two different photos (references); for one, remove one InvAdapterApply")
    patches = m.model_options["transformer_options"].get("patches", {})
    for kind in app.kinds:
        for slot, fn in zip(SLOTS[kind], (STASH[kind], ADD[kind])):
            if fn not in patches.get(slot, []):
                m.set_model_patch(fn, slot)
    m.set_model_patch(CacheHook(app), HOOK_SLOT)
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, app.key, app.apply_model_wrapper)
    m.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, app.key, app.outer_sample_wrapper)
    return m


def _remove_application(m, key: str) -> bool:
    patches = m.model_options["transformer_options"].get("patches", {})
    hooks = patches.get(HOOK_SLOT, [])
    kept = [h for h in hooks if h.app.key != key]
    removed = len(kept) != len(hooks)
    if removed:
        patches[HOOK_SLOT] = kept
        for kind in (ext.WrappersMP.APPLY_MODEL, ext.WrappersMP.OUTER_SAMPLE):
            m.remove_wrappers_with_key(kind, key)
    return removed


def applications(model) -> list[Application]:
    """The Inv-Adapter applications installed on a model (for nodes that inspect them, e.g. attention maps)."""
    return [h.app for h in model.model_options["transformer_options"].get("patches", {}).get(HOOK_SLOT, [])]
