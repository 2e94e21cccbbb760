"""DDIM in sigma space, checked against a denoiser whose probability-flow ODE is known exactly."""
import math

import pytest
import torch

from invadapter_core.reference.inversion import invert, inversion_sigmas, latent_at
from support.ddim import ddim_step, sample

MU, S = 0.7, 0.5  # data ~ N(MU, S^2): its exact denoiser is known in closed form


def gaussian_denoiser(x, sigma):
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def karras(n, smin=0.03, smax=14.6, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return ((smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho).tolist()


def test_ddim_step_is_the_sigma_space_update():
    x, d = torch.randn(3, 4), torch.randn(3, 4)
    eps = (x - d) / 2.0
    assert torch.allclose(ddim_step(x, 2.0, 3.5, d), x + 1.5 * eps)


def test_inversion_sigmas_ascend_and_drop_zero():
    assert inversion_sigmas(torch.tensor([14.6, 3.0, 0.5, 0.0])) == pytest.approx([0.5, 3.0, 14.6])
    with pytest.raises(ValueError):
        inversion_sigmas([1.0, 0.0])


def test_inversion_then_sampling_reconstructs_and_error_falls_with_steps():
    x0 = MU + S * torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (10, 50, 200):
        sig = sorted(karras(steps))
        traj = invert(gaussian_denoiser, x0, sig)
        back = sample(gaussian_denoiser, traj[-1], sig[::-1])
        errors.append(((back - x0).norm() / x0.norm()).item())
    # DDIM is first order: the error falls roughly as 1/steps (measured 0.21, 0.044, 0.011)
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[1] / errors[2] > 3.0, errors
    assert errors[-1] < 0.02, errors  # stated tolerance at 200 steps on the exact denoiser


def test_latent_at_is_exact_on_nodes_and_a_partial_ddim_step_between():
    sig = torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64)
    x0 = torch.randn(2, 3, dtype=torch.float64)
    states = invert(gaussian_denoiser, x0, sig.tolist())
    for i, s in enumerate(sig.tolist()):
        assert torch.equal(latent_at(sig, states, s), states[i])
    mid = 2.5  # a partial DDIM step from sigma 1.0 with that step's eps_hat
    expected = ddim_step(states[1], 1.0, mid, gaussian_denoiser(states[1], 1.0))
    assert torch.allclose(latent_at(sig, states, mid), expected)
    above = ddim_step(states[1], 1.0, 7.0, gaussian_denoiser(states[1], 1.0))  # extends the last segment
    assert torch.allclose(latent_at(sig, states, 7.0), above)
    assert math.isfinite(latent_at(sig, states, 0.01).sum().item())
