"""The toy base model: ComfyUI's own UNetModel, small, wrapped as an SD15-family ComfyUI model the pack accepts.

- Model space: ``pixel_unshuffle(2 * image - 1, 2)``, 32x32x3 -> 12x16x16, a lossless stand-in for a VAE latent
  (``PixelUnshuffleVAE``, with a ComfyUI VAE's encode/decode interface); a 12-channel latent format.
- The UNet: ``comfy.supported_models.SD15`` with a custom unet_config (1.06 M parameters, 7 transformer blocks at
  16x16, 8x8 and the middle), so the pack sees family "SD15", SD1.5's noise schedule and ComfyUI's sampling.
  Its output GroupNorm has one group: ComfyUI's GroupNorm(32, 32) would be one channel per group and erase each
  channel's spatial mean (stripes and checkerboards after pixel_shuffle).
- The "text encoder": context = two 32-d tokens [a learned start token, MLP(pose vector)]; a learned null token
  replaces the pose token 20 % of the time in pretraining (the empty prompt).
Pretraining (``pretrain``): eps prediction with min-SNR-5 weighting on SD1.5's schedule, AdamW with warm-up and a
cosine decay, gradient clipping, EMA of the weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from . import render, store

IDENTITIES, MIN_DISTANCE, IDENTITY_SEED = 16, 3, 0
ALL_COMBINATIONS = len(render.all_identities())  # 1,280
CONTEXT_DIM = 32
UNET_CONFIG = {
    "image_size": 16, "in_channels": 12, "out_channels": 12, "model_channels": 32, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "use_spatial_transformer": True, "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1, "context_dim": CONTEXT_DIM,
    "use_linear_in_transformer": True, "legacy": False, "adm_in_channels": None, "use_checkpoint": False,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
HEAD_CHANNELS = 16


class ToyLatentFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 12
    spacial_downscale_ratio = 2
    scale_factor = 1.0


class PixelUnshuffleVAE:
    """A lossless "VAE" with ComfyUI's VAE interface: IMAGE [B, H, W, 3] in 0..1 <-> latent [B, 12, H/2, W/2]."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return images_to_latent(pixels[..., :3].movedim(-1, 1))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent_to_images(latent).movedim(1, -1)


def images_to_latent(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in 0..1 -> [B, 12, H/2, W/2] in -1..1."""
    return F.pixel_unshuffle(images.float() * 2 - 1, 2)


def latent_to_images(latent: torch.Tensor) -> torch.Tensor:
    return ((F.pixel_shuffle(latent.float(), 2) + 1) / 2).clamp(0, 1)


class PoseEncoder(nn.Module):
    """The toy's text encoder: pose [B, 11] -> context [B, 2, 32]; ``drop`` rows get the null token instead."""

    def __init__(self, dim: int = CONTEXT_DIM, hidden: int = 64):
        super().__init__()
        self.start = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.null = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.mlp = nn.Sequential(nn.Linear(render.POSE_DIM, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, pose: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        token = self.mlp(pose)
        if drop is not None:
            token = torch.where(drop[:, None], self.null.expand_as(token), token)
        return torch.stack([self.start.expand_as(token), token], dim=1)

    def empty(self, batch: int = 1) -> torch.Tensor:
        """The empty prompt: [start, null]."""
        return torch.stack([self.start, self.null])[None].expand(batch, 2, -1)


def build_unet_model() -> comfy.model_base.BaseModel:
    """The toy BaseModel with uninitialised weights (ComfyUI's layers skip init)."""
    config = comfy.supported_models.SD15(UNET_CONFIG)
    config.unet_config.update(num_heads=-1, num_head_channels=HEAD_CHANNELS)  # SD15's extra config forces 8 heads
    config.latent_format = ToyLatentFormat()
    config.set_inference_dtype(torch.float32, None)
    # BaseModel directly: SD15.get_model would read 12 input channels as an inpainting model
    model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    norm = model.diffusion_model.out[0]
    model.diffusion_model.out[0] = type(norm)(1, norm.num_channels, eps=norm.eps)
    return model


def initialise(unet: nn.Module, seed: int) -> None:
    """torch's default init for every layer, zero for the last layer of each residual branch and of the output
    (each block starts as the identity; the first prediction is 0)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in unet.modules():
            for cls in (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm):
                if isinstance(m, cls):
                    cls.reset_parameters(m)
    zero = [unet.out[-1]] + [m.out_layers[-1] for m in unet.modules() if isinstance(m, ResBlock)] + \
           [m.proj_out for m in unet.modules() if isinstance(m, SpatialTransformer)]
    with torch.no_grad():
        for layer in zero:
            for p in layer.parameters():
                p.zero_()


@dataclass
class ToyBase:
    """Everything the pack needs from "a checkpoint": the ModelPatcher, the text encoder and the VAE."""
    model: comfy.model_patcher.ModelPatcher
    encoder: PoseEncoder
    vae: PixelUnshuffleVAE
    identities: torch.Tensor  # [16, 5] attribute tuples

    @torch.no_grad()
    def context(self, pose: torch.Tensor) -> torch.Tensor:
        return self.encoder(pose)

    @torch.no_grad()
    def empty_context(self, batch: int = 1) -> torch.Tensor:
        return self.encoder.empty(batch).clone()

    def render(self, identity_index: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        return render.render(self.identities[identity_index], pose)


def identity_set(count: int = IDENTITIES) -> torch.Tensor:
    """The first ``count`` of the 16 identities (a smaller set trains a base faster: the CI test uses 4), or
    ``ALL_COMBINATIONS``: every attribute combination (the base for unseen identities, ``unseen.py``)."""
    if count == ALL_COMBINATIONS:
        return render.all_identities()
    if not 1 <= count <= IDENTITIES:
        raise ValueError(f"identities = {count}: give 1 to {IDENTITIES} (the picked identities) or "
                         f"{ALL_COMBINATIONS} (every attribute combination)")
    return render.pick_identities(IDENTITIES, MIN_DISTANCE, IDENTITY_SEED)[:count]


def patcher(model: comfy.model_base.BaseModel) -> comfy.model_patcher.ModelPatcher:
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


# ------------------------------------------------------------------------------------------------ pretraining
@dataclass
class PretrainRecipe:
    steps: int = 1400
    batch: int = 64
    identities: int = IDENTITIES
    lr: float = 1e-3
    lr_end: float = 1e-4
    warmup: int = 100  # at most a tenth of the steps
    betas: tuple = (0.9, 0.99)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema: float = 0.998  # a horizon of 500 steps: a short run needs a shorter one, or the EMA keeps the init
    min_snr: float = 5.0
    drop_pose: float = 0.2
    seed: int = 0
    # start from another recipe's base instead of a fresh initialisation (the base for unseen identities fine-tunes
    # the 16-identity base on every combination: it can already draw every attribute value)
    init: Optional["PretrainRecipe"] = None

    def lr_at(self, step: int) -> float:
        warmup = min(self.warmup, self.steps // 10)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(self.steps - warmup, 1)
        return self.lr_end + 0.5 * (self.lr - self.lr_end) * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_with_ema(recipe: PretrainRecipe, params: list, batch_loss: Callable[[], torch.Tensor],
                   log: Callable[[str], None], label: str) -> list[float]:
    """AdamW on ``params`` with the recipe's learning-rate schedule, gradient clipping and an EMA of the weights,
    ``recipe.steps`` steps of ``batch_loss()`` (which draws its own batch); the parameters end as the EMA's. Returns
    the losses."""
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    losses, started = [], time.time()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(step)
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - recipe.ema)
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            log(f"{label} step {step + 1}/{recipe.steps}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f}, "
                f"{time.time() - started:.0f} s")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return losses


def pretrain(recipe: PretrainRecipe, identities: torch.Tensor, log: Callable[[str], None] = print
             ) -> tuple[comfy.model_base.BaseModel, PoseEncoder, list[float]]:
    """Trains UNet + pose encoder on renders of ``identities`` in random poses; returns the EMA weights."""
    if recipe.init is not None:
        start, _ = load_or_pretrain(recipe.init, log)
        model, encoder = from_tensors(to_tensors(start.model.model, start.encoder))
    else:
        model = build_unet_model()
        initialise(model.diffusion_model, recipe.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed + 1)
            encoder = PoseEncoder()
    unet = model.diffusion_model
    encoder.requires_grad_(True)
    unet.requires_grad_(True)
    ms = model.model_sampling
    gen = torch.Generator().manual_seed(recipe.seed + 2)

    def batch_loss() -> torch.Tensor:
        b = recipe.batch
        who = torch.randint(0, len(identities), (b,), generator=gen)
        pose = render.random_poses(b, gen)
        x0 = images_to_latent(render.render(identities[who], pose))
        t = torch.randint(0, 1000, (b,), generator=gen).float()
        sigma = ms.sigma(t)
        eps = torch.randn(x0.shape, generator=gen)
        context = encoder(pose, drop=torch.rand(b, generator=gen) < recipe.drop_pose)
        x = x0 + sigma[:, None, None, None] * eps
        denoised = model.apply_model(x, sigma, c_crossattn=context)
        eps_hat = (x - denoised) / sigma[:, None, None, None]
        # min-SNR-gamma for eps prediction: weight min(SNR, gamma) / SNR with SNR = 1 / sigma^2
        weight = torch.clamp(recipe.min_snr * sigma ** 2, max=1.0)
        return (weight * ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3))).mean()

    losses = train_with_ema(recipe, list(unet.parameters()) + list(encoder.parameters()), batch_loss, log,
                            "base pretraining")
    unet.requires_grad_(False)
    encoder.requires_grad_(False)
    return model, encoder, losses


# ------------------------------------------------------------------------------------------------ cache
def base_path(recipe: PretrainRecipe):
    extra = {}
    if recipe.init is not None:  # a fine-tuned base: named by its start too
        extra = {"lr": recipe.lr, "from": base_path(recipe.init).stem.replace("base-", "")}
    return store.cache_path("base", ids=recipe.identities, steps=recipe.steps, batch=recipe.batch, seed=recipe.seed,
                            ema=recipe.ema, **extra)


def load_or_pretrain(recipe: PretrainRecipe, log: Callable[[str], None] = print) -> tuple[ToyBase, dict]:
    """The cached base for this recipe, or a freshly pretrained one (then cached). Also returns what happened."""
    identities = identity_set(recipe.identities)
    path = base_path(recipe)
    info = {"path": str(path), "cached": path.exists(), "seconds": 0.0}
    if path.exists():
        tensors, meta = store.load(path)
        model, encoder = from_tensors(tensors)
        info["pretrain_seconds"] = float(meta.get("seconds", "nan"))
    else:
        log(f"pretraining the toy base ({recipe.steps} steps at batch {recipe.batch}); cached as {path}")
        started = time.time()
        model, encoder, losses = pretrain(recipe, identities, log)
        info["seconds"] = round(time.time() - started, 1)
        info["pretrain_seconds"] = info["seconds"]
        store.save(path, to_tensors(model, encoder), {"seconds": str(info["seconds"]),
                                                      "final_loss": f"{sum(losses[-100:]) / 100:.5f}",
                                                      "threads": str(torch.get_num_threads())})
    model.diffusion_model.requires_grad_(False)
    return ToyBase(patcher(model), encoder.eval(), PixelUnshuffleVAE(), identities), info


def to_tensors(model: comfy.model_base.BaseModel, encoder: PoseEncoder) -> dict[str, torch.Tensor]:
    """The base as one file's tensors: the UNet under "unet.", the pose encoder under "encoder."."""
    return {**{f"unet.{k}": v for k, v in model.diffusion_model.state_dict().items()},
            **{f"encoder.{k}": v for k, v in encoder.state_dict().items()}}


def from_tensors(tensors: dict[str, torch.Tensor]) -> tuple[comfy.model_base.BaseModel, PoseEncoder]:
    """``to_tensors`` undone (float32 whatever the file's dtype: the shipped demo base is stored in float16)."""
    tensors = {k: v.float() for k, v in tensors.items()}
    model = build_unet_model()
    model.diffusion_model.load_state_dict(store.prefixed(tensors, "unet."))
    model.diffusion_model.requires_grad_(False)
    encoder = PoseEncoder()
    encoder.load_state_dict(store.prefixed(tensors, "encoder."))
    encoder.requires_grad_(False)
    return model, encoder
