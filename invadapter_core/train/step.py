"""What one training step computes (docs/method.md §5), apart from how the run is driven (``loop``).

Per sample, from its own seeded generator: a timestep t ~ U[min_t, max_t] -> sigma, noise eps, whether its caption
is dropped (``draw``); the reference latent at sigma read off the reference's inversion trajectory (``make_batch``);
then the two passes (``predict``): the frozen reference pass (no gradient) and the generation pass with the EAA
fed by its features; then the loss, the weighted sum of the terms in ``LOSS_TERMS``.

Flow models (``model_sampling`` CONST: Flux, Chroma, Qwen-Image) noise as x = (1 − σ)·x0 + σ·ε, draw σ from the
model's own shifted schedule (timestep t ↦ ``percent_to_sigma``) and learn the velocity ε − x0; models with a guidance
embedding get each sample's ``guidance`` in both passes.

A new loss term is one function ``term(batch, prediction) -> scalar`` added to ``LOSS_TERMS`` and one weight in the
``[loss]`` config section under the same name (``config.LossConfig``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..reference.inversion import latent_at
from .data import TrainingSample


@dataclass
class Batch:
    """One micro-batch on the training device, sample i at sigma i."""
    x_ref: torch.Tensor               # [B, C, h, w] the reference latent at each sample's sigma
    x0: torch.Tensor                  # [B, C, h, w] the targets
    eps: torch.Tensor                 # [B, C, h, w] the noise
    sigmas: torch.Tensor              # [B]
    caption: torch.Tensor             # [B, T, D] the reference's caption (what it was inverted with)
    context: torch.Tensor             # [B, T, D] the generation's caption (the empty prompt where dropped)
    adm: Optional[torch.Tensor]       # [B, A] the generation's ADM vector (SDXL), else None
    ref_adm: Optional[torch.Tensor]   # [B, A] the reference's ADM vector, else None
    dropped: int = 0                  # samples whose caption was dropped
    guidance: Optional[torch.Tensor] = None  # [B] the guidance embedding's input (Flux-dev style models), else None
    flow: bool = False                # a flow model: x = (1 − σ)·x0 + σ·ε, the target is the velocity ε − x0


@dataclass
class Prediction:
    """What the passes give the loss terms: the noised input and the model's x0 prediction of it."""
    x: torch.Tensor
    denoised: torch.Tensor


def draw(draw_id: int, latent_shape, seed: int, dropout: float, min_t: int, max_t: int
         ) -> tuple[int, torch.Tensor, bool]:
    """A sample's timestep, noise and caption dropout: from its own generator, so they depend on neither the process
    count nor anything run before (exact resume, DDP == one process with the global batch)."""
    g = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + draw_id) % (2 ** 63))
    t = int(torch.randint(min_t, max_t + 1, (1,), generator=g))
    eps = torch.randn(latent_shape, generator=g)
    drop = bool(torch.rand((), generator=g) < dropout)
    return t, eps, drop


def is_flow(model_sampling) -> bool:
    import comfy.model_sampling

    return isinstance(model_sampling, comfy.model_sampling.CONST)


def sigma_of(model_sampling, t: int) -> float:
    """The sigma of timestep t in [0, 999]: the model's own discrete schedule, or for a flow model its (shifted)
    schedule at (t + 1) / 1000 (so never sigma 0, where the velocity target is undefined)."""
    if is_flow(model_sampling):
        return float(model_sampling.percent_to_sigma(1.0 - (t + 1) / 1000.0))
    return float(model_sampling.sigma(torch.tensor(float(t))))


def per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> broadcastable against ``like`` (4-D latents, or 5-D ones of video-latent models such as Qwen-Image)."""
    return sigmas.reshape(-1, *([1] * (like.ndim - 1)))


def make_batch(samples: list[tuple[TrainingSample, int]], seed: int, dropout: float, model_sampling,
               timesteps: tuple[int, int], empty_context: Optional[torch.Tensor], empty_adm: Optional[torch.Tensor],
               device: torch.device) -> Batch:
    """The micro-batch of ``samples`` (each with its draw id)."""
    xs_ref, x0s, epss, sigmas, captions, contexts, adms, ref_adms, dropped = [], [], [], [], [], [], [], [], 0
    for sample, draw_id in samples:
        t, eps, drop = draw(draw_id, sample.target.shape, seed, dropout, *timesteps)
        sigma = sigma_of(model_sampling, t)
        xs_ref.append(latent_at(sample.reference_sigmas, sample.reference_states, sigma))
        x0s.append(sample.target)
        epss.append(eps)
        sigmas.append(sigma)
        captions.append(sample.reference_context)
        contexts.append(empty_context.reshape(sample.context.shape) if drop else sample.context)
        adms.append(empty_adm if drop else sample.adm)
        ref_adms.append(sample.reference_adm)
        dropped += drop
    on = lambda xs: torch.stack(xs).to(device, torch.float32)  # noqa: E731
    maybe = lambda xs: None if any(x is None for x in xs) else on(xs)  # noqa: E731 - no ADM input: None
    guidance = [s.guidance for s, _ in samples]
    return Batch(on(xs_ref), on(x0s), on(epss), torch.tensor(sigmas, device=device), on(captions), on(contexts),
                 maybe(adms), maybe(ref_adms), dropped,
                 None if any(g is None for g in guidance) else torch.tensor(guidance, device=device),
                 is_flow(model_sampling))


def predict(batch: Batch, generation, net, adapter: bool = True) -> Prediction:
    """The two passes: the frozen reference pass (the reference branch always sees the caption it was inverted
    with; only the generation's is dropped), then the generation pass through ``net`` (the GenerationPass, or DDP
    around it) with the EAA fed by those features. ``adapter=False``: the base model alone."""
    if batch.flow:
        s = per_sample(batch.sigmas, batch.x0)
        x = (1.0 - s) * batch.x0 + s * batch.eps
    else:
        x = batch.x0 + batch.sigmas[:, None, None, None] * batch.eps
    guided = {} if batch.guidance is None else {"guidance": batch.guidance}
    if adapter:
        conds = {"c_crossattn": batch.caption, **guided}
        if batch.ref_adm is not None:
            conds["y"] = batch.ref_adm
        features = generation.reference_features(batch.x_ref, batch.sigmas, conds)
        denoised = net(x, batch.sigmas, batch.context, features.self_attn, features.cross_attn, batch.adm, **guided)
    else:
        denoised = generation.base.apply_model(x, batch.sigmas, c_crossattn=batch.context, **guided,
                                               **({} if batch.adm is None else {"y": batch.adm}))
    return Prediction(x, denoised)


# --------------------------------------------------------------------------------------------------- loss terms
def denoising_loss(batch: Batch, pred: Prediction) -> torch.Tensor:
    """Eq. 6: ||eps_hat - eps||^2 with eps_hat = (x - D) / sigma, the standard epsilon-prediction MSE written
    through ComfyUI's x0 output (equivalently an x0 loss weighted by 1 / sigma^2). For a flow model (x − D)/σ is
    the predicted velocity and the target ε − x0 (the flow-matching loss)."""
    if batch.flow:
        v_hat = (pred.x - pred.denoised.float()) / per_sample(batch.sigmas, pred.x)
        return F.mse_loss(v_hat, batch.eps - batch.x0)
    eps_hat = (pred.x - pred.denoised.float()) / batch.sigmas[:, None, None, None]
    return F.mse_loss(eps_hat, batch.eps)


LossTerm = Callable[[Batch, Prediction], torch.Tensor]
LOSS_TERMS: dict[str, LossTerm] = {"denoising": denoising_loss}


def total_loss(batch: Batch, pred: Prediction, weights: dict[str, float]) -> torch.Tensor:
    """The weighted sum of the loss terms whose weight is not zero."""
    terms = [w * LOSS_TERMS[name](batch, pred) for name, w in weights.items() if w != 0]
    if not terms:
        raise ValueError("every loss weight is 0: nothing to train (set loss.denoising = 1)")
    return sum(terms[1:], terms[0])
