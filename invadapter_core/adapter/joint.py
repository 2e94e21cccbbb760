"""The EAA inside an MM-DiT's joint attention (Flux, Chroma, Qwen-Image; ``arch.flux``, ``arch.qwen_image``): eq. 2-3
of docs/method.md §4 with the block's own q, its QK-norm and its RoPE, through ComfyUI's list patches only (no
replaced ``forward_orig``, no class swap); InvAdapterApply routes Flux, Chroma and Qwen-Image here (``apply_joint``).

Two list patches, the same objects for every application on every model:
- ``attn1_patch`` (``joint_stash``): keeps the block's q (after QK-norm, before RoPE) and pe in the block's
  ``extra_options`` (one dict per block, seen by both patches) and changes nothing;
- ``attn1_output_patch`` (``joint_add``): adds ``λ·E`` to the joint output before the block's output projection,
  ``E = softmax(RoPE(q) RoPE(K_ref)ᵀ / √d) V_ref`` per head: ``proj(A + λE)``, eq. 3 exactly (in a single block the
  projection is the attention half of ``linear2``).
By default only the generation's image-token rows get the term (DynaIP's decoupling: the noisy-image branch, not the
text rows); ``rows="image and text"`` adds it to both. A mask confines the term to a region of the generation's image
tokens (two identities: two masks; the text rows then get none), "cond only" leaves the uncond rows untouched,
several photos' K/V are concatenated or averaged (InvAdapterApply's options, as ``injection`` reads them). Tokens
after the generation's image (Kontext's context image) never get it. The reference's K/V are the block's own
projections of the reference's image tokens (the training-free adapter), RoPE'd once per step at ``positions`` "own"
(the generation's frame) or "shifted" (index 1 on the frame axis, where Kontext puts its context image). The term depends on q only, so another patch that changes
the joint K/V (FluxKVCache) composes with it in either order.

Qwen-Image (``arch.qwen_image``) has no ``attn1_output_patch``: there the term is added in ComfyUI's
``optimized_attention_override`` slot (``joint_override``, set per network call and chained to what was there), where
q is already RoPE'd; the layout's ``ADDS_TERM`` says which.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.patcher_extension as ext
from comfy.ldm.flux.math import apply_rope1

from ..arch.flux import FluxLayout
from ..arch.layout import layout_of, weights_key
from ..arch.qwen_image import QwenImageLayout
from ..comfyui.notify import notify
from ..reference.capture import Features, reference_pass
from ..reference.reference import Reference
from .injection import APPLY_TO, COMBINE_MODES, token_scale
from .joint_store import JOINT_CACHE_SLOT, JointCacheHook, JointKVCache, combine_photos, reference_kv

JOINT = "invadapter_joint"  # transformer_options key of the per-call state
STASHED = "invadapter_joint_q"  # extra_options key between a block's two patches
ROWS = ("image", "image and text")
POSITIONS = {"own": 0.0, "shifted": 1.0}  # RoPE frame index of the reference's tokens
_ids = itertools.count()


def rope_rows(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """RoPE as the network applies it (``comfy.ldm.flux.math``) to tokens [B, heads, n, d] with their pe."""
    return apply_rope1(x, pe)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v for q [B, heads, n, d] against one reference's k, v [1 | B, heads, N, d]; returns
    [B, n, heads x d] (the joint output's layout). One reference for every sample folds the batch into the query
    tokens: one SDPA call, no per-sample K/V copies."""
    b, h, n, d = q.shape
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if k.shape[0] == 1 and b > 1:
        e = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1).reshape(1, h, b * n, d), k, v)
        return e.reshape(h, b, n, d).permute(1, 2, 0, 3).reshape(b, n, h * d)
    e = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return e.transpose(1, 2).reshape(b, n, h * d)


def project_joint(layer, f: torch.Tensor) -> torch.Tensor:
    """A trained joint EAA's reference K/V of one block: its ``to_k`` / ``to_v`` [hidden, hidden] (an
    ``adapter.eaa.SelfEAA``) applied to the kept K and V, ``f`` [.., N, 2 x hidden] in ``arch.flux.join_kv``'s layout
    (per token K's heads, then V's), the same layout back. Identity maps are the training-free EAA; on V a map of the
    kept V is the paper's W'v of the block input reparametrised (V = W_v x, W_v square)."""
    hidden = f.shape[-1] // 2
    dtype = layer.to_k.weight.dtype
    return torch.cat((layer.to_k(f[..., :hidden].to(dtype)), layer.to_v(f[..., hidden:].to(dtype))), dim=-1)


@dataclass
class JointStep:
    """One application's share of one network call: per block, the reference's K (RoPE'd) and V (scaled by λ and
    the block weight), each [1, heads, N, d]."""
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rows: str = "image"
    image_scale: Optional[torch.Tensor] = None  # [B, image tokens | 1, 1]: mask and cond-only rows (None: whole)
    text_scale: Optional[torch.Tensor] = None  # [B, 1, 1] on the text rows: cond-only; 0 with a mask


@dataclass
class JointCall:
    """Per network call: the active steps and the generation's own image-token count."""
    layout: FluxLayout
    image_tokens: int
    steps: list[JointStep] = field(default_factory=list)

    def add(self, attn: torch.Tensor, q: torch.Tensor, pe: Optional[torch.Tensor], extra_options: dict,
            start: Optional[int] = None) -> torch.Tensor:
        """``attn`` with the steps' terms added; ``q`` before RoPE with its ``pe``, or after it (``pe`` None);
        ``start``: the first image row (default: the options' ``img_slice``)."""
        name = self.layout.block_at(extra_options)
        start = extra_options["img_slice"][0] if start is None else start
        end = start + self.image_tokens
        rotated: dict[int, torch.Tensor] = {}  # first row -> RoPE'd q of rows [first, end)
        for step in self.steps:
            kv = step.kv.get(name)
            if kv is None:
                continue
            first = start if step.rows == "image" else 0
            if first not in rotated:
                rows = q[:, :, first:end]
                rotated[first] = rows if pe is None else rope_rows(rows, pe[:, :, first:end])
            e = joint_attention(rotated[first], kv[0], kv[1])
            if step.image_scale is not None:  # a mask, cond only
                text = start - first
                e = torch.cat((e[:, :text] * step.text_scale.to(e.dtype), e[:, text:] * step.image_scale.to(e.dtype)),
                              dim=1)
            attn = torch.cat((attn[:, :first], attn[:, first:end] + e.to(attn.dtype), attn[:, end:]), dim=1)
        return attn


def joint_stash(q, k, v, pe=None, attn_mask=None, extra_options=None):
    call = extra_options.get(JOINT) if extra_options is not None else None
    if call is not None and call.steps:
        extra_options[STASHED] = (q, pe)
    return {}


def joint_add(attn, extra_options):
    stashed = extra_options.pop(STASHED, None)
    call = extra_options.get(JOINT)
    if stashed is None or call is None:
        return attn
    return call.add(attn, stashed[0], stashed[1], extra_options)


def joint_override(previous=None):
    """ComfyUI's ``optimized_attention_override`` for layouts whose attention has no output patch (Qwen-Image,
    ``ADDS_TERM`` "attention override"): runs the attention (through ``previous``, the override that was in the slot,
    so it chains), then adds the terms. Its q is after RoPE, [B, heads, L, d] (``skip_reshape``); the image rows
    follow the text and precede an edit model's reference images (``reference_image_num_tokens``)."""
    def override(func, *args, **kwargs):
        out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        call = options.get(JOINT)
        if call is None or not call.steps or not kwargs.get("skip_reshape"):
            return out
        q = args[0] if args else kwargs["q"]
        start = q.shape[2] - call.image_tokens - sum(options.get("reference_image_num_tokens", ()))
        return call.add(out, q, None, options, start)
    return override


class JointApplication:
    """One identity on one MM-DiT model: a reference (its inversion and kept K/V, ``reference.encode.invert_latent``),
    a strength, a sigma window, block weights per level (``arch.levels.DIT_LEVELS``), rows and positions, a mask
    over the generation's image, cond-only, and how several photos combine."""

    def __init__(self, model, reference: Reference, weight: float, sigma_start: float = math.inf,
                 sigma_end: float = 0.0, block_weights: Optional[dict[str, float]] = None, rows: str = "image",
                 positions: str = "own", mask: Optional[torch.Tensor] = None, apply_to: str = APPLY_TO[0],
                 combine: str = COMBINE_MODES[0], reuse_features: bool = True, keep_kv: bool = True, adapter=None):
        if apply_to not in APPLY_TO:
            raise ValueError(f"unknown apply_to {apply_to!r}; expected one of {APPLY_TO}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown combine mode {combine!r}; expected one of {COMBINE_MODES}")
        if rows not in ROWS:
            raise ValueError(f"unknown rows {rows!r}; expected one of {ROWS}")
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; expected one of {tuple(POSITIONS)}")
        layout = layout_of(model)
        if not isinstance(layout, FluxLayout):  # Flux's and the layouts built on it (arch.qwen_image)
            raise ValueError(f"the joint-attention EAA needs an MM-DiT ({FluxLayout.FAMILIES}; "
                             f"{QwenImageLayout.FAMILIES}); this model's network is a {type(layout).__name__[:-6]}")
        self.layout, self.reference, self.rows, self.positions = layout, reference, rows, positions
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.adapter = adapter  # a trained joint EAA (adapter.eaa.InvAdapter) or None: the block's own K/V
        self.mask, self.apply_to, self.combine = mask, apply_to, combine
        self._scales: dict = {}  # batch layout -> (image scale, text scale)
        weights = block_weights or {}
        self.scales = {name: float(weight) * weights.get(level, 1.0) for name, level in layout.levels.items()}
        self.key = f"invadapter-joint:{next(_ids)}"
        # reuse_features False: the fallback when nothing fits, one reference pass per step at the trajectory's
        # latent and nothing kept; keep_kv False: K/V made from the kept features at every step, no store
        self.reuse_features = reuse_features
        self.cache = JointKVCache(model.load_device, keep=keep_kv and reuse_features)
        self.passes = 0  # reference passes made while sampling (tests and the benchmark read it)
        self._pe: dict = {}  # device -> the reference's RoPE (the same every step)

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def kv_at(self, base_model, sigma: float, device, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The reference's K (RoPE'd) and V (scaled) per block at ``sigma``: from the run's K/V store when this
        schedule ran before (``joint_store``), else made from the kept features or one reference pass."""
        kv = self.cache.get(sigma, device)
        if kv is not None:
            return kv
        kv = reference_kv(self.layout, self.features_at(base_model, sigma, device), self._positions(device),
                          self.scales, device, dtype, self._projection(device), self.combine)
        self.cache.put(sigma, kv, dtype, device)
        return kv

    def features_at(self, base_model, sigma: float, device) -> Features:
        found = self.reference.features.get(sigma, device=device) if self.reuse_features else None
        if found is None:  # not kept (off the inversion's schedule, a subset of steps, keep_features off)
            found = self._reference_pass(base_model, sigma, device)
        return found

    def _reference_pass(self, base_model, sigma: float, device) -> Features:
        """One reference pass at the trajectory's latent at ``sigma``, recording only the blocks this application
        uses (of those the reference keeps) and running no block after the last of them."""
        ref, layout = self.reference, self.layout
        kept = layout.at_levels(set(ref.levels) if ref.levels is not None else None)
        used = {name for name, scale in self.scales.items() if scale != 0 and (kept is None or name in kept)}
        self.passes += 1
        return reference_pass(base_model, ref.latent_at(sigma).to(device), sigma, ref.conds, layout, cross=False,
                              keep=used, features_only=True)[1]

    def _projection(self, device):
        """A trained adapter's per-block K/V maps (``project_joint``), or None: the block's own K/V."""
        if self.adapter is None:
            return None

        def project(name: str, f: torch.Tensor) -> torch.Tensor:
            layer = self.adapter.self_layer(name)
            return f if layer is None or layer.to_k is None else project_joint(layer.to(device), f.to(device))
        return project

    def _positions(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._pe:
            layout = self.layout
            side = tuple(self.reference.states.shape[-2:])
            self._pe[key] = layout.positions(layout.token_grid(side), POSITIONS[self.positions], device)
        return self._pe[key]

    # --- runs (what the K/V store is kept for) ------------------------------------------------------------------
    def outer_sample_wrapper(self, executor, *args, **kwargs):
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        # the store keeps the steps this application acts on (a window keeps only its own steps)
        self.cache.begin_run(weights_key(executor.class_obj.model_patcher),
                             [float(s) for s in sigmas if self.active(float(s))])
        try:
            return executor(*args, **kwargs)
        finally:
            self.cache.end_run()

    def packs_for_run(self) -> list:
        """What ComfyUI should load beside the model for this run (``joint_store.JointCacheHook``)."""
        run = self.cache.run
        if run is None or not self.reuse_features:
            return []
        return self.cache.packs_for_run(run[1], self.reference.features.packs())

    def apply_model_wrapper(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        sigma = float(t.reshape(-1)[0])
        if not self.active(sigma):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        base = executor.class_obj
        kv = self.kv_at(base, sigma, x.device, base.get_dtype_inference())
        options = transformer_options.copy()
        call = options.get(JOINT)
        if call is None:
            h, w = self.layout.token_grid(tuple(x.shape[-2:]))
            call = JointCall(self.layout, h * w * (x.shape[2] if x.ndim == 5 else 1))
            if self.layout.ADDS_TERM == "attention override":  # once per call, chained to what was in the slot
                options["optimized_attention_override"] = joint_override(options.get("optimized_attention_override"))
        image_scale, text_scale = self.scales_for(transformer_options.get("cond_or_uncond") or [0], x)
        step = JointStep(kv, self.rows, image_scale, text_scale)
        options[JOINT] = JointCall(call.layout, call.image_tokens, call.steps + [step])
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    def scales_for(self, chunks, x: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The term's scale on the image-token rows (mask x cond-only) and on the text rows (cond-only), built once
        per batch layout (they depend on nothing else)."""
        if self.mask is None and self.apply_to == APPLY_TO[0]:
            return None, None
        h, w = self.layout.token_grid(tuple(x.shape[-2:]))
        key = (tuple(chunks), x.shape[0], h, w, x.device, x.dtype)
        if key not in self._scales:
            image = token_scale(self.mask, self.apply_to, chunks, x.shape[0], h, w, x.device, x.dtype)
            text = token_scale(None, self.apply_to, chunks, x.shape[0], h, w, x.device, x.dtype)
            if self.mask is not None:  # text tokens are in no region: a masked identity leaves them alone
                text = torch.zeros(x.shape[0], 1, 1, device=x.device, dtype=x.dtype)
            self._scales[key] = (image, text) if image is not None else (None, None)
        return self._scales[key]



def install_joint(model, app: JointApplication):
    """A clone of ``model`` with ``app`` installed: the two shared patches (once per model), the per-call and
    per-run wrappers and the hook through which ComfyUI loads its K/V store; the original model is untouched."""
    m = model.clone()
    patches = m.model_options["transformer_options"].get("patches", {})
    if app.layout.ADDS_TERM == "output patch":  # else the term is added in the attention override (per call)
        if joint_stash not in patches.get("attn1_patch", []):
            m.set_model_attn1_patch(joint_stash)
        if joint_add not in patches.get("attn1_output_patch", []):
            m.set_model_attn1_output_patch(joint_add)
    m.set_model_patch(JointCacheHook(app), JOINT_CACHE_SLOT)
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, app.key, app.apply_model_wrapper)
    m.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, app.key, app.outer_sample_wrapper)
    return m


def apply_joint(model, adapter, reference: Reference, weight: float, sigma_start: float, sigma_end: float,
                block_weights=None, rows: str = "image", positions: str = "own", mask: Optional[torch.Tensor] = None,
                apply_to: str = APPLY_TO[0], combine: str = COMBINE_MODES[0]):
    """InvAdapterApply on an MM-DiT, its fits already checked (``application.apply_identity``, ``adapter.fit``: a
    trained file names its architecture): the training-free adapter (the block's own K/V projections) or a trained
    joint EAA (its K/V maps, ``project_joint``) installed on a clone."""
    if adapter.has_cross:  # an MM-DiT has no cross-attention; a joint EAA file has none (the trainer refuses it)
        raise ValueError(f"Inv-Adapter '{adapter.name}' has cross-attention EAA layers, which an MM-DiT "
                         f"({FluxLayout.FAMILIES}) does not have: load a file trained for this model, or choose "
                         f"'init from model' in Inv-Adapter Loader")
    if reference.weights is not None and reference.weights != weights_key(model):
        # the UNet path recomputes features for other weights; the joint path uses the kept K/V as they are
        notify("the reference was encoded with other weights than this model (another checkpoint, or a LoRA added "
               "after Encode Reference); on an MM-DiT its kept K/V are used as they are: encode the face with "
               "the model you sample with")
    levels = block_weights.self_attn if block_weights is not None else None
    app = JointApplication(model, reference, weight, sigma_start, sigma_end, levels, rows, positions, mask, apply_to,
                           combine, adapter=None if adapter.self_from_base else adapter)
    return install_joint(model, app)
