"""Every check an adapter or reference file must pass before anything uses it.

Each failure is one line naming the file, the field and the fix; nothing reaches the sampler that would fail there
with a raw shape error or turn the image black (NaN). Model-dependent checks (does this fit that UNet) live in
``adapter.fit``; these need only the file.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Optional

import torch

from ..arch.layout import is_block_name
from ..arch.levels import DIT_LEVELS, LEVELS
from .format import FORMAT_VERSION, INVERSION_CONVENTIONS, META


class AdapterFileError(ValueError):
    """A weights file that cannot be used, with what was wrong and how to fix it."""


class ReferenceFileError(ValueError):
    """A reference file or object that cannot be used, with what was wrong and how to fix it."""
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn)


def _fail(error: type[Exception], path: str, what: str, fix: str):
    raise error(f"{path}: {what}; {fix}")


def _int_meta(meta: dict, key: str, default: Optional[str], error, path: str, fix: str) -> int:
    raw = meta.get(META + key, default)
    if raw is None:
        _fail(error, path, f"metadata '{META}{key}' is missing", fix)
    try:
        return int(raw)
    except ValueError:
        _fail(error, path, f"metadata '{META}{key}' is {raw!r}, not an integer", fix)


def _json_meta(meta: dict, key: str, error, path: str, fix: str, check: Callable[[object], bool], expected: str):
    raw = meta.get(META + key)
    if raw is None:
        _fail(error, path, f"metadata '{META}{key}' is missing", fix)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        _fail(error, path, f"metadata '{META}{key}' is not valid JSON ({raw[:40]!r})", fix)
    if not check(value):
        _fail(error, path, f"metadata '{META}{key}' is {raw[:60]!r}, expected {expected}", fix)
    return value


def magnitude_limit(dtype: torch.dtype) -> float:
    """The largest magnitude a value the UNet computes with may have in ``dtype``: its square must stay finite. The
    UNet squares what it computes with (the attention logits q.k, the variance of every LayerNorm and GroupNorm), so
    a larger value becomes inf there, then NaN: a black image. float16: 256; bfloat16 and float32: 1.8e19."""
    return math.sqrt(torch.finfo(dtype).max)


# At load the compute dtype is not known yet: refuse what even the widest one ComfyUI runs a UNet in cannot hold
# (InvAdapterApply checks again against the model's own compute dtype).
LOAD_LIMIT = magnitude_limit(torch.float32)


def peak(t: torch.Tensor) -> float:
    """The largest magnitude in ``t`` (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0.0
    return float((t.half() if t.dtype == torch.float8_e4m3fn else t).detach().abs().max())


def check_magnitude(error, path: str, what: str, value: float, dtype: torch.dtype, fix: str) -> None:
    limit = magnitude_limit(dtype)
    if value > limit:
        _fail(error, path, f"{what} reaches a magnitude of {value:.3g}; computing in "
                           f"{str(dtype).replace('torch.', '')}, values above {limit:.3g} overflow in the attention "
                           f"and normalisation products (a black image)", fix)


def check_tensor(error, path: str, name: str, t: torch.Tensor, ndim: Optional[int], fix: str,
                 scale: Optional[torch.Tensor] = None) -> float:
    """A floating tensor of ``ndim`` dimensions (None: any), finite everywhere, with magnitudes a UNet can compute
    with (``LOAD_LIMIT``; ``scale``: factors that broadcast onto ``t`` first, what the UNet sees of it); returns its
    peak magnitude (InvAdapterApply checks it against the model's compute dtype)."""
    if t.dtype not in FLOATS:
        _fail(error, path, f"tensor '{name}' has dtype {str(t.dtype).replace('torch.', '')}, expected a float type",
              fix)
    if ndim is not None and t.ndim != ndim:
        _fail(error, path, f"tensor '{name}' has shape {tuple(t.shape)} ({t.ndim}-D), expected {ndim}-D", fix)
    top = peak(t if scale is None else t.float() * scale)  # NaN or inf when any value is (max propagates both)
    if not math.isfinite(top):
        bad = int((~torch.isfinite(t if t.dtype != torch.float8_e4m3fn else t.half())).sum())
        _fail(error, path, f"tensor '{name}' holds {bad} NaN/infinite value(s) (it would turn the image black)", fix)
    check_magnitude(error, path, f"tensor '{name}'" + ("" if scale is None else " (as the UNet sees it)"), top,
                    torch.float32, fix)
    return top


# --------------------------------------------------------------------------------------------------- adapter files
ADAPTER_FIX = "re-export it with `python -m invadapter_core.train export` or download it again"
ADAPTER_LAYERS = {"self": ("to_k.weight", "to_v.weight"),
                  "cross": ("token_agg.weight", "token_agg.bias", "to_k.weight", "to_v.weight")}


def check_adapter_file(path: str, tensors: dict[str, torch.Tensor], meta: dict, error) -> dict:
    """The parsed metadata and tensors grouped as {kind: {block: {param: tensor}}}, or ``error``."""
    if META + "format_version" not in meta:
        _fail(error, path, f"no '{META}format_version' metadata, so it is not an Inv-Adapter weights file",
              "expected a file written by `python -m invadapter_core.train`")
    version = _int_meta(meta, "format_version", None, error, path, ADAPTER_FIX)
    if version > FORMAT_VERSION:
        _fail(error, path, f"weight format {version} is newer than this pack reads ({FORMAT_VERSION})",
              "update ComfyUI-InvAdapter")
    resolution = _int_meta(meta, "reference_resolution", "0", error, path, ADAPTER_FIX) or None
    tokens_m = _int_meta(meta, "tokens_m", "0", error, path, ADAPTER_FIX) or None
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {"self": {}, "cross": {}}
    identity = check_identity_token(path, tensors, meta, error)
    for name, t in tensors.items():
        if name.startswith(IDENTITY_PREFIX):
            continue
        parts = name.split(".")
        kind = parts[0]
        if kind not in ADAPTER_LAYERS or len(parts) < 5:
            _fail(error, path, f"unexpected tensor '{name}' (expected self.<block>.to_k.weight, "
                               f"cross.<block>.token_agg.weight, ...)", ADAPTER_FIX)
        # the parameter is the name's tail (UNet blocks have three dotted parts, MM-DiT blocks two)
        param = next((p for p in ADAPTER_LAYERS.get(kind, ()) if name.endswith("." + p)), ".".join(parts[4:]))
        block = name[len(kind) + 1:-len(param) - 1]
        if not is_block_name(block):
            _fail(error, path, f"tensor '{name}' names no UNet block ('{block}'; expected e.g. input.1.0)",
                  ADAPTER_FIX)
        if param not in ADAPTER_LAYERS[kind]:
            _fail(error, path, f"unexpected tensor '{name}' ({kind} layers have {', '.join(ADAPTER_LAYERS[kind])})",
                  ADAPTER_FIX)
        check_tensor(error, path, name, t, 1 if param.endswith("bias") else 2, ADAPTER_FIX)
        layers[kind].setdefault(block, {})[param] = t
    for kind, blocks in layers.items():
        for block, params in blocks.items():
            missing = [p for p in ADAPTER_LAYERS[kind] if p not in params]
            if missing:
                _fail(error, path, f"{kind}.{block} lacks {', '.join(missing)} (the file is incomplete)", ADAPTER_FIX)
            k, v = params["to_k.weight"], params["to_v.weight"]
            if k.shape != v.shape:
                _fail(error, path, f"{kind}.{block}.to_v.weight has shape {tuple(v.shape)} but to_k.weight "
                                   f"{tuple(k.shape)}: they must match", ADAPTER_FIX)
            if kind == "cross":
                agg, bias = params["token_agg.weight"], params["token_agg.bias"]
                if bias.shape[0] != agg.shape[0]:
                    _fail(error, path, f"cross.{block}.token_agg.bias has {bias.shape[0]} entries, the weight "
                                       f"{agg.shape[0]} rows", ADAPTER_FIX)
                if tokens_m is not None and agg.shape[0] != tokens_m:
                    _fail(error, path, f"cross.{block}.token_agg.weight has {agg.shape[0]} rows but the metadata says "
                                       f"tokens_m = {tokens_m}", ADAPTER_FIX)
    if layers["cross"] and resolution is None:
        _fail(error, path, f"it has a cross-attention EAA but no '{META}reference_resolution' metadata",
              ADAPTER_FIX)
    return {"family": meta.get(META + "base_family", ""), "resolution": resolution, "tokens_m": tokens_m,
            "layers": layers, "identity_token": identity}


# the identity token's tensors (adapter.identity_token): parameter -> dimensions
IDENTITY_PREFIX = "identity_token."
IDENTITY_PARAMS = {"norm.weight": 1, "norm.bias": 1, "fc1.weight": 2, "fc1.bias": 1, "fc2.weight": 2, "fc2.bias": 1}


def check_identity_token(path: str, tensors: dict[str, torch.Tensor], meta: dict, error) -> Optional[dict]:
    """The identity token's map (``adapter.identity_token``) of a weights file: {tokens, width, blocks, tensors}
    with every shape consistent with the metadata; None when the file has none; ``error`` otherwise."""
    found = {name[len(IDENTITY_PREFIX):]: t for name, t in tensors.items() if name.startswith(IDENTITY_PREFIX)}
    if not found and META + "identity_tokens" not in meta:
        return None
    tokens = _int_meta(meta, "identity_tokens", None, error, path, ADAPTER_FIX)
    width = _int_meta(meta, "identity_token_width", None, error, path, ADAPTER_FIX)
    if tokens < 1 or width < 1:
        _fail(error, path, f"metadata says {tokens} identity token(s) of width {width}; both must be at least 1",
              ADAPTER_FIX)
    blocks = _json_meta(meta, "identity_token_blocks", error, path, ADAPTER_FIX,
                        lambda v: isinstance(v, list) and v and all(isinstance(b, str) and is_block_name(b)
                                                                    for b in v), "a non-empty list of block names")
    for name, t in found.items():
        if name not in IDENTITY_PARAMS:
            _fail(error, path, f"unexpected tensor '{IDENTITY_PREFIX}{name}' (the identity token has "
                               f"{', '.join(IDENTITY_PARAMS)})", ADAPTER_FIX)
        check_tensor(error, path, IDENTITY_PREFIX + name, t, IDENTITY_PARAMS[name], ADAPTER_FIX)
    missing = [p for p in IDENTITY_PARAMS if p not in found]
    if missing:
        _fail(error, path, f"the identity token lacks {', '.join(IDENTITY_PREFIX + p for p in missing)} (the file is "
                           f"incomplete)", ADAPTER_FIX)
    features, hidden = found["norm.weight"].shape[0], found["fc1.weight"].shape[0]
    expected = {"norm.bias": (features,), "fc1.weight": (hidden, features), "fc1.bias": (hidden,),
                "fc2.weight": (tokens * width, hidden), "fc2.bias": (tokens * width,)}
    for name, shape in expected.items():
        if tuple(found[name].shape) != shape:
            _fail(error, path, f"tensor '{IDENTITY_PREFIX}{name}' has shape {tuple(found[name].shape)}, expected "
                               f"{shape} for {tokens} token(s) of width {width}", ADAPTER_FIX)
    return {"tokens": tokens, "width": width, "blocks": blocks, "tensors": found}


# --------------------------------------------------------------------------------------------------- reference files
REFERENCE_FIX = "save the reference again with InvAdapterSaveReference"
COND_DIMS = {"c_crossattn": 3, "y": 2, "c_concat": 4}


def check_reference_file(path: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Parsed metadata (family, resolution, feature_sigmas, convention), or ReferenceFileError."""
    E = ReferenceFileError
    if meta.get(META + "kind") != "reference":
        _fail(E, path, f"no '{META}kind=reference' metadata, so it is not an Inv-Adapter reference",
              "save one with InvAdapterSaveReference")
    version = _int_meta(meta, "format_version", "0", E, path, REFERENCE_FIX)
    if version > FORMAT_VERSION:
        _fail(E, path, f"reference format {version} is newer than this pack reads ({FORMAT_VERSION})",
              "update ComfyUI-InvAdapter")
    family = meta.get(META + "base_family") or _fail(E, path, f"metadata '{META}base_family' is missing",
                                                     REFERENCE_FIX)
    resolution = _json_meta(meta, "resolution", E, path, REFERENCE_FIX,
                            lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0
                                                                                  for x in v), "[height, width]")
    feature_sigmas = _json_meta(meta, "feature_sigmas", E, path, REFERENCE_FIX,
                                lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and x > 0 for x in v),
                                "a list of positive numbers")
    levels = None
    if META + "levels" in meta:
        levels = _json_meta(meta, "levels", E, path, REFERENCE_FIX,
                            lambda v: isinstance(v, list) and v and all(x in LEVELS + DIT_LEVELS for x in v),
                            f"a non-empty list of levels among {', '.join(LEVELS + DIT_LEVELS)}")
    convention = meta.get(META + "convention", "lowest sigma")
    if convention not in INVERSION_CONVENTIONS:
        _fail(E, path, f"metadata '{META}convention' is {convention!r}, expected one of "
                           f"{INVERSION_CONVENTIONS}",
              REFERENCE_FIX)
    for name in ("trajectory.sigmas", "trajectory.states"):
        if name not in tensors:
            _fail(E, path, f"tensor '{name}' is missing (the file is incomplete)", REFERENCE_FIX)
    sigmas, states = tensors["trajectory.sigmas"], tensors["trajectory.states"]
    check_tensor(E, path, "trajectory.sigmas", sigmas, 1, REFERENCE_FIX)
    # [n+1, R, C, h, w]; 6-D [n+1, R, C, 1, h, w] for models with video-format latents (Qwen-Image's Wan 2.1)
    if states.ndim not in (5, 6):
        _fail(E, path, f"tensor 'trajectory.states' has shape {tuple(states.shape)} ({states.ndim}-D), expected 5-D "
                       f"(or 6-D for a video-format latent)", REFERENCE_FIX)
    # the UNet sees a state at sigma s scaled by 1 / sqrt(1 + s^2) (ComfyUI's calculate_input)
    c_in = (1 + sigmas.double() ** 2).rsqrt().reshape(-1, *[1] * (states.ndim - 1)) if sigmas.ndim == 1 else None
    scaled = c_in is not None and states.shape[0] == sigmas.shape[0]
    top = check_tensor(E, path, "trajectory.states", states, None, REFERENCE_FIX,
                       scale=c_in.float() if scaled else None)
    if sigmas.numel() < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()) or float(sigmas[0]) < 0:
        _fail(E, path, "trajectory.sigmas is not an ascending list of at least 2 sigmas", REFERENCE_FIX)
    if states.shape[0] != sigmas.shape[0]:
        _fail(E, path, f"trajectory.states holds {states.shape[0]} states for {sigmas.shape[0]} sigmas",
              REFERENCE_FIX)
    images = states.shape[1]
    conds = {k[5:]: v for k, v in tensors.items() if k.startswith("cond.")}
    if "caption.context" in tensors:
        conds.setdefault("c_crossattn", tensors["caption.context"])
    if "c_crossattn" not in conds:
        _fail(E, path, "the caption conditioning (cond.c_crossattn) is missing", REFERENCE_FIX)
    for name, t in conds.items():
        top = max(top, check_tensor(E, path, f"cond.{name}", t, COND_DIMS.get(name), REFERENCE_FIX))
        if t.shape[0] not in (1, images):
            _fail(E, path, f"cond.{name} has batch {t.shape[0]} for {images} image(s)", REFERENCE_FIX)
    blocks_per_step: dict[int, set] = {}
    for name, t in tensors.items():
        if not name.startswith("features."):
            continue
        parts = name.split(".")
        if len(parts) < 5 or not parts[1].isdigit() or parts[2] not in ("self", "cross"):  # UNet and DiT names
            _fail(E, path, f"unexpected tensor '{name}' (expected features.<i>.self.<block>)", REFERENCE_FIX)
        i, block = int(parts[1]), ".".join(parts[3:])
        if not is_block_name(block):
            _fail(E, path, f"tensor '{name}' names no block of a network the pack knows ('{block}')", REFERENCE_FIX)
        if i >= len(feature_sigmas):
            _fail(E, path, f"tensor '{name}' is for step {i}, but feature_sigmas lists {len(feature_sigmas)}",
                  REFERENCE_FIX)
        top = max(top, check_tensor(E, path, name, t, 3, REFERENCE_FIX))
        if t.shape[0] != images:
            _fail(E, path, f"tensor '{name}' has batch {t.shape[0]} for {images} image(s)", REFERENCE_FIX)
        blocks_per_step.setdefault(i, set()).add((parts[2], block))
    layouts = {frozenset(v) for v in blocks_per_step.values()}
    if len(blocks_per_step) != len(feature_sigmas) or len(layouts) > 1:
        _fail(E, path, "its features do not cover the same blocks at every listed sigma", REFERENCE_FIX)
    return {"family": family, "resolution": tuple(resolution), "feature_sigmas": feature_sigmas,
            "convention": convention, "levels": levels, "peak": top}
