"""Deterministic DDIM in ComfyUI's sigma space (x = x0 + sigma * eps), forwards and backwards.

In these coordinates a DDIM step from sigma to sigma' is exactly ``x + (sigma' - sigma) * eps_hat`` with
``eps_hat = (x - D(x, sigma)) / sigma``; inversion is the same step with ascending sigmas.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..files.format import INVERSION_CONVENTIONS

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]  # (x, sigma) -> D(x, sigma), the x0 prediction


def eps_from_denoised(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma


CONVENTIONS = INVERSION_CONVENTIONS  # "lowest sigma" (default) or "classic": see inversion_sigmas


def inversion_sigmas(schedule: Sequence[float] | torch.Tensor, convention: str = "lowest sigma") -> list[float]:
    """A sampling schedule (descending, usually ending in 0) turned into the ascending inversion path.

    "lowest sigma": zero is dropped, the clean latent is taken as the state at the smallest sigma of the schedule.
    "classic": the path starts at sigma 0 (the clean latent itself), as diffusers' DDIMInverseScheduler does.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown inversion convention {convention!r}; expected one of {CONVENTIONS}")
    values = sorted({float(s) for s in (schedule.tolist() if torch.is_tensor(schedule) else schedule) if s > 0})
    if len(values) < 2:
        raise ValueError(f"an inversion needs at least 2 non-zero sigmas, got {values}")
    return [0.0] + values if convention == "classic" else values


def evaluation_sigma(sigmas: Sequence[float], i: int, convention: str) -> float:
    """Where step i -> i+1 evaluates the model: at the current sigma ("lowest sigma"), or at the target sigma with
    the current latent ("classic", null-text inversion's and diffusers' choice; sigma 0 is never evaluated)."""
    return sigmas[i] if convention == "lowest sigma" else sigmas[i + 1]


def invert(denoise: Denoiser, x0: torch.Tensor, sigmas: Sequence[float],
           on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
           convention: str = "lowest sigma") -> torch.Tensor:
    """DDIM inversion from ``x0`` (taken at ``sigmas[0]``) up to ``sigmas[-1]``; returns all states [n+1, ...]."""
    states = [x0]
    x = x0
    for i in range(len(sigmas) - 1):
        at = evaluation_sigma(sigmas, i, convention)
        x = x + (sigmas[i + 1] - sigmas[i]) * eps_from_denoised(x, at, denoise(x, at))
        states.append(x)
        if on_step is not None:
            on_step(i, x)
    return torch.stack(states)


def latent_at(sigmas: torch.Tensor, states: torch.Tensor, sigma: float) -> torch.Tensor:
    """The trajectory's state at any sigma.

    Between two stored points the straight line is an exact partial DDIM step (the step is linear in sigma with a
    fixed eps_hat); outside the stored range the nearest segment is extended the same way.
    """
    n = sigmas.shape[0]
    if n == 1:
        return states[0]
    i = int(torch.searchsorted(sigmas, torch.tensor(float(sigma), dtype=sigmas.dtype)).item())
    i = min(max(i, 1), n - 1)  # segment [i-1, i]
    s0, s1 = float(sigmas[i - 1]), float(sigmas[i])
    if abs(sigma - s0) < 1e-9 * max(1.0, s0):
        return states[i - 1]
    if abs(sigma - s1) < 1e-9 * max(1.0, s1):
        return states[i]
    w = (sigma - s0) / (s1 - s0)
    return states[i - 1] + w * (states[i] - states[i - 1])
