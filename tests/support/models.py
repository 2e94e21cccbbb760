"""Deterministic random-weight test models (no weights are ever downloaded).

- ``tiny_sd15_model()``: an in-process SD1.5-shaped ModelPatcher, small enough for many forward passes;
  ``tiny_sd15_inpaint_model()`` (9 input channels, c_concat) and ``tiny_sd21v_model()`` (SD2.x, v-prediction)
  beside it.
- ``shallow_sd15_checkpoint()`` / ``full_sd15_checkpoint()``: single-file checkpoints (UNet + CLIP-L + SD VAE)
  that ComfyUI detects as SD15; ``controlnet_checkpoint()`` and ``lora_file()`` match one of them.
- SDXL-family checkpoints and tiny SDXL models: ``sdxl_models.py``.

Key names and shapes come from ComfyUI's own modules built on the meta device, so the files load exactly like a
real checkpoint. Every tensor is drawn from a generator seeded by its own key name, so a value never depends on
what else is in the file. Files are cached outside the repo (``$INVADAPTER_TEST_CACHE``, default
``~/.cache/invadapter-comfyui/test-models``) under names carrying RECIPE: bump it whenever a recipe changes.
Needs ComfyUI importable with CPU mode set (tests/conftest.py does it; other callers use host.import_comfy_cpu()).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import torch

RECIPE = "r1"
SEED = 1234
CONTEXT_DIM = 768
SD2_CONTEXT_DIM = 1024  # OpenCLIP-H
# num_res_blocks per checkpoint kind: "full" is the standard SD1.5 UNet; "shallow" keeps SD1.5's channels (320,
# which detection requires), heads and transformer placement with one res block per level (~2/3 of the weights).
KINDS = {"shallow": 1, "full": 2}
TINY = {"model_channels": 32, "num_res_blocks": 1, "num_heads": 2}
LORA_RANK = 4


def _log(message: str) -> None:
    print(f"[test-models] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    default = "~/.cache/invadapter-comfyui/test-models"
    return Path(os.environ.get("INVADAPTER_TEST_CACHE") or default).expanduser()


def stored_dtype(name: str, dtype=torch.float16) -> torch.dtype:
    """The dtype random_tensor gives ``name`` (position ids are integers), known before the tensor is drawn."""
    return torch.int64 if name.endswith("position_ids") else dtype


def random_tensor(name: str, shape, dtype=torch.float16, seed: int = SEED) -> torch.Tensor:
    """Matrices/kernels ~ N(0, 1/fan_in) (keeps activations O(1) through the depth); 1-D weights are always norm
    scales (a Linear or Conv weight is never 1-D) -> 1; biases and norm shifts -> 0."""
    shape = tuple(shape)
    if stored_dtype(name, dtype) == torch.int64:
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).clone()
    if len(shape) >= 2:
        gen = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))).to(dtype)
    return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=dtype)


# ---------------------------------------------------------------- key names and shapes from ComfyUI's modules
def sd15_unet_config(num_res_blocks: int, model_channels: int = 320, in_channels: int = 4) -> dict:
    """ComfyUI's detected unet_config for an SD1.5 layout: channel_mult 1,2,4,4, one transformer per res block on
    the first three levels (input, middle and output stages), none on the last. ``in_channels`` 9: inpainting."""
    levels = 4
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": in_channels, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels, "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1] * (num_res_blocks * 3) + [0] * num_res_blocks,
        "transformer_depth_output": [1] * ((num_res_blocks + 1) * 3) + [0] * (num_res_blocks + 1),
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def sd21_unet_config(num_res_blocks: int, model_channels: int = 320) -> dict:
    """The SD2.x (512-base / 768-v) layout: SD1.5's blocks with linear proj_in/out and OpenCLIP-H's 1024 context."""
    return {**sd15_unet_config(num_res_blocks, model_channels), "use_linear_in_transformer": True,
            "context_dim": SD2_CONTEXT_DIM}


def model_config(config_class, unet_config: dict, dtype, **overrides):
    """A comfy.supported_models config for ``unet_config`` with its inference dtype set. ``overrides`` are set
    after the class's unet_extra_config, which otherwise wins over unet_config (e.g. SDXL's 64-channel heads,
    too wide for a tiny model)."""
    config = config_class(unet_config)
    config.unet_config.update(overrides)
    config.set_inference_dtype(dtype, None)
    return config


def _sd15_config(unet_config: dict, dtype):
    import comfy.supported_models

    return model_config(comfy.supported_models.SD15, unet_config, dtype)


def _shapes(module: torch.nn.Module, prefix: str) -> dict[str, torch.Size]:
    return {prefix + k: v.shape for k, v in module.state_dict().items()}


def unet_shapes(kind: str) -> dict[str, torch.Size]:
    config = _sd15_config(sd15_unet_config(KINDS[kind]), torch.float16)
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
    return _shapes(model.diffusion_model, "model.diffusion_model.")


def clip_shapes() -> dict[str, torch.Size]:
    import comfy.clip_model
    import comfy.ops

    config = json.loads((Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json").read_text())
    with torch.device("meta"):
        clip = comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", comfy.ops.disable_weight_init)
    shapes = _shapes(clip, "cond_stage_model.transformer.")
    shapes.pop("cond_stage_model.transformer.text_projection.weight")  # SD1.5 files have none (CLIP-L hidden states)
    return shapes


def vae_shapes() -> dict[str, torch.Size]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    return _shapes(vae, "first_stage_model.")


def controlnet_module_shapes(config, prefix: str) -> dict[str, torch.Size]:
    """A ControlNet for the UNet of model config ``config``, built the way comfy.controlnet.load_controlnet
    builds it."""
    import comfy.cldm.cldm
    import comfy.ops

    unet_config = dict(config.unet_config)
    unet_config.pop("out_channels")
    unet_config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, device="meta")
    with torch.device("meta"):
        control = comfy.cldm.cldm.ControlNet(**unet_config)
    return _shapes(control, prefix)


def controlnet_shapes(kind: str) -> dict[str, torch.Size]:
    return controlnet_module_shapes(_sd15_config(sd15_unet_config(KINDS[kind]), torch.float16), "control_model.")


def unet_attention_lora_targets(unet: dict[str, torch.Size]) -> dict[str, tuple[int, int]]:
    """Kohya LoRA name (ldm key names) -> (out, in) for every attention projection in UNet shapes ``unet``."""
    targets = {}
    for key, shape in unet.items():
        if ".transformer_blocks." in key and any(f".attn{i}.{p}.weight" in key for i in (1, 2)
                                                 for p in ("to_q", "to_k", "to_v", "to_out.0")):
            name = key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            targets[f"lora_unet_{name}"] = (shape[0], shape[1])
    return targets


def text_encoder_lora_targets(prefix: str, layers: int, width: int) -> dict[str, tuple[int, int]]:
    """Kohya LoRA name -> (out, in) for the self-attention projections of a CLIP text encoder (``prefix``:
    lora_te for SD1.5, lora_te1 / lora_te2 for SDXL's CLIP-L / bigG)."""
    return {f"{prefix}_text_model_encoder_layers_{layer}_self_attn_{proj}": (width, width)
            for layer in range(layers) for proj in ("q_proj", "k_proj", "v_proj", "out_proj")}


def lora_targets(kind: str) -> dict[str, tuple[int, int]]:
    """Kohya LoRA name -> (out, in) for every attention projection of the UNet and of CLIP-L."""
    return {**unet_attention_lora_targets(unet_shapes(kind)), **text_encoder_lora_targets("lora_te", 12, CONTEXT_DIM)}


# ---------------------------------------------------------------- files
def _cached(filename: str, build) -> Path:
    """Reuse the cached file, or build it under a temporary name and rename (never a half-written file)."""
    path = cache_dir() / filename
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _log(f"generating {path} ...")
    start = time.time()
    try:
        build(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _log(f"  {path.stat().st_size / 1e6:.0f} MB in {time.time() - start:.1f} s")
    return path


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}


def _save_random(path: Path, shapes: dict[str, torch.Size], what: str) -> None:
    """A safetensors file written one tensor at a time: safetensors' save_file holds the whole file twice in
    memory (14 GB for full-size SDXL); this holds one tensor."""
    names = sorted(shapes)
    header, offset = {}, 0
    for name in names:
        dtype = stored_dtype(name)
        size = math.prod(shapes[name]) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "invadapter_test": f"random weights ({what}, {RECIPE})"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    params = sum(math.prod(shape) for shape in shapes.values())
    _log(f"  {what}: {len(names)} tensors, {params / 1e6:.0f}M parameters, fp16")
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in names:
            f.write(random_tensor(name, shapes[name]).contiguous().numpy().tobytes())


def _kind(for_checkpoint) -> str:
    """Accepts "shallow"/"full" or a path returned by shallow_/full_sd15_checkpoint()."""
    if str(for_checkpoint) in KINDS:
        return str(for_checkpoint)
    for kind in KINDS:
        if f"-sd15-{kind}-" in Path(for_checkpoint).name:
            return kind
    raise ValueError(f"not a test checkpoint: {for_checkpoint}")


def sd15_checkpoint(kind: str) -> Path:
    def build(tmp):
        shapes = {**unet_shapes(kind), **clip_shapes(), **vae_shapes()}
        _save_random(tmp, shapes, f"SD1.5 {kind} checkpoint")

    return _cached(f"invadapter-test-sd15-{kind}-{RECIPE}.safetensors", build)


def shallow_sd15_checkpoint() -> Path:
    return sd15_checkpoint("shallow")


def full_sd15_checkpoint() -> Path:
    return sd15_checkpoint("full")


def controlnet_checkpoint(for_checkpoint="shallow") -> Path:
    kind = _kind(for_checkpoint)
    return _cached(f"invadapter-test-controlnet-sd15-{kind}-{RECIPE}.safetensors",
                   lambda tmp: _save_random(tmp, controlnet_shapes(kind), f"SD1.5 {kind} ControlNet"))


def _save_lora(path: Path, targets: dict[str, tuple[int, int]], what: str) -> None:
    """A kohya-format LoRA (lora_down, lora_up, alpha) of rank LORA_RANK on every ``targets`` module."""
    from safetensors.torch import save_file

    tensors = {}
    for name, (out_features, in_features) in targets.items():
        # down ~ N(0, 1/in) like a layer; up ~ N(0, 1/(4 r)) so that up @ down (alpha = rank) changes each
        # weight by about half its own scale: clearly visible, still finite.
        tensors[f"{name}.lora_down.weight"] = random_tensor(f"{name}.lora_down", (LORA_RANK, in_features))
        up = random_tensor(f"{name}.lora_up", (out_features, LORA_RANK)) * (math.sqrt(LORA_RANK) / 4)
        tensors[f"{name}.lora_up.weight"] = up.to(torch.float16)
        tensors[f"{name}.alpha"] = torch.tensor(float(LORA_RANK), dtype=torch.float16)
    _log(f"  LoRA for the {what}: {len(tensors) // 3} modules, rank {LORA_RANK}")
    save_file(tensors, str(path), metadata={"format": "pt", "invadapter_test": f"random LoRA ({RECIPE})"})


def lora_file(for_checkpoint="shallow") -> Path:
    kind = _kind(for_checkpoint)
    return _cached(f"invadapter-test-lora-sd15-{kind}-{RECIPE}.safetensors",
                   lambda tmp: _save_lora(tmp, lora_targets(kind), f"{kind} checkpoint"))


ADAPTER_RESOLUTION = 64  # the smoke runs' reference resolution (support.graphs.SMOKE_INPUTS)


def adapter_file(for_checkpoint="shallow") -> Path:
    """A trained adapter's stand-in for an SD1.5 test checkpoint: self and cross EAA on every block with random
    weights (the trainer's layout, build_adapter init "random"), for references encoded at ADAPTER_RESOLUTION."""
    kind = _kind(for_checkpoint)

    def build(tmp):
        from invadapter_core.train.model import build_adapter
        from invadapter_core.adapter.weights import save_adapter

        model = random_patcher(_sd15_config(sd15_unet_config(KINDS[kind]), torch.float32))
        torch.manual_seed(SEED)
        save_adapter(build_adapter(model, ADAPTER_RESOLUTION, 16, init="random"), str(tmp), torch.float16)

    return _cached(f"invadapter-test-adapter-sd15-{kind}-{RECIPE}.safetensors", build)


# ---------------------------------------------------------------- in-process
def random_patcher(config, seed: int = SEED, model_type=None):
    """A ComfyUI ModelPatcher (CPU) around ``config.get_model`` -- or a BaseModel of ``model_type`` where the
    model type is not read from weights -- with every UNet parameter drawn by random_tensor (ComfyUI's layers
    skip init)."""
    import comfy.model_base
    import comfy.model_patcher

    cpu = torch.device("cpu")
    if model_type is None:
        model = config.get_model({}, device=cpu)
    else:
        model = comfy.model_base.BaseModel(config, model_type=model_type, device=cpu)
    with torch.no_grad():
        for name, param in model.diffusion_model.named_parameters():
            param.copy_(random_tensor(name, param.shape, param.dtype, seed))
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def tiny_sd15_model(seed: int = SEED, model_channels: int = TINY["model_channels"], num_heads: int = TINY["num_heads"],
                    in_channels: int = 4):
    """A ComfyUI ModelPatcher around an SD15 BaseModel with SD1.5's block layout (the shallow checkpoint's block
    names) at a fraction of the width; fp32, CPU. ``in_channels`` 9 makes it an inpainting model."""
    import comfy.supported_models

    unet_config = sd15_unet_config(TINY["num_res_blocks"], model_channels, in_channels)
    return random_patcher(model_config(comfy.supported_models.SD15, unet_config, torch.float32, num_heads=num_heads),
                          seed)


def tiny_sd15_inpaint_model(seed: int = SEED):
    """tiny_sd15_model with an inpainting UNet: 9 input channels (latent, mask, masked-image latent). ComfyUI
    marks a model as inpainting by in_channels > 4 alone (supported_models_base.BASE.inpaint_model), and
    get_model then sets concat_keys ("mask", "masked_image") so every call needs c_concat [B, 5, h, w]."""
    return tiny_sd15_model(seed, in_channels=9)


def tiny_sd21v_model(seed: int = SEED, model_channels: int = TINY["model_channels"], head_channels: int = 16):
    """A tiny SD2.x 768-v model: ComfyUI's SD20 config (linear proj_in/out, 1024-wide context, fixed-width heads)
    on a v-prediction BaseModel (ModelSamplingDiscrete + V_PREDICTION). ComfyUI reads v-prediction from real SD2
    weights (SD20.model_type: the spread of one norm bias), which random weights lack, so the model type is set
    here the way get_model would set it for a 768-v checkpoint."""
    import comfy.model_base
    import comfy.supported_models

    config = model_config(comfy.supported_models.SD20, sd21_unet_config(TINY["num_res_blocks"], model_channels),
                          torch.float32, num_head_channels=head_channels)
    return random_patcher(config, seed, model_type=comfy.model_base.ModelType.V_PREDICTION)


def text_context(seed: int = 0, batch: int = 1, width: int = CONTEXT_DIM) -> torch.Tensor:
    """A random CLIP-like text context [batch, 77, width] for a tiny model's cross-attention (768: SD1.5;
    SD2_CONTEXT_DIM for tiny_sd21v_model; SDXL: sdxl_models.sdxl_text_context)."""
    return torch.randn((batch, 77, width), generator=torch.Generator().manual_seed(seed))


def server_models(kind: str = "shallow") -> dict[str, dict[str, Path]]:
    """The files a test server gets, by ComfyUI model folder, under stable names (graphs don't carry RECIPE).
    ``kind``: an SD1.5 kind ("shallow", "full") or "vega" (sdxl_models.server_models serves every SDXL kind)."""
    if kind not in KINDS:
        from . import sdxl_models

        return sdxl_models.server_models(kind)
    return {
        "checkpoints": {f"invadapter-test-sd15-{kind}.safetensors": sd15_checkpoint(kind)},
        "controlnet": {f"invadapter-test-controlnet-sd15-{kind}.safetensors": controlnet_checkpoint(kind)},
        "loras": {f"invadapter-test-lora-sd15-{kind}.safetensors": lora_file(kind)},
        "invadapter": {f"invadapter-test-adapter-sd15-{kind}.safetensors": adapter_file(kind)},
    }


# ---------------------------------------------------------------- CLIP for the CLIP-T / CLIP-I metrics
def clip_l_file() -> Path:
    """A standalone CLIP-L text encoder as CLIPLoader takes it, with its text projection (clip_l.safetensors)."""
    import comfy.clip_model
    import comfy.ops

    def build(tmp):
        config = json.loads((Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json").read_text())
        with torch.device("meta"):
            clip = comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", comfy.ops.disable_weight_init)
        _save_random(tmp, _shapes(clip, ""), "CLIP-L text encoder")

    return _cached(f"invadapter-test-clip-l-{RECIPE}.safetensors", build)


def clip_vision_file() -> Path:
    """A CLIP ViT-L/14 vision model with its projection, as CLIPVisionLoader takes it (the smallest CLIP vision
    layout ComfyUI detects: 24 layers, 303M parameters)."""
    import comfy.clip_model
    import comfy.ops

    def build(tmp):
        config = json.loads((Path(comfy.clip_model.__file__).parent / "clip_vision_config_vitl.json").read_text())
        with torch.device("meta"):
            vision = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta",
                                                                 comfy.ops.disable_weight_init)
        _save_random(tmp, _shapes(vision, ""), "CLIP ViT-L/14 vision model")

    return _cached(f"invadapter-test-clip-vision-vitl-{RECIPE}.safetensors", build)
