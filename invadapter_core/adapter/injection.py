"""The Embedded Attention Adapter inside ComfyUI's attention (docs/method.md §4, eq. 1-5): one unit for inference and
training.

Two list patches per attention kind, the same objects for every injection on every model:
- ``attn1_patch`` / ``attn2_patch`` (stash): keep the normed hidden states ``n`` the attention is about to see;
- ``attn1_output_patch`` / ``attn2_output_patch`` (add): for each injection active in this UNet call, add
  ``W_out · softmax(W_q n K_refᵀ / √d) V_ref`` (eq. 2-5), the linear part of ``to_out`` applied to E, which equals
  ``to_out(A + E) - to_out(A)`` because to_out is affine.
ComfyUI runs list patches in list order. Other packs' patches may change the token layout between the two (HyperTile
tiles the tokens into the batch, ToMe merges them) and undo it in their own output patch, so ``ordered_patches``
puts the stash first and the add last for every UNet call: the EAA always sees the untiled, unmerged tokens, and
since its term is row-wise in the queries, computing it there is exact under any such pair of patches.

What an injection needs in a UNet call is a ``Step``: the reference's K and V for each block, V already scaled by
lambda and the block weight. The application keeps them per sigma (``application``); the trainer projects them
with gradients for every batch (``project_kv``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..arch.layout import KINDS, Layout
from ..reference.capture import Features
from .attention_maps import RECORDER_KEY
from .block_weights import BlockWeights
from .eaa import InvAdapter, reference_attention, split_heads

CALL = "invadapter_call"  # transformer_options key of the per-UNet-call state
COMBINE_MODES = ("concat", "average")
PER_SAMPLE = "per sample"  # training: reference i serves generation sample i
APPLY_TO = ("cond and uncond", "cond only")
KV = dict  # (kind, block name) -> (K, V scaled), each [1|B, heads, N, d]
_ids = itertools.count()


@dataclass(frozen=True)
class Grouped:
    """Training with K photos per sample (``train.references``): rows iK .. iK+K-1 are sample i's photos, combined
    by ``mode`` as inference combines one identity's photos."""
    mode: str
    k: int


def combine_images(t: torch.Tensor, mode) -> torch.Tensor:
    """Several images of one identity ([R, N, C]) as one reference ([1, N', C]): token concat or average;
    ``Grouped``: each sample's K images ([B*K, N, C] -> [B, N', C])."""
    if isinstance(mode, Grouped):
        if mode.mode not in COMBINE_MODES:
            raise ValueError(f"unknown combine mode {mode.mode!r}; expected one of {COMBINE_MODES}")
        g = t.reshape(t.shape[0] // mode.k, mode.k, *t.shape[1:])
        return g.reshape(g.shape[0], -1, t.shape[-1]) if mode.mode == "concat" else g.mean(dim=1)
    if t.shape[0] == 1 or mode == PER_SAMPLE:
        return t
    if mode == "concat":
        return t.reshape(1, -1, t.shape[-1])
    if mode == "average":
        return t.mean(dim=0, keepdim=True)
    raise ValueError(f"unknown combine mode {mode!r}; expected one of {COMBINE_MODES}")


class EAAInjection:
    """One adapter's EAA on one network: what is fixed at install time (strengths per block, mask, rows)."""

    def __init__(self, layout: Layout, weight_self: float, weight_cross: float,
                 block_weights: Optional[BlockWeights] = None, mask: Optional[torch.Tensor] = None,
                 apply_to: str = "cond and uncond"):
        if apply_to not in APPLY_TO:
            raise ValueError(f"unknown apply_to {apply_to!r}; expected one of {APPLY_TO}")
        block_weights = block_weights or BlockWeights()
        self.uid = next(_ids)
        self.layout = layout
        self.mask, self.apply_to = mask, apply_to
        lam = {"self": float(weight_self), "cross": float(weight_cross)}
        # strength of every block, lambda x the level's block weight; zero blocks get no K/V and cost nothing
        self.scales = {(kind, name): lam[kind] * block_weights.scale(kind, layout.levels[name])
                       for kind in KINDS for name in layout.blocks}
        self._scales: dict = {}  # batch layout -> per-row/per-token scale (mask, cond only)
        self._bias: dict = {}  # (attention module, device, dtype) -> to_out's bias

    def active_kinds(self, has_cross: bool) -> tuple[str, ...]:
        kinds = [k for k in KINDS if any(s != 0 for (kind, _), s in self.scales.items() if kind == k)]
        return tuple(k for k in kinds if k == "self" or has_cross)

    # --- K/V of the reference ----------------------------------------------------------------------------------------
    def project_kv(self, adapter: InvAdapter, features: Features, combine: str, device=None, dtype=None) -> KV:
        """K and (scaled) V of every block with a non-zero strength; gradients reach the adapter's parameters when
        they are enabled (the trainer). ``device``/``dtype`` move the features first (inference)."""
        kv = {}
        for kind in KINDS:
            found = features.self_attn if kind == "self" else (features.cross_attn or {})
            for name, f in found.items():
                scale = self.scales.get((kind, name), 0.0)
                if scale == 0 or name not in self.layout.blocks:
                    continue
                f = f.to(device=device or f.device, dtype=dtype or f.dtype)
                if kind == "self":
                    layer = adapter.self_layer(name)
                    if layer is None:
                        continue
                    k, v = layer.project(combine_images(f, combine), self.layout.attention("self", name))
                else:
                    layer = adapter.cross_layer(name)
                    if layer is None:
                        continue
                    k, v = layer.project(f)  # W_agg is defined on one image's N tokens: aggregate, then combine
                    k, v = combine_images(k, combine), combine_images(v, combine)
                heads = self.layout.attention(kind, name).heads
                kv[(kind, name)] = (split_heads(k, heads), split_heads(v * scale if scale != 1 else v, heads))
        return kv

    # --- the term added in one block -----------------------------------------------------------------------------
    def delta(self, kind: str, name: str, q: torch.Tensor, kv: tuple, extra_options: dict,
              step: "Step") -> torch.Tensor:
        attn = self.layout.attention(kind, name)
        heads = extra_options["n_heads"]
        e = reference_attention(q, kv[0], kv[1], heads)
        out_layer = attn.to_out[0]
        d = out_layer(e) - self._out_bias(out_layer, e)  # W_out E: one matmul, to_out called as ComfyUI calls it
        scale = self._row_scale(extra_options, d)
        if scale is not None:
            d = d * scale
        recorder = extra_options.get(RECORDER_KEY)
        if recorder is not None and kind == "self" and recorder.wants(self.layout.levels[name], step.sigma):
            k = kv[0].transpose(1, 2).reshape(kv[0].shape[0], kv[0].shape[2], -1)
            recorder.record(step.key, q, k, heads, d, extra_options["activations_shape"][-2:],
                            extra_options.get("cond_or_uncond") or [0])
        return d

    def _out_bias(self, layer: torch.nn.Module, like: torch.Tensor) -> torch.Tensor:
        """to_out's bias as the layer applies it (cast, offloaded or patched weights included): to_out(0), once per
        layer, device and dtype (``reset`` at the end of every sampling run, when weights may change)."""
        key = (layer, like.device, like.dtype)
        if key not in self._bias:
            with torch.no_grad():
                self._bias[key] = layer(torch.zeros(1, 1, layer.in_features, device=like.device, dtype=like.dtype))
        return self._bias[key]

    def reset(self) -> None:
        self._bias.clear()

    def _row_scale(self, extra_options: dict, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-row (and with a mask, per-token) scale: 0 for uncond rows in "cond only" mode, the mask elsewhere.
        It depends only on the batch layout and the block's grid, so it is built once per layout."""
        if self.mask is None and self.apply_to != "cond only":
            return None
        chunks = tuple(extra_options.get("cond_or_uncond") or [0])
        h, w = extra_options["activations_shape"][-2:]
        layout = (chunks, like.shape[0], h, w, like.device, like.dtype)
        if layout not in self._scales:
            self._scales[layout] = self._build_scale(chunks, like.shape[0], h, w, like.device, like.dtype)
        return self._scales[layout]

    def _build_scale(self, chunks, batch, h, w, device, dtype) -> Optional[torch.Tensor]:
        return token_scale(self.mask, self.apply_to, chunks, batch, h, w, device, dtype)


def token_scale(mask: Optional[torch.Tensor], apply_to: str, chunks, batch: int, h: int, w: int, device, dtype
                ) -> Optional[torch.Tensor]:
    """The EAA term's scale per row and token of a batch of ``chunks`` (ComfyUI's cond_or_uncond) on an h x w token
    grid: the mask resized to the grid ([B, h x w, 1]), times 0 for the uncond rows in "cond only" mode ([B, 1, 1]
    without a mask); None when every term is added whole."""
    per_chunk = max(batch // len(chunks), 1)
    scale = None
    if mask is not None:
        m = torch.nn.functional.interpolate(mask[:, None].to(device, torch.float32), size=(h, w),
                                            mode="bilinear", align_corners=False)
        m = m.reshape(m.shape[0], h * w, 1)
        m = m.repeat((per_chunk + m.shape[0] - 1) // m.shape[0], 1, 1)[:per_chunk]
        scale = m.repeat(len(chunks), 1, 1).to(dtype)
    if apply_to == "cond only" and any(c == 1 for c in chunks):
        rows = torch.tensor([0.0 if c == 1 else 1.0 for c in chunks], device=device, dtype=dtype)
        rows = rows.repeat_interleave(per_chunk)[:, None, None]
        scale = rows if scale is None else scale * rows
    return scale


@dataclass
class Step:
    """One injection's share of one UNet call."""
    injection: EAAInjection
    kv: KV
    sigma: float = 0.0
    key: str = ""  # the application's key (attention maps are recorded per application)


@dataclass
class Call:
    """Per UNet call: the active steps, and the stashed attention inputs between a block's input and output patch."""
    steps: list[Step] = field(default_factory=list)
    pending: dict = field(default_factory=dict)
    sigma: float = 0.0

    def add(self, kind: str, n: torch.Tensor, out: torch.Tensor, extra_options: dict) -> torch.Tensor:
        if not self.steps:
            return out
        name = self.steps[0].injection.layout.block_at(extra_options)  # every injection on a model: one layout
        q = None
        for step in self.steps:
            kv = step.kv.get((kind, name))
            if kv is None:
                continue
            if q is None:  # every injection on a model shares the block's own W_q
                q = step.injection.layout.attention(kind, name).to_q(n)
            out = out + step.injection.delta(kind, name, q, kv, extra_options, step)
        return out


class _Stash:
    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, n, context, value, extra_options):
        call = extra_options.get(CALL)
        if call is not None:
            call.pending[self.kind] = n
        return n, context, value


class _Add:
    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, out, extra_options):
        call = extra_options.get(CALL)
        if call is None:
            return out
        n = call.pending.pop(self.kind, None)
        return out if n is None else call.add(self.kind, n, out, extra_options)


STASH = {"self": _Stash("self"), "cross": _Stash("cross")}
ADD = {"self": _Add("self"), "cross": _Add("cross")}
SLOTS = Layout.PATCH_SLOTS


def patch_lists() -> dict[str, list]:
    """The patch lists for a direct apply_model call (the trainer's path)."""
    return {slot: [fn] for kind in KINDS for slot, fn in zip(SLOTS[kind], (STASH[kind], ADD[kind]))}


def ordered_patches(patches: dict) -> Optional[dict]:
    """A copy of ``patches`` with the stashes first and the adds last (None when they already are): other packs'
    layout-changing patch pairs then run inside ours."""
    changed = {}
    for kind in KINDS:
        first, last = SLOTS[kind]
        for slot, fn, at in ((first, STASH[kind], 0), (last, ADD[kind], -1)):
            lst = patches.get(slot)
            if lst and fn in lst and lst[at] is not fn:
                rest = [p for p in lst if p is not fn]
                changed[slot] = [fn] + rest if at == 0 else rest + [fn]
    if not changed:
        return None
    return {**patches, **changed}


def transformer_options(steps: list[Step]) -> dict:
    """transformer_options for a direct ``apply_model`` call with these steps (the trainer's path)."""
    return {"patches": patch_lists(), CALL: Call(steps)}
