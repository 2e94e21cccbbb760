"""The EAA inside an MM-DiT's joint attention (Flux, Chroma; ``arch.flux``): eq. 2-3 of docs/method.md §4 with the
block's own q, its QK-norm and its RoPE, through ComfyUI's list patches only (no replaced ``forward_orig``, no
class swap); InvAdapterApply routes Flux and Chroma here (``apply_joint``).

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
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.patcher_extension as ext
from comfy.ldm.flux.math import apply_rope1

from ..arch.flux import FluxLayout, split_kv
from ..arch.layout import layout_of, weights_key
from ..comfyui.notify import notify
from ..reference.capture import reference_pass
from ..reference.reference import Reference, same_sigma
from .injection import APPLY_TO, COMBINE_MODES, token_scale

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

    def add(self, attn: torch.Tensor, q: torch.Tensor, pe: Optional[torch.Tensor], extra_options: dict
            ) -> torch.Tensor:
        name = self.layout.block_at(extra_options)
        start = extra_options["img_slice"][0]
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


class JointApplication:
    """One identity on one MM-DiT model: a reference (its inversion and kept K/V, ``reference.encode.invert_latent``),
    a strength, a sigma window, block weights per level (``arch.levels.DIT_LEVELS``), rows and positions, a mask
    over the generation's image, cond-only, and how several photos combine."""

    def __init__(self, model, reference: Reference, weight: float, sigma_start: float = math.inf,
                 sigma_end: float = 0.0, block_weights: Optional[dict[str, float]] = None, rows: str = "image",
                 positions: str = "own", mask: Optional[torch.Tensor] = None, apply_to: str = APPLY_TO[0],
                 combine: str = COMBINE_MODES[0]):
        if apply_to not in APPLY_TO:
            raise ValueError(f"unknown apply_to {apply_to!r}; expected one of {APPLY_TO}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown combine mode {combine!r}; expected one of {COMBINE_MODES}")
        if rows not in ROWS:
            raise ValueError(f"unknown rows {rows!r}; expected one of {ROWS}")
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; expected one of {tuple(POSITIONS)}")
        layout = layout_of(model)
        if not isinstance(layout, FluxLayout):
            raise ValueError(f"the joint-attention EAA needs an MM-DiT ({FluxLayout.FAMILIES}); this model's "
                             f"network is a {type(layout).__name__[:-6]}")
        self.layout, self.reference, self.rows, self.positions = layout, reference, rows, positions
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.mask, self.apply_to, self.combine = mask, apply_to, combine
        self._scales: dict = {}  # batch layout -> (image scale, text scale)
        weights = block_weights or {}
        self.scales = {name: float(weight) * weights.get(level, 1.0) for name, level in layout.levels.items()}
        self.key = f"invadapter-joint:{next(_ids)}"
        self._kv: dict[float, dict] = {}  # sigma -> per-block K/V: made once per step, kept (the K/V store decision)

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def kv_at(self, base_model, sigma: float, device, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        found = next((kv for s, kv in self._kv.items() if same_sigma(s, sigma)), None)
        if found is not None:
            return found
        ref, layout = self.reference, self.layout
        features = ref.features.get(sigma, device=device)
        if features is None:  # off the inversion's schedule: one reference pass at the trajectory's latent there
            features = reference_pass(base_model, ref.latent_at(sigma).to(device), sigma, ref.conds, layout,
                                      cross=False)[1]
        side = ref.states.shape[-2:]
        pe = layout.positions(layout.token_grid(tuple(side)), POSITIONS[self.positions], device)
        kv = {}
        for name, f in features.self_attn.items():
            scale = self.scales.get(name, 0.0)
            if scale == 0:
                continue
            k, v = split_kv(f.to(device=device, dtype=dtype), layout.heads)  # [R, heads, N, d], R photos
            k = rope_rows(k, pe)  # every photo in the same frame; several photos: their tokens concatenated
            kv[name] = tuple(combine_photos(t, self.combine) for t in (k, v * scale))
        self._kv[float(sigma)] = kv
        return kv

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
            call = JointCall(self.layout, h * w)
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


def combine_photos(t: torch.Tensor, mode: str) -> torch.Tensor:
    """K or V of R photos of one identity [R, heads, N, d] as one reference [1, heads, N', d]: their tokens
    concatenated (N' = R x N) or averaged (every photo sits at the same positions, so averaging after RoPE equals
    RoPE of the average)."""
    if mode == "average":
        return t.mean(dim=0, keepdim=True)
    return t.transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[3])


def install_joint(model, app: JointApplication):
    """A clone of ``model`` with ``app`` installed: the two shared patches (once per model) and the per-call
    wrapper; the original model is untouched."""
    m = model.clone()
    patches = m.model_options["transformer_options"].get("patches", {})
    if joint_stash not in patches.get("attn1_patch", []):
        m.set_model_attn1_patch(joint_stash)
    if joint_add not in patches.get("attn1_output_patch", []):
        m.set_model_attn1_output_patch(joint_add)
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, app.key, app.apply_model_wrapper)
    return m


def apply_joint(model, adapter, reference: Reference, weight: float, sigma_start: float, sigma_end: float,
                block_weights=None, rows: str = "image", positions: str = "own", mask: Optional[torch.Tensor] = None,
                apply_to: str = APPLY_TO[0], combine: str = COMBINE_MODES[0]):
    """InvAdapterApply on an MM-DiT, its fits already checked (``application.apply_identity``): the training-free
    adapter (the block's own K/V projections) installed on a clone."""
    if not adapter.self_from_base or adapter.has_cross:
        raise ValueError(f"Inv-Adapter '{adapter.name}' has trained EAA layers; on an MM-DiT "
                         f"({FluxLayout.FAMILIES}) only 'init from model' runs: choose it in Inv-Adapter Loader")
    if reference.weights is not None and reference.weights != weights_key(model):
        # the UNet path recomputes features for other weights; the joint path uses the kept K/V as they are
        notify("the reference was encoded with other weights than this model (another checkpoint, or a LoRA added "
               "after Encode Reference); on Flux and Chroma its kept K/V are used as they are: encode the face with "
               "the model you sample with")
    levels = block_weights.self_attn if block_weights is not None else None
    app = JointApplication(model, reference, weight, sigma_start, sigma_end, levels, rows, positions, mask, apply_to,
                           combine)
    return install_joint(model, app)
