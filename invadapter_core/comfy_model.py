"""The one module that talks to ComfyUI's ModelPatcher: the reference pass and the EAA patches.

Generation side, per InvAdapterApply (an ``Application``):
- an APPLY_MODEL wrapper: at each UNet call, the reference features at that call's sigma (from the reference's
  cache, or one fresh reference pass per sigma, shared by every batch chunk) are put into transformer_options;
- list patches, never replace patches (so other packs' attention patches keep working and chain):
  attn1_patch/attn2_patch stash the normed hidden states ``n``; attn1_output_patch/attn2_output_patch add
  ``lambda * to_out_linear(E)`` with E the EAA attention of eq. 2-5 (to_out is affine, so this equals
  ``to_out(A + lambda E)``).
Reference side: ``reference_pass`` runs the frozen UNet with only capture patches (no wrappers, no other packs'
patches, no ControlNet) and records every block's self- and cross-attention inputs.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import comfy.cli_args
import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.patcher_extension as ext

from .attention_maps import RECORDER_KEY
from .block_weights import BlockWeights, call_level
from .blocks import block_key, block_name
from .eaa import InvAdapter, output_projection_delta, reference_attention
from .reference import Features, Reference

log = logging.getLogger("InvAdapter")
COMBINE_MODES = ("concat", "average")
PER_SAMPLE = "per sample"  # training: reference i serves generation sample i (no combining)
APPLY_TO = ("cond and uncond", "cond only")


class ModelFamilyError(ValueError):
    """A model of a family the reference or the adapter was not made for."""


def eaa_attention(device: torch.device):
    """The attention kernel for the EAA term: ComfyUI's own choice (SDPA, xformers, sage, ... as the user set it),
    except where ComfyUI only fell back to chunked sub-quadratic attention because the device is the CPU and no
    flag chose: there torch's SDPA (which has a memory-efficient CPU kernel) was 3x faster on the reference
    attention's shapes (benchmarks/overhead.py)."""
    args = comfy.cli_args.args
    chosen = args.use_split_cross_attention or args.use_quad_cross_attention
    if device.type == "cpu" and not chosen and comfy_attention.optimized_attention is comfy_attention.attention_sub_quad:
        return comfy_attention.attention_pytorch
    return comfy_attention.optimized_attention


def model_family(model) -> str:
    return type(model.model.model_config).__name__


def transformer_blocks(model) -> dict[str, torch.nn.Module]:
    """Every BasicTransformerBlock of the UNet, by block name, in execution order."""
    unet = model.get_model_object("diffusion_model")
    stages = [("input", list(unet.input_blocks)), ("middle", [unet.middle_block]), ("output", list(unet.output_blocks))]
    found = {}
    for stage, seqs in stages:
        for number, seq in enumerate(seqs):
            for module in (seq if seq is not None else []):
                for index, tb in enumerate(getattr(module, "transformer_blocks", [])):
                    found[block_name((stage, number, index))] = tb
    if not found:
        raise ModelFamilyError(f"no transformer blocks found in this {model_family(model)} UNet: Inv-Adapter needs an "
                               f"SD1.x/SD2.x/SDXL-style UNet with spatial transformers")
    return found


def block_dims(blocks: dict[str, torch.nn.Module]) -> dict[str, tuple[int, int]]:
    return {name: (tb.attn1.to_q.in_features, tb.attn1.to_q.out_features) for name, tb in blocks.items()}


def check_family(model, reference: Reference) -> None:
    family = model_family(model)
    if reference.family != family:
        raise ModelFamilyError(f"this reference was encoded with a {reference.family} model and cannot be applied to "
                               f"a {family} model: encode the face again with this checkpoint (InvAdapterEncodeReference)")


def model_key(model) -> tuple:
    """In-process identity of a model's weights: the BaseModel and its weight patches (LoRA)."""
    return (id(model.model), model.patches_uuid)


def warn_if_features_from_another_model(model, reference: Reference) -> None:
    if reference.model_key is not None and reference.features.entries and reference.model_key != model_key(model):
        log.warning("Inv-Adapter: the reference's kept features were computed with another model or LoRA than the "
                    "one it is applied to; they are used as they are (re-encode the face with this model for "
                    "features of its own)")


class FeatureCapture:
    """attn1_patch / attn2_patch for a reference pass: records the block inputs, changes nothing."""

    def __init__(self, cross: bool):
        self.self_attn: dict[str, torch.Tensor] = {}
        self.cross_attn: Optional[dict[str, torch.Tensor]] = {} if cross else None

    def capture_self(self, n, context, value, extra_options):
        self.self_attn[block_name(block_key(extra_options))] = n.detach()
        return n, context, value

    def capture_cross(self, n, context, value, extra_options):
        self.cross_attn[block_name(block_key(extra_options))] = n.detach()
        return n, context, value

    def features(self) -> Features:
        return Features(self.self_attn, self.cross_attn)


def reference_pass(base_model, x: torch.Tensor, sigma, context: torch.Tensor, cross: bool
                   ) -> tuple[torch.Tensor, Features]:
    """One frozen-UNet pass of the reference latent at ``sigma`` (a float, or one per sample): (x0 prediction,
    captured features). ``base_model`` is the loaded BaseModel; the fresh transformer_options hold only the
    capture patches, so no wrapper, no other pack's patch and no ControlNet reaches the reference branch.
    """
    capture = FeatureCapture(cross)
    patches = {"attn1_patch": [capture.capture_self]}
    if cross:
        patches["attn2_patch"] = [capture.capture_cross]
    if torch.is_tensor(sigma) and sigma.numel() > 1:
        sigmas = sigma.to(device=x.device, dtype=torch.float32)
    else:
        sigmas = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=torch.float32)
    ctx = context.to(x.device)
    if ctx.shape[0] != x.shape[0]:
        ctx = ctx.expand(x.shape[0], *context.shape[1:])
    with torch.no_grad():
        denoised = base_model.apply_model(x, sigmas, c_crossattn=ctx, transformer_options={"patches": patches})
    return denoised, capture.features()


def combine_images(f: torch.Tensor, mode: str) -> torch.Tensor:
    """Several images of one identity ([R, N, C]) into one reference ([1, N', C]): token concat or average."""
    if f.shape[0] == 1 or mode == PER_SAMPLE:
        return f
    if mode == "concat":
        return f.reshape(1, -1, f.shape[-1])
    if mode == "average":
        return f.mean(dim=0, keepdim=True)
    raise ValueError(f"unknown combine mode {mode!r}; expected one of {COMBINE_MODES}")


@dataclass
class Step:
    """What one UNet call needs: the reference features at its sigma, and the stashed attention inputs."""
    sigma: float
    features: Features
    pending: dict = field(default_factory=dict)  # "self"/"cross" -> n, between a block's input and output patch


class Application:
    """One InvAdapterApply on one cloned model: adapter + reference + strengths, as ComfyUI patches."""

    # The trainer sets this: always use the adapter's own (float32, trainable) parameters, even when the UNet runs in
    # half precision or under autocast; the EAA layers cast their inputs, so gradients still reach the parameters.
    adapter_as_is = False

    def __init__(self, adapter: InvAdapter, reference: Reference, blocks: dict[str, torch.nn.Module],
                 weight_self: float, weight_cross: float, sigma_start: float, sigma_end: float,
                 combine: str = "concat", apply_to: str = "cond and uncond", mask: Optional[torch.Tensor] = None,
                 block_weights: Optional[BlockWeights] = None, reuse_features: bool = True):
        self.adapter, self.reference, self.blocks = adapter, reference, blocks
        self.weight_self, self.weight_cross = float(weight_self), float(weight_cross)
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.combine, self.apply_to, self.mask = combine, apply_to, mask
        self.block_weights = block_weights or BlockWeights()
        self.reuse_features = reuse_features  # False: the paper's pipeline, a fresh reference pass at every call
        self.key = f"invadapter:{reference.uid}:{id(adapter):x}"
        self._kv_memo: tuple = (None, {})  # (features, {(kind, block): (k, v)}): shared by a step's batch chunks
        self._adapter_copies: dict = {}
        self._scales: dict = {}  # batch layout -> per-row/per-token scale (mask, cond only)

    @property
    def uses_cross(self) -> bool:
        return self.adapter.has_cross and self.weight_cross != 0

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    # --- per UNet call -------------------------------------------------------------------------------------------
    def features_at(self, base_model, sigma: float, device) -> Features:
        cache = self.reference.features
        found = cache.get(sigma, need_cross=self.uses_cross) if self.reuse_features else None
        if found is None:
            x_ref = self.reference.latent_at(sigma).to(device)
            _, found = reference_pass(base_model, x_ref, sigma, self.reference.context, cross=self.uses_cross)
            cache.passes += 1
            if self.reuse_features:
                cache.put(sigma, found)
        return found

    def apply_model_wrapper(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        sigma = float(t.reshape(-1)[0])
        if not self.active(sigma):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        features = self.features_at(executor.class_obj, sigma, x.device)
        options = transformer_options.copy()
        options[self.key] = Step(sigma, features)
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        self.reference.features.start_run()
        try:
            return executor(*args, **kwargs)
        finally:
            self._kv_memo = (None, {})
            self.reference.features.end_run()
            offload = comfy.model_management.unet_offload_device()
            self.reference.features.to_(offload)  # the cache waits on the offload device between runs

    def transformer_options(self, features: Features, sigma: float = 0.0) -> dict:
        """transformer_options for a direct ``apply_model`` call with this application (the trainer's path)."""
        return {"patches": {name: [fn] for name, fn in self.patches().items()}, self.key: Step(sigma, features)}

    def patches(self) -> dict[str, Callable]:
        """ComfyUI list-patch slot -> callable (list patches stack with other packs' instead of replacing them)."""
        found = {"attn1_patch": self.stash_self, "attn1_output_patch": self.add_self}
        if self.uses_cross:
            found.update(attn2_patch=self.stash_cross, attn2_output_patch=self.add_cross)
        return found

    # --- attention patches ---------------------------------------------------------------------------------------
    def stash_self(self, n, context, value, extra_options):
        step = extra_options.get(self.key)
        if step is not None:
            step.pending["self"] = n
        return n, context, value

    def stash_cross(self, n, context, value, extra_options):
        step = extra_options.get(self.key)
        if step is not None:
            step.pending["cross"] = n
        return n, context, value

    def add_self(self, out, extra_options):
        return self._add("self", out, extra_options)

    def add_cross(self, out, extra_options):
        return self._add("cross", out, extra_options)

    def _add(self, kind: str, out: torch.Tensor, extra_options: dict) -> torch.Tensor:
        step = extra_options.get(self.key)
        if step is None:
            return out
        n = step.pending.pop(kind, None)
        key = block_key(extra_options)
        name = block_name(key)
        level = call_level(extra_options)
        weight = (self.weight_self if kind == "self" else self.weight_cross) * self.block_weights.scale(kind, level)
        if n is None or weight == 0:
            return out
        kv = self._reference_kv(kind, key, name, step, out)
        if kv is None:
            return out
        attn = self.blocks[name].attn1 if kind == "self" else self.blocks[name].attn2
        q = attn.to_q(n)
        e = reference_attention(q, kv[0], kv[1], extra_options["n_heads"], eaa_attention(q.device))
        delta = output_projection_delta(attn.to_out, e)
        scale = self._row_scale(extra_options, delta)
        delta = delta * (weight if scale is None else weight * scale)
        recorder = extra_options.get(RECORDER_KEY)
        if recorder is not None and kind == "self" and recorder.wants(level, step.sigma):
            recorder.record(self.key, q, kv[0], extra_options["n_heads"], delta,
                            extra_options["activations_shape"][-2:], extra_options.get("cond_or_uncond") or [0])
        return out + delta

    def _reference_kv(self, kind, key, name, step: Step, like: torch.Tensor):
        memo_features, memo = self._kv_memo
        if memo_features is not step.features:
            memo = {}
            self._kv_memo = (step.features, memo)
        if (kind, name) in memo:
            return memo[(kind, name)]
        adapter = self._adapter_on(like.device, like.dtype)
        if kind == "self":
            layer = adapter.self_layer(key)
            f = step.features.self_attn.get(name)
            kv = None if layer is None or f is None else \
                layer.project(combine_images(f.to(like.device, like.dtype), self.combine), self.blocks[name].attn1)
        else:
            layer = adapter.cross_layer(key)
            f = (step.features.cross_attn or {}).get(name)
            if layer is None or f is None:
                kv = None
            else:  # aggregate each image's tokens first: W_agg is defined on one image's N tokens
                k, v = layer.project(f.to(like.device, like.dtype))
                kv = (combine_images(k, self.combine), combine_images(v, self.combine))
        memo[(kind, name)] = kv
        return kv

    def _adapter_on(self, device, dtype) -> InvAdapter:
        if self.adapter_as_is or (self.adapter.self_from_base and not self.adapter.has_cross):
            return self.adapter  # nothing of its own to move
        first = next(self.adapter.parameters())
        if first.device == device and first.dtype == dtype:
            return self.adapter  # used as is (the trainer's gradients flow into these parameters)
        key = (str(device), dtype)
        if key not in self._adapter_copies:
            self._adapter_copies[key] = copy.deepcopy(self.adapter).to(device=device, dtype=dtype)
        return self._adapter_copies[key]

    def _row_scale(self, extra_options: dict, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-row (and with a mask, per-token) scale: 0 for uncond rows in "cond only" mode, the mask elsewhere.
        It depends only on the batch layout and the block's grid, so it is built once per layout, not per call."""
        if self.mask is None and self.apply_to != "cond only":
            return None
        chunks = tuple(extra_options.get("cond_or_uncond") or [0])
        h, w = extra_options["activations_shape"][-2:]
        layout = (chunks, like.shape[0], h, w, like.device, like.dtype)
        if layout not in self._scales:
            self._scales[layout] = self._build_scale(chunks, like.shape[0], h, w, like.device, like.dtype)
        return self._scales[layout]

    def _build_scale(self, chunks, batch, h, w, device, dtype) -> Optional[torch.Tensor]:
        per_chunk = max(batch // len(chunks), 1)
        scale = None
        if self.mask is not None:
            m = torch.nn.functional.interpolate(self.mask[:, None].to(device, torch.float32), size=(h, w),
                                                mode="bilinear", align_corners=False)
            m = m.reshape(m.shape[0], h * w, 1)
            m = m.repeat((per_chunk + m.shape[0] - 1) // m.shape[0], 1, 1)[:per_chunk]
            scale = m.repeat(len(chunks), 1, 1).to(dtype)
        if self.apply_to == "cond only" and any(c == 1 for c in chunks):
            rows = torch.tensor([0.0 if c == 1 else 1.0 for c in chunks], device=device, dtype=dtype)
            rows = rows.repeat_interleave(per_chunk)[:, None, None]
            scale = rows if scale is None else scale * rows
        return scale


def install(model, app: Application):
    """A clone of ``model`` with ``app`` installed; an earlier application of the same reference+adapter is
    replaced (with a warning), so applying twice never silently doubles the work or the effect."""
    m = model.clone()
    if _remove_application(m, app.key):
        log.warning("Inv-Adapter: this reference and adapter were already applied to the model; the later "
                    "InvAdapterApply replaces the earlier one")
    for name, fn in app.patches().items():
        m.set_model_patch(fn, name)
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, app.key, app.apply_model_wrapper)
    m.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, app.key, app.outer_sample_wrapper)
    return m


def _remove_application(m, key: str) -> bool:
    patches = m.model_options["transformer_options"].get("patches", {})
    removed = False
    for name, plist in patches.items():
        kept = [p for p in plist if getattr(getattr(p, "__self__", None), "key", None) != key]
        removed |= len(kept) != len(plist)
        patches[name] = kept
    for kind in (ext.WrappersMP.APPLY_MODEL, ext.WrappersMP.OUTER_SAMPLE):
        m.remove_wrappers_with_key(kind, key)
    return removed


def applications(model) -> list[Application]:
    """The Inv-Adapter applications installed on a model (for nodes that inspect them, e.g. attention maps)."""
    patches = model.model_options["transformer_options"].get("patches", {}).get("attn1_output_patch", [])
    return [p.__self__ for p in patches if isinstance(getattr(p, "__self__", None), Application)]
