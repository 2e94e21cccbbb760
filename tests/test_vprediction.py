"""Inversion in sigma space does not depend on what the network predicts (noise or velocity): the same exact
denoiser, written once as an eps-prediction and once as a v-prediction network inside ComfyUI's own BaseModel and
model sampling, is inverted by the pack's encode path and reconstructed by ComfyUI's euler sampler with the same
result. (Random v-prediction UNets run the whole pack in tests/test_families.py.)"""
import pytest
import torch

import comfy.k_diffusion.sampling
import comfy.model_base
import comfy.model_patcher
from invadapter_core.reference.encode import invert_latent, sampler_sigmas
from support.models import _sd15_config, sd15_unet_config, text_context
from test_ddim import MU, S


class ExactDenoiser(torch.nn.Module):
    """The exact denoiser of N(MU, S^2) data as the network ComfyUI calls: it gets c_in * x and the timestep and
    returns eps, or v (ComfyUI's V_PREDICTION: denoised = x / (s^2 + 1) - v s / sqrt(s^2 + 1)). It keeps a real
    UNet's block lists (never run) so the pack finds the transformer blocks it expects."""

    def __init__(self, unet, model_sampling, predicts_v: bool):
        super().__init__()
        self.input_blocks, self.middle_block, self.output_blocks = unet.input_blocks, unet.middle_block, \
            unet.output_blocks
        self.model_sampling, self.predicts_v = model_sampling, predicts_v
        self.dtype = torch.float32  # what BaseModel casts the input to

    def forward(self, xc, timesteps, context=None, **kwargs):
        sigma = self.model_sampling.sigma(timesteps).reshape(-1, 1, 1, 1).to(xc.dtype)
        x = xc * (sigma ** 2 + 1).sqrt()
        denoised = (S ** 2 * x + sigma ** 2 * MU) / (S ** 2 + sigma ** 2)
        if self.predicts_v:
            return (x / (sigma ** 2 + 1) - denoised) * (sigma ** 2 + 1).sqrt() / sigma
        return (x - denoised) / sigma


def exact_model(model_type):
    config = _sd15_config(sd15_unet_config(1, 32), torch.float32)
    base = comfy.model_base.BaseModel(config, model_type=model_type, device=torch.device("cpu"))
    base.diffusion_model = ExactDenoiser(base.diffusion_model, base.model_sampling,
                                         model_type == comfy.model_base.ModelType.V_PREDICTION)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def round_trip(model_type, steps: int) -> float:
    """Relative error of invert (the encode node's code) -> ComfyUI's euler from the inverted noise."""
    model = exact_model(model_type)
    base = model.model
    x0 = MU + S * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = text_context(seed=1)
    ref = invert_latent(model, base.process_latent_out(x0), context, steps, "simple", (64, 64), keep_features=False)
    sigmas = sampler_sigmas(model, steps, "simple")
    denoise = lambda x, s: base.apply_model(x, s, c_crossattn=context)  # noqa: E731
    with torch.no_grad():
        back = comfy.k_diffusion.sampling.sample_euler(denoise, ref.inverted, sigmas, disable=True)
    # the clean latent sits at the schedule's lowest sigma; euler ends at 0: compare at the same point
    return ((back - x0).norm() / x0.norm()).item()


def test_v_prediction_inverts_exactly_as_eps_prediction():
    eps = [round_trip(comfy.model_base.ModelType.EPS, n) for n in (10, 50)]
    v = [round_trip(comfy.model_base.ModelType.V_PREDICTION, n) for n in (10, 50)]
    assert v == pytest.approx(eps, rel=1e-4, abs=1e-6), (eps, v)
    assert v[1] < v[0] and v[1] < 0.1, v
