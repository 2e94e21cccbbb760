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

from ..adapter.identity_token import lowest_index
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
    # K photos per sample (``train.references``): x_ref, caption and ref_adm hold B x K rows, sample-major,
    # combined as ``combine``; ref_clean [B x K, C, h, w]: each reference's clean latent (its trajectory's start)
    references: int = 1
    combine: str = "concat"
    ref_clean: Optional[torch.Tensor] = None
    # the identity loss's recognizer: a clean latent (sampler space) -> embedding [B, E], differentiable
    recognizer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # the identity token's input (``model.identity_tokens``): each reference's state at its lowest positive sigma
    # [B x K, C, h, w] and that sigma [B x K]; the captions ("" where dropped) for the text path
    identity_x: Optional[torch.Tensor] = None
    identity_sigmas: Optional[torch.Tensor] = None
    captions: tuple = ()


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
               device: torch.device, references: int = 1, combine: str = "concat",
               recognizer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, identity: bool = False) -> Batch:
    """The micro-batch of ``samples`` (each with its draw id); ``references`` = K: each sample's reference and its
    first K - 1 ``more_references`` (MFF), every one read at the sample's sigma."""
    xs_ref, x0s, epss, sigmas, captions, contexts, adms, ref_adms, dropped = [], [], [], [], [], [], [], [], 0
    cleans, lows, low_sigmas, texts = [], [], [], []
    for sample, draw_id in samples:
        t, eps, drop = draw(draw_id, sample.target.shape, seed, dropout, *timesteps)
        sigma = sigma_of(model_sampling, t)
        views = [(sample.reference_states, sample.reference_context, sample.reference_adm)]
        views += [(v.states, v.context, v.adm) for v in sample.more_references[:references - 1]]
        if len(views) < references:
            raise ValueError(f"train.references = {references}, but a sample ({sample.caption!r}) has "
                             f"{len(views)} reference photo(s): give the data source more photos per identity "
                             f"(TrainingSample.more_references) or lower train.references")
        for states, caption, ref_adm in views:
            xs_ref.append(latent_at(sample.reference_sigmas, states, sigma))
            cleans.append(states[0])
            if identity:
                low = lowest_index(sample.reference_sigmas)
                lows.append(states[low])
                low_sigmas.append(float(sample.reference_sigmas[low]))
            captions.append(caption)
            ref_adms.append(ref_adm)
        x0s.append(sample.target)
        epss.append(eps)
        sigmas.append(sigma)
        contexts.append(empty_context.reshape(sample.context.shape) if drop else sample.context)
        adms.append(empty_adm if drop else sample.adm)
        dropped += drop
        texts.append("" if drop else sample.caption)
    on = lambda xs: torch.stack(xs).to(device, torch.float32)  # noqa: E731
    maybe = lambda xs: None if any(x is None for x in xs) else on(xs)  # noqa: E731 - no ADM input: None
    guidance = [s.guidance for s, _ in samples]
    return Batch(on(xs_ref), on(x0s), on(epss), torch.tensor(sigmas, device=device), on(captions), on(contexts),
                 maybe(adms), maybe(ref_adms), dropped,
                 guidance=None if any(g is None for g in guidance) else torch.tensor(guidance, device=device),
                 flow=is_flow(model_sampling), references=references, combine=combine,
                 ref_clean=on(cleans) if recognizer is not None else None, recognizer=recognizer,
                 identity_x=on(lows) if identity else None,
                 identity_sigmas=torch.tensor(low_sigmas, device=device) if identity else None, captions=tuple(texts))


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
        k = batch.references
        if k > 1 and "guidance" in guided:  # the reference rows are B x K: each sample's guidance K times
            conds["guidance"] = batch.guidance.repeat_interleave(k)
        features = generation.reference_features(batch.x_ref, batch.sigmas.repeat_interleave(k), conds)
        grouped = {} if k == 1 else {"references": k, "combine": batch.combine}
        if batch.identity_x is not None:  # the identity token: its summary pass, then the tokens inside ``net``
            grouped["identity"] = generation.identity_summary(batch.identity_x, batch.identity_sigmas, conds, k)
            grouped["captions"] = list(batch.captions)
        denoised = net(x, batch.sigmas, batch.context, features.self_attn, features.cross_attn, batch.adm,
                       **guided, **grouped)
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


def identity_loss(batch: Batch, pred: Prediction) -> torch.Tensor:
    """1 - cos(R(D), R(ref)), weighted by alpha_bar(t) (the signal's share at the sampled sigma): a recognizer R's
    embedding of the model's denoised prediction at the sampled timestep against the reference's (the mean of its K
    photos'). The weight trusts the prediction where it is a face (low noise) and lets it go where it is a blur.
    ``R`` decodes the latent itself (``Batch.recognizer``); gradients reach the adapter through D only."""
    if batch.recognizer is None:
        raise ValueError("loss.identity needs a face recognizer, and none was given to the trainer: set "
                         "loss.recognizer (the command line builds it), or loss.identity = 0")
    with torch.no_grad():
        ref = batch.recognizer(batch.ref_clean).float()
        ref = F.normalize(F.normalize(ref, dim=-1).reshape(len(batch.sigmas), batch.references, -1).mean(1), dim=-1)
    emb = F.normalize(batch.recognizer(pred.denoised.float()).float(), dim=-1)
    s = batch.sigmas.float()
    # the signal's share of x's variance: alpha_bar = 1 / (1 + sigma^2) for x = x0 + sigma*eps; for a flow model
    # (x = (1 - sigma)*x0 + sigma*eps) (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2)
    weight = (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2) if batch.flow else 1 / (1 + s ** 2)
    return (weight * (1 - (emb * ref).sum(-1))).mean()


LossTerm = Callable[[Batch, Prediction], torch.Tensor]
LOSS_TERMS: dict[str, LossTerm] = {"denoising": denoising_loss, "identity": identity_loss}


def total_loss(batch: Batch, pred: Prediction, weights: dict[str, float]) -> torch.Tensor:
    """The weighted sum of the loss terms whose weight is not zero."""
    terms = [w * LOSS_TERMS[name](batch, pred) for name, w in weights.items() if w != 0]
    if not terms:
        raise ValueError("every loss weight is 0: nothing to train (set loss.denoising = 1)")
    return sum(terms[1:], terms[0])
