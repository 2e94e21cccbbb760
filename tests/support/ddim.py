"""Plain DDIM sampling in sigma space, written out independently of the pack: what the tests compare the pack's
inversion (``reference.inversion``) with. A DDIM step from sigma to sigma' is x + (sigma' - sigma) * eps_hat."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def ddim_step(x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor) -> torch.Tensor:
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def sample(denoise: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigmas: Sequence[float]
           ) -> torch.Tensor:
    """Plain DDIM sampling along descending ``sigmas`` (the reverse of the inversion on the same sigmas)."""
    for i in range(len(sigmas) - 1):
        x = ddim_step(x, sigmas[i], sigmas[i + 1], denoise(x, sigmas[i]))
    return x
