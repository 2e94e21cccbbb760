"""The frozen base model and the trainable adapter: the same InvAdapter modules and EAA injection the nodes run.

Nothing here re-implements EAA math: the generation pass is a direct ``apply_model`` call with ``injection``'s
patches, fed K/V projected by the adapter's own parameters (so gradients reach them), and the reference pass is
``reference_pass``, as in the encode node. On an MM-DiT (Flux, Chroma, Qwen-Image: ``JointGenerationPass``) the
patches are ``adapter.joint``'s and the trained layers map the reference's kept joint-attention K and V
(``adapter.joint.project_joint``), starting from identity maps (the training-free EAA).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
from torch import nn

from ..adapter.eaa import CrossEAA, InvAdapter, SelfEAA
from ..adapter.joint import (JOINT, POSITIONS, JointCall, JointStep, joint_add, joint_override, joint_stash,
                             project_joint, rope_rows)
from ..arch.flux import FluxLayout, split_kv
from ..adapter.fit import check_adapter_fits
from ..adapter.injection import PER_SAMPLE, EAAInjection, Grouped, Step, transformer_options
from ..adapter.joint_store import combine_photos
from ..reference.capture import Features, reference_pass
from ..arch.layout import Layout, layout_of, model_family
from ..adapter.weights import load_adapter
from ..adapter.identity_token import build_map, summary_pass

PRECISIONS = ("auto", "no", "bf16", "fp16")


# ------------------------------------------------------------------------------------------------ base model
def weight_dtype(mixed_precision: str) -> Optional[torch.dtype]:
    """The frozen UNet's weight dtype for a precision choice (None: ComfyUI's own choice)."""
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"train.mixed_precision must be one of {PRECISIONS}, got {mixed_precision!r}")
    if mixed_precision != "auto":
        if device.type != "cuda" and mixed_precision != "no":
            return "no"  # autocast on CPU is slower than fp32 for these layers; keep CPU runs exact
        return mixed_precision
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def load_base(checkpoint: str, precision: str, need_clip: bool, need_vae: bool):
    """(model, clip, vae) from ComfyUI's own checkpoint loader; the UNet is frozen."""
    import comfy.sd

    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"model.checkpoint {checkpoint!r} not found")
    dtype = weight_dtype(precision)
    model_options = {"dtype": dtype} if dtype is not None else {}
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        checkpoint, output_vae=need_vae, output_clip=need_clip, model_options=model_options, disable_dynamic=True)
    freeze(model)
    return model, clip, vae


def clip_type(name: str):
    """ComfyUI's CLIPType of a loader's type name ("flux", "qwen_image", ...)."""
    import comfy.sd

    found = getattr(comfy.sd.CLIPType, name.upper(), None)
    if found is None:
        raise ValueError(f"not a text-encoder type of ComfyUI's loaders; one of "
                         f"{', '.join(t.name.lower() for t in comfy.sd.CLIPType)}")
    return found


def load_base_files(diffusion_model: str, text_encoders: list, clip_kind: str, vae: str, precision: str,
                    need_clip: bool, need_vae: bool):
    """(model, clip, vae) from separate files, as Load Diffusion Model, Load CLIP / DualCLIPLoader and Load VAE
    load them (Flux, Chroma and Qwen-Image ship that way); the diffusion model is frozen."""
    import comfy.sd
    import comfy.utils

    for key, path in [("model.diffusion_model", diffusion_model), *[("model.text_encoders", f) for f in text_encoders],
                      ("model.vae", vae)]:
        if (path or key != "model.vae") and not os.path.isfile(path):
            raise FileNotFoundError(f"{key} {path!r} not found")
    dtype = weight_dtype(precision)
    model = comfy.sd.load_diffusion_model(diffusion_model, model_options={"dtype": dtype} if dtype else {},
                                          disable_dynamic=True)
    freeze(model)
    clip = comfy.sd.load_clip(list(text_encoders), clip_type=clip_type(clip_kind), disable_dynamic=True) \
        if need_clip else None
    decoder = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae)) if need_vae else None
    return model, clip, decoder


def load_configured_base(cfg, precision: str, need_clip: bool, need_vae: bool):
    """The base the config names: ``model.checkpoint``, or the separate ``model.diffusion_model`` files."""
    m = cfg.model
    if m.diffusion_model:
        return load_base_files(m.diffusion_model, m.text_encoders, m.clip_type, m.vae, precision, need_clip, need_vae)
    from .config import require

    return load_base(require(m.checkpoint, "model.checkpoint"), precision, need_clip, need_vae)


def freeze(model) -> None:
    model.model.requires_grad_(False)
    model.model.eval()


def load_fully(model) -> None:
    """The whole UNet on its device (training backpropagates through every layer; no partial offload)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)


# ------------------------------------------------------------------------------------------------ adapter
def pooling_matrix(n: int, m: int) -> torch.Tensor:
    """W_agg [m, n] that average-pools (m < n) or nearest-upsamples (m > n) the reference tokens as an image when
    both are squares (h x w raster order), else along the token axis: the cross EAA starts from a coarse copy of
    the reference rather than from random token mixtures."""
    eye = torch.eye(n)
    sn, sm = math.isqrt(n), math.isqrt(m)
    if sn * sn == n and sm * sm == m:
        grid = eye.reshape(n, 1, sn, sn)
        out = (nn.functional.adaptive_avg_pool2d(grid, sm) if sm <= sn
               else nn.functional.interpolate(grid, size=(sm, sm), mode="nearest"))
    else:
        line = eye.reshape(n, 1, n)
        out = (nn.functional.adaptive_avg_pool1d(line, m) if m <= n
               else nn.functional.interpolate(line, size=m, mode="nearest"))
    return out.reshape(n, m).t().contiguous()


def _copy(dst: nn.Linear, weight: torch.Tensor) -> None:
    with torch.no_grad():
        dst.weight.copy_(weight.detach().to("cpu", torch.float32))


def build_adapter(model, resolution: int, tokens_m: int, init: str = "base", train_self: bool = True,
                  train_cross: bool = True) -> InvAdapter:
    """A fresh float32 InvAdapter (on the CPU) for ``model``'s transformer blocks.

    Without ``train_self`` the self EAA borrows the base model's attn1.to_k/to_v, exactly as a weights file without
    ``self.*`` tensors does at inference, so training sees what inference will run.
    """
    if not (train_self or train_cross):
        raise ValueError("model.train_self and model.train_cross are both off: nothing to train")
    layout = layout_of(model)
    if is_joint(layout):
        return build_joint_adapter(model, layout, init, train_self, train_cross)
    dims = layout.dims
    tokens_n = layout.tokens(resolution)
    self_eaa = {name: SelfEAA(c, inner) for name, (c, inner) in dims.items()} if train_self else {}
    cross_eaa = {name: CrossEAA(c, inner, tokens_n[name], tokens_m) for name, (c, inner) in dims.items()} \
        if train_cross else {}
    adapter = InvAdapter(model_family(model), resolution, tokens_m if train_cross else None, self_eaa, cross_eaa,
                         name="training", self_from_base=not train_self)
    if init == "base":
        init_from_base(adapter, layout)
    elif init != "random":
        init_from_file(adapter, init, model)
    return adapter.float()


def is_joint(layout: Layout) -> bool:
    """An MM-DiT whose EAA lives in the joint attention (Flux's layout and those built on it)."""
    return isinstance(layout, FluxLayout)


def check_trainable(model) -> None:
    """The nodes' served families, and the MM-DiTs the core can invert and train on though the nodes do not offer
    them yet; anything else refused in one line (``arch.fit.check_served``)."""
    from ..arch.fit import check_served
    from ..arch.layout import ModelFamilyError

    try:
        if is_joint(layout_of(model)):
            return
    except ModelFamilyError:
        pass
    check_served(model)


def build_joint_adapter(model, layout: Layout, init: str, train_self: bool, train_cross: bool) -> InvAdapter:
    """A float32 joint EAA for an MM-DiT: per block ``to_k``, ``to_v`` [hidden, hidden] applied to the reference's
    K (after QK-norm, before RoPE) and V (``adapter.joint.project_joint``). 'base' starts from identity maps (what
    the training-free EAA runs), 'random' from fresh layers, a path from a joint weights file of this family."""
    if train_cross:
        raise ValueError(f"model.train_cross: a {model_family(model)} network has no cross-attention for a cross "
                         f"EAA (its text and image tokens attend jointly); set model.train_cross = false")
    if not train_self:
        raise ValueError("model.train_self is off: on an MM-DiT the joint EAA's K/V maps are all there is to train")
    hidden = {name: inner for name, (_, inner) in layout.dims.items()}
    adapter = InvAdapter(model_family(model), None, None, {n: SelfEAA(h, h) for n, h in hidden.items()}, {},
                         name="training", architecture=type(layout).__name__[:-len("Layout")])
    if init != "random":
        for layer in adapter.self_layers().values():
            with torch.no_grad():
                layer.to_k.weight.copy_(torch.eye(layer.to_k.weight.shape[0]))
                layer.to_v.weight.copy_(torch.eye(layer.to_v.weight.shape[0]))
    if init not in ("base", "random"):
        if not os.path.isfile(init):
            raise FileNotFoundError(f"model.init: {init!r} is neither 'base', 'random' nor a weights file")
        loaded = load_adapter(init)
        check_adapter_fits(loaded, model)
        mine = adapter.self_layers()
        for name, layer in loaded.self_layers().items():
            mine[name].load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    return adapter.float()


def init_from_base(adapter: InvAdapter, layout: Layout) -> None:
    """W'k, W'v = the block's own attn1.to_k/to_v (the training-free adapter: training starts from what already
    works); cross EAA: W''k = attn1.to_k (a sensible scale for image-token keys), W''v = 0 (a no-op at step 0, as
    the untrained cross EAA is everywhere else), W_agg = average pooling, bias 0."""
    for name, layer in adapter.self_layers().items():
        _copy(layer.to_k, layout.attention("self", name).to_k.weight)
        _copy(layer.to_v, layout.attention("self", name).to_v.weight)
    for name, layer in adapter.cross_layers().items():
        _copy(layer.to_k, layout.attention("self", name).to_k.weight)
        with torch.no_grad():
            layer.to_v.weight.zero_()
            layer.token_agg.weight.copy_(pooling_matrix(layer.token_agg.in_features, layer.token_agg.out_features))
            layer.token_agg.bias.zero_()


def init_from_file(adapter: InvAdapter, path: str, model) -> None:
    """Start from a weights file (e.g. to fine-tune): its tensors replace the fresh ones block by block; blocks the
    file lacks keep the 'base' initialisation."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.init: {path!r} is neither 'base', 'random' nor a weights file")
    loaded = load_adapter(path)
    check_adapter_fits(loaded, model)
    if loaded.has_cross and (loaded.reference_resolution != adapter.reference_resolution
                             or loaded.tokens_m != adapter.tokens_m):
        raise ValueError(f"{path} was trained at reference resolution {loaded.reference_resolution} with M = "
                         f"{loaded.tokens_m}; this run uses {adapter.reference_resolution} / {adapter.tokens_m}")
    init_from_base(adapter, layout_of(model))
    for kind, mine, theirs in (("self", adapter.self_layers(), loaded.self_layers()),
                               ("cross", adapter.cross_layers(), loaded.cross_layers())):
        for name, layer in theirs.items():
            if name in mine:
                mine[name].load_state_dict({k: v.float() for k, v in layer.state_dict().items()})


def count_parameters(adapter: InvAdapter) -> dict[str, int]:
    self_n = sum(p.numel() for p in adapter.self_eaa.parameters())
    agg = sum(p.numel() for layer in adapter.cross_layers().values() for p in layer.token_agg.parameters())
    cross_kv = sum(p.numel() for p in adapter.cross_eaa.parameters()) - agg
    token = sum(p.numel() for p in adapter.identity_token.parameters()) if adapter.identity_token is not None else 0
    return {"self_kv": self_n, "cross_kv": cross_kv, "token_agg": agg, "identity_token": token,
            "total": self_n + cross_kv + agg + token}


def attach_identity_token(adapter: InvAdapter, model, tokens: int, text_path) -> None:
    """IDAdapter's identity token (``adapter.identity_token``): k embeddings of ``text_path``'s width, starting at its
    placeholder embedding, trained with the EAA (SD UNets only: the MM-DiTs' text paths are not wired yet)."""
    if tokens < 0:
        raise ValueError(f"model.identity_tokens = {tokens}: give 0 (none) or the number of tokens k")
    if text_path is None:
        raise ValueError("model.identity_tokens needs a text path given to the trainer (how the tokens enter the "
                         "prompt; the command-line trainer builds one from the checkpoint's CLIP, from Python pass text_path): set "
                         "model.identity_tokens = 0")
    layout = layout_of(model)
    if is_joint(layout):
        raise ValueError(f"model.identity_tokens is implemented for the SD UNets only; on this "
                         f"{model_family(model)} model set model.identity_tokens = 0")
    adapter.identity_token = build_map(layout, tokens, text_path)


# ------------------------------------------------------------------------------------------------ passes
class GenerationPass(nn.Module):
    """The UNet with the EAA applied, as a module whose only parameters are the adapter's (what DDP wraps)."""

    def __init__(self, adapter: InvAdapter, model):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "base", model.model)  # not a submodule: frozen, and DDP must not see it
        self.layout = layout_of(model)
        self.injection = EAAInjection(self.layout, 1.0, 1.0)
        self.text_path = None  # how the identity token enters the context (adapter.identity_token.TextPath)

    @property
    def uses_cross(self) -> bool:
        return self.adapter.has_cross

    def reference_features(self, x_ref: torch.Tensor, sigmas: torch.Tensor, conds: dict) -> Features:
        """Frozen reference pass (no gradient): f_s and f_c of every block, sample i at sigma i."""
        _, features = reference_pass(self.base, x_ref, sigmas, conds, self.layout, cross=self.uses_cross)
        return features

    def identity_summary(self, x: torch.Tensor, sigmas: torch.Tensor, conds: dict, references: int) -> torch.Tensor:
        """What the identity token reads (no gradient): [B, F] from the states at their lowest sigma."""
        return summary_pass(self.base, self.layout, self.adapter.identity_token.blocks, x, sigmas, conds, references)

    def forward(self, x: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor, f_self: dict,
                f_cross: Optional[dict], adm: Optional[torch.Tensor] = None, references: int = 1,
                combine: str = "concat", identity: Optional[torch.Tensor] = None,
                captions: Optional[list] = None) -> torch.Tensor:
        """D(x, sigma): the x0 prediction with the EAA fed by the reference features (plain dicts, so DDP passes
        them through untouched). Reference i serves sample i; K/V come from the adapter's own float32 parameters
        (the EAA layers cast their inputs), so gradients reach them under autocast or a half-precision UNet.
        ``adm``: the ADM vectors ([B, A]) of UNets that take one (SDXL). ``references`` = K: the features hold K
        photos per sample (sample-major), combined by ``combine`` as InvAdapterApply combines several photos.
        ``identity``: the identity token's summaries [B, F]; its tokens enter ``context`` through ``text_path``
        (with ``captions``), inside this call so DDP sees the map's parameters used."""
        if identity is not None:
            context = self.text_path(captions, context, self.adapter.identity_token(identity))
        mode = PER_SAMPLE if references == 1 else Grouped(combine, references)
        kv = self.injection.project_kv(self.adapter, Features(f_self, f_cross), mode)
        options = transformer_options([Step(self.injection, kv, float(sigmas.reshape(-1)[0]))])
        return self.base.apply_model(x, sigmas, c_crossattn=context, transformer_options=options,
                                     **({} if adm is None else {"y": adm}))


@contextlib.contextmanager
def differentiable_ops():
    """ComfyUI's training switch for the forward pass: its fused kernels without a backward (Flux's RoPE from
    comfy_kitchen) give way to plain torch ops, as its own training node does."""
    import comfy.model_management as mm

    before, mm.in_training = mm.in_training, True
    try:
        # Flux's blocks add their residuals in place (``x += ...``) into tensors their norms saved for the backward
        # pass: each saved tensor is kept as a copy (what torch's save_on_cpu does, on the same device), so the
        # backward sees the values the forward used
        with torch.autograd.graph.saved_tensors_hooks(_copy_saved, _same):
            yield
    finally:
        mm.in_training = before


def _copy_saved(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if not isinstance(t, nn.Parameter) else t


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class JointGenerationPass(nn.Module):
    """An MM-DiT with the joint EAA applied (``adapter.joint``'s patches, or its attention override on Qwen-Image),
    as a module whose only parameters are the adapter's. Reference i serves sample i: its kept K/V mapped by the
    adapter's layers, K RoPE'd at ``positions``, the term added to the ``rows`` (as ``JointApplication`` does at
    strength 1)."""

    uses_cross = False

    def __init__(self, adapter: InvAdapter, model, rows: str = "image", positions: str = "own"):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "base", model.model)  # not a submodule: frozen, and DDP must not see it
        self.layout = layout_of(model)
        self.rows, self.positions = rows, positions

    def reference_features(self, x_ref: torch.Tensor, sigmas: torch.Tensor, conds: dict) -> Features:
        """Frozen reference pass (no gradient): every block's image-token K/V, sample i at sigma i."""
        _, features = reference_pass(self.base, x_ref, sigmas, conds, self.layout, cross=False)
        return features

    def forward(self, x: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor, f_self: dict,
                f_cross: Optional[dict] = None, adm: Optional[torch.Tensor] = None,
                guidance: Optional[torch.Tensor] = None, references: int = 1, combine: str = "concat"
                ) -> torch.Tensor:
        """D(x, sigma) with the EAA fed by ``f_self`` (block -> [B x K, N, 2 x hidden], the reference pass's); the
        reference has x's size (the sample is its own reference). ``adm``: Flux's pooled vector ``y``;
        ``guidance``: [B], for models with a guidance embedding. ``references`` = K photos per sample
        (sample-major rows), combined per sample as inference combines several photos (``combine``)."""
        layout = self.layout
        grid = layout.token_grid(tuple(x.shape[-2:]))
        frames = x.shape[2] if x.ndim == 5 else 1
        pe = layout.positions(grid, POSITIONS[self.positions], x.device)
        with differentiable_ops():
            return self._forward(x, sigmas, context, f_self, adm, guidance, grid[0] * grid[1] * frames, pe,
                                 references, combine)

    def _forward(self, x, sigmas, context, f_self, adm, guidance, image_tokens, pe, references, combine):
        layout = self.layout
        kv = {}
        for name, f in f_self.items():
            k, v = split_kv(project_joint(self.adapter.self_layer(name), f), layout.heads)
            k = rope_rows(k, pe)
            if references > 1:  # each sample's K photos as one reference, after RoPE as joint_store does
                k, v = (torch.cat([combine_photos(photos, combine) for photos in t.split(references)])
                        for t in (k, v))
            kv[name] = (k, v)
        options = {JOINT: JointCall(layout, image_tokens, [JointStep(kv, self.rows)])}
        if layout.ADDS_TERM == "output patch":
            options["patches"] = {"attn1_patch": [joint_stash], "attn1_output_patch": [joint_add]}
        else:
            options["optimized_attention_override"] = joint_override()
        conds = {"c_crossattn": context}
        if adm is not None:
            conds["y"] = adm
        if guidance is not None:
            conds["guidance"] = guidance
        return self.base.apply_model(x, sigmas, transformer_options=options, **conds)


def generation_pass(adapter: InvAdapter, model) -> nn.Module:
    """The generation pass of ``model``'s architecture."""
    return JointGenerationPass(adapter, model) if is_joint(layout_of(model)) else GenerationPass(adapter, model)
