"""The frozen base model and the trainable adapter: the same InvAdapter modules and EAA injection the nodes run.

Nothing here re-implements EAA math: the generation pass is a direct ``apply_model`` call with ``injection``'s
patches, fed K/V projected by the adapter's own parameters (so gradients reach them), and the reference pass is
``reference_pass``, as in the encode node.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn

from ..adapter.eaa import CrossEAA, InvAdapter, SelfEAA
from ..adapter.fit import check_adapter_fits
from ..adapter.injection import PER_SAMPLE, EAAInjection, Grouped, Step, transformer_options
from ..reference.capture import Features, reference_pass
from ..arch.layout import Layout, layout_of, model_family
from ..adapter.weights import load_adapter

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
    return {"self_kv": self_n, "cross_kv": cross_kv, "token_agg": agg, "total": self_n + cross_kv + agg}


# ------------------------------------------------------------------------------------------------ passes
class GenerationPass(nn.Module):
    """The UNet with the EAA applied, as a module whose only parameters are the adapter's (what DDP wraps)."""

    def __init__(self, adapter: InvAdapter, model):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "base", model.model)  # not a submodule: frozen, and DDP must not see it
        self.layout = layout_of(model)
        self.injection = EAAInjection(self.layout, 1.0, 1.0)

    @property
    def uses_cross(self) -> bool:
        return self.adapter.has_cross

    def reference_features(self, x_ref: torch.Tensor, sigmas: torch.Tensor, conds: dict) -> Features:
        """Frozen reference pass (no gradient): f_s and f_c of every block, sample i at sigma i."""
        _, features = reference_pass(self.base, x_ref, sigmas, conds, self.layout, cross=self.uses_cross)
        return features

    def forward(self, x: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor, f_self: dict,
                f_cross: Optional[dict], adm: Optional[torch.Tensor] = None, references: int = 1,
                combine: str = "concat") -> torch.Tensor:
        """D(x, sigma): the x0 prediction with the EAA fed by the reference features (plain dicts, so DDP passes
        them through untouched). Reference i serves sample i; K/V come from the adapter's own float32 parameters
        (the EAA layers cast their inputs), so gradients reach them under autocast or a half-precision UNet.
        ``adm``: the ADM vectors ([B, A]) of UNets that take one (SDXL). ``references`` = K: the features hold K
        photos per sample (sample-major), combined by ``combine`` as InvAdapterApply combines several photos."""
        mode = PER_SAMPLE if references == 1 else Grouped(combine, references)
        kv = self.injection.project_kv(self.adapter, Features(f_self, f_cross), mode)
        options = transformer_options([Step(self.injection, kv, float(sigmas.reshape(-1)[0]))])
        return self.base.apply_model(x, sigmas, c_crossattn=context, transformer_options=options,
                                     **({} if adm is None else {"y": adm}))
