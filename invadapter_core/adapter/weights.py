"""The Inv-Adapter weight file: one safetensors file, written by the trainer, read by InvAdapterLoader.

Tensor names (``<block>`` is "stage.id.index", e.g. "input.1.0", "middle.0.0", "output.11.0"):
    self.<block>.to_k.weight          [inner, C]   W'k
    self.<block>.to_v.weight          [inner, C]   W'v
    cross.<block>.token_agg.weight    [M, N]       W_agg (token axis)
    cross.<block>.token_agg.bias      [M]
    cross.<block>.to_k.weight         [inner, C]   W''k
    cross.<block>.to_v.weight         [inner, C]   W''v
Metadata (all strings): ``invadapter.format_version``, ``invadapter.base_family`` (ComfyUI model config name,
e.g. "SD15"), ``invadapter.reference_resolution`` (pixels), ``invadapter.tokens_m`` (M), and for the networks
that are not UNets ``invadapter.architecture`` (the layout: "Flux", "QwenImage"; an MM-DiT's blocks are "double.3",
"single.12", and its ``self.<block>.to_k`` / ``to_v`` [hidden, hidden] map the reference's joint-attention K (after
QK-norm, before RoPE) and V, ``adapter.joint``).
Optionally IDAdapter's identity token: ``identity_token.*`` tensors and ``invadapter.identity_token*`` metadata
(``adapter.identity_token``).
A block absent from the file has no EAA of that kind; a file without ``self.*`` tensors borrows the base model's
self-attention projections (the init-from-model default).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..files.format import DEFAULT_ARCHITECTURE, FORMAT_VERSION, META
from ..files.safetensors_io import read_checked, save_atomic
from ..files.validation import AdapterFileError, check_adapter_file
from .eaa import CrossEAA, InvAdapter, SelfEAA
from .identity_token import map_from_state, token_state

INIT_FROM_MODEL = "init from model"  # the loader's choice (and the adapter's name) for the training-free default


def init_from_model(family: str) -> InvAdapter:
    """The training-free adapter: self EAA = the base model's own to_k/to_v, no cross EAA."""
    return InvAdapter(family, None, None, {}, {}, name=INIT_FROM_MODEL, self_from_base=True)


def adapter_state(adapter: InvAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    if not adapter.self_from_base:
        for name, layer in adapter.self_layers().items():
            tensors[f"self.{name}.to_k.weight"] = layer.to_k.weight
            tensors[f"self.{name}.to_v.weight"] = layer.to_v.weight
    for name, layer in adapter.cross_layers().items():
        tensors[f"cross.{name}.token_agg.weight"] = layer.token_agg.weight
        tensors[f"cross.{name}.token_agg.bias"] = layer.token_agg.bias
        tensors[f"cross.{name}.to_k.weight"] = layer.to_k.weight
        tensors[f"cross.{name}.to_v.weight"] = layer.to_v.weight
    meta = {
        META + "format_version": str(FORMAT_VERSION),
        META + "base_family": adapter.family,
        META + "reference_resolution": str(adapter.reference_resolution or 0),
        META + "tokens_m": str(adapter.tokens_m or 0),
    }
    if adapter.architecture != DEFAULT_ARCHITECTURE:  # UNet files stay byte-identical to those written before
        meta[META + "architecture"] = adapter.architecture
    if getattr(adapter, "identity_token", None) is not None:
        token_tensors, token_meta = token_state(adapter.identity_token)
        tensors.update(token_tensors)
        meta.update(token_meta)
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, meta


def save_adapter(adapter: InvAdapter, path: str, dtype: Optional[torch.dtype] = None) -> None:
    tensors, meta = adapter_state(adapter)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_atomic(tensors, path, meta)


def adapter_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str = "") -> InvAdapter:
    """An InvAdapter from a weights file's tensors and metadata, every field checked first (``files.validation``)."""
    parsed = check_adapter_file(source, tensors, meta, AdapterFileError)
    self_eaa, cross_eaa = {}, {}
    for block, params in parsed["layers"]["self"].items():
        k = params["to_k.weight"]
        layer = SelfEAA(k.shape[1], k.shape[0]).to(k.dtype)  # the file's dtype (a half file stays half)
        layer.load_state_dict(params)
        self_eaa[block] = layer
    for block, params in parsed["layers"]["cross"].items():
        agg, k = params["token_agg.weight"], params["to_k.weight"]
        layer = CrossEAA(k.shape[1], k.shape[0], agg.shape[1], agg.shape[0]).to(k.dtype)
        layer.load_state_dict({name: t.to(k.dtype) for name, t in params.items()})
        cross_eaa[block] = layer
    adapter = InvAdapter(parsed["family"], parsed["resolution"], parsed["tokens_m"], self_eaa, cross_eaa,
                         name=os.path.basename(source), self_from_base=not self_eaa,
                         architecture=meta.get(META + "architecture", DEFAULT_ARCHITECTURE),
                         identity_token=map_from_state(parsed["identity_token"]))
    return adapter.requires_grad_(False)


def load_adapter(path: str) -> InvAdapter:
    tensors, meta = read_checked(path, "Inv-Adapter weights file", AdapterFileError,
                                 "re-download it or re-run the trainer's export")
    return adapter_from_state(tensors, meta, source=path)
