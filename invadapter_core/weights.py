"""The Inv-Adapter weight file: one safetensors file, written by the trainer, read by InvAdapterLoader.

Tensor names (``<block>`` is "stage.id.index", e.g. "input.1.0", "middle.0.0", "output.11.0"):
    self.<block>.to_k.weight          [inner, C]   W'k
    self.<block>.to_v.weight          [inner, C]   W'v
    cross.<block>.token_agg.weight    [M, N]       W_agg (token axis)
    cross.<block>.token_agg.bias      [M]
    cross.<block>.to_k.weight         [inner, C]   W''k
    cross.<block>.to_v.weight         [inner, C]   W''v
Metadata (all strings): ``invadapter.format_version``, ``invadapter.base_family`` (ComfyUI model config name,
e.g. "SD15"), ``invadapter.reference_resolution`` (pixels), ``invadapter.tokens_m`` (M).
A block absent from the file has no EAA of that kind; a file without ``self.*`` tensors borrows the base model's
self-attention projections (the init-from-model default).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import FORMAT_VERSION
from .blocks import parse_block_name
from .eaa import CrossEAA, InvAdapter, SelfEAA
from .safetensors_io import read_checked, save_atomic

META_PREFIX = "invadapter."


class AdapterFileError(ValueError):
    """A weights file that cannot be used, with what was wrong and how to fix it."""


def init_from_model(family: str) -> InvAdapter:
    """The training-free adapter: self EAA = the base model's own to_k/to_v, no cross EAA."""
    return InvAdapter(family, None, None, {}, {}, name="init from model", self_from_base=True)


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
        META_PREFIX + "format_version": str(FORMAT_VERSION),
        META_PREFIX + "base_family": adapter.family,
        META_PREFIX + "reference_resolution": str(adapter.reference_resolution or 0),
        META_PREFIX + "tokens_m": str(adapter.tokens_m or 0),
    }
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, meta


def save_adapter(adapter: InvAdapter, path: str, dtype: Optional[torch.dtype] = None) -> None:
    tensors, meta = adapter_state(adapter)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_atomic(tensors, path, meta)


def adapter_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str = "") -> InvAdapter:
    if META_PREFIX + "format_version" not in meta:
        raise AdapterFileError(f"{source} is not an Inv-Adapter weights file (no '{META_PREFIX}format_version' "
                               f"metadata); expected a file written by `python -m invadapter_core.train`")
    version = int(meta[META_PREFIX + "format_version"])
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{source} uses weight format {version}; this pack reads up to {FORMAT_VERSION}: "
                               f"update ComfyUI-InvAdapter")
    family = meta.get(META_PREFIX + "base_family", "")
    resolution = int(meta.get(META_PREFIX + "reference_resolution", "0")) or None
    tokens_m = int(meta.get(META_PREFIX + "tokens_m", "0")) or None
    self_eaa, cross_eaa = {}, {}
    for key in tensors:
        kind, rest = key.split(".", 1)
        block = ".".join(rest.split(".")[:3])
        try:
            parse_block_name(block)
        except ValueError:
            raise AdapterFileError(f"{source}: unexpected tensor {key!r}") from None
        if kind == "self" and block not in self_eaa:
            k = tensors[f"self.{block}.to_k.weight"]
            layer = SelfEAA(k.shape[1], k.shape[0])
            layer.to_k.weight.data = k
            layer.to_v.weight.data = tensors[f"self.{block}.to_v.weight"]
            self_eaa[block] = layer
        elif kind == "cross" and block not in cross_eaa:
            agg = tensors[f"cross.{block}.token_agg.weight"]
            k = tensors[f"cross.{block}.to_k.weight"]
            layer = CrossEAA(k.shape[1], k.shape[0], agg.shape[1], agg.shape[0])
            layer.token_agg.weight.data = agg
            layer.token_agg.bias.data = tensors[f"cross.{block}.token_agg.bias"]
            layer.to_k.weight.data = k
            layer.to_v.weight.data = tensors[f"cross.{block}.to_v.weight"]
            cross_eaa[block] = layer
        elif kind not in ("self", "cross"):
            raise AdapterFileError(f"{source}: unexpected tensor {key!r}")
    if cross_eaa and resolution is None:
        raise AdapterFileError(f"{source} has cross-attention EAA but no reference_resolution metadata")
    return InvAdapter(family, resolution, tokens_m, self_eaa, cross_eaa, name=os.path.basename(source),
                      self_from_base=not self_eaa)


def load_adapter(path: str) -> InvAdapter:
    tensors, meta = read_checked(path, "Inv-Adapter weights file", AdapterFileError,
                                 "re-download it or re-run the trainer's export")
    try:
        return adapter_from_state(tensors, meta, source=path)
    except KeyError as e:
        raise AdapterFileError(f"{path} is missing tensor {e}: the file is incomplete") from None


def check_adapter_fits(adapter: InvAdapter, family: str, block_dims: dict[str, tuple[int, int]]) -> None:
    """Refuse an adapter trained for another architecture, naming what was expected.

    ``block_dims`` maps block name -> (C, inner) of the model's transformer blocks.
    """
    if adapter.family and adapter.family != family:
        raise AdapterFileError(f"Inv-Adapter '{adapter.name}' was made for model family {adapter.family}, but the "
                               f"model is {family}: load weights trained for {family} or use 'init from model'")
    for kind, layers in (("self", adapter.self_layers()), ("cross", adapter.cross_layers())):
        for name, layer in layers.items():
            if name not in block_dims:
                raise AdapterFileError(f"Inv-Adapter '{adapter.name}' has {kind} EAA for block {name}, which this "
                                       f"{family} model does not have (its blocks: {', '.join(block_dims)})")
            dim, inner = block_dims[name]
            got = tuple(layer.to_k.weight.shape)
            if got != (inner, dim):
                raise AdapterFileError(f"Inv-Adapter '{adapter.name}': {kind}.{name}.to_k has shape {got}, the model "
                                       f"expects {(inner, dim)}: the file was trained for another architecture")
