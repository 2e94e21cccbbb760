"""The identity loss's recognizer for real checkpoints (``loss.identity``, ``loss.recognizer``): a clean latent in
sampler space -> an ArcFace embedding [B, E], differentiable in the latent, as ``step.identity_loss`` wants it.

The latent is taken out of sampler space (the model's ``process_latent_out``), decoded by the checkpoint's own VAE
(``first_stage_model.decode``, with gradients; optionally at a lower resolution: the latent resized first), turned
into 0..1 RGB by the VAE's own ``process_output``, cropped to the face and embedded by ``face.arcface_torch``.
The face: the shards' images are face crops, the face box's side 1 / (1 + 2 x data.face_margin) of the square and
centred in it (``face.detect.square_crop``; shifted where the box met the photo's border), so the crop is that
central square, resized to ArcFace's 112 px. No keypoint alignment: the prediction and the reference are cropped
alike, and only their embeddings' agreement is the loss. VAE, UNet and ArcFace stay frozen: gradients reach only what
produced the latent (the EAA through the denoised prediction).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..face.arcface_torch import TorchArcFace, load_arcface


class LatentFaceEmbedder:
    """``__call__(latent [B, C, h, w] in sampler space) -> embedding [B, E]`` through VAE decode and ArcFace."""

    def __init__(self, vae, process_latent_out: Callable[[torch.Tensor], torch.Tensor], arcface: TorchArcFace,
                 face_fraction: float, decode_resolution: int = 0):
        self.vae, self.process_latent_out, self.arcface = vae, process_latent_out, arcface
        self.face_fraction, self.decode_resolution = face_fraction, decode_resolution
        vae.first_stage_model.requires_grad_(False)  # frozen: the loss's gradient passes through, nothing trains

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] sampler-space latent -> [B, 3, H, W] RGB in 0..1, differentiable."""
        import comfy.model_management

        z = self.process_latent_out(latent)
        if self.decode_resolution:
            ratio = self.vae.spacial_compression_decode()
            cells = max(1, round(self.decode_resolution / ratio))
            if cells != z.shape[-1]:  # the image's aspect kept; area when shrinking, as an image would be
                size = (max(1, round(z.shape[-2] * cells / z.shape[-1])), cells)
                z = F.interpolate(z, size=size, mode="area" if cells < z.shape[-1] else "bilinear")
        # the VAE on its device (a no-op once loaded); the UNet stays loaded beside it where memory allows
        comfy.model_management.load_models_gpu([self.vae.patcher], force_full_load=True)
        image = self.vae.first_stage_model.decode(z.to(self.vae.device, self.vae.vae_dtype))
        if image.ndim == 5:  # a video VAE (Qwen-Image): its one frame
            image = image[:, :, 0]
        # process_output works in place: on a float32 copy, leaving the decoder's output as autograd saved it
        return self.vae.process_output(image.to(torch.float32, copy=True))

    def face(self, image: torch.Tensor) -> torch.Tensor:
        """The central face square of each image (``face_fraction`` of its shorter side)."""
        h, w = image.shape[-2:]
        side = max(1, round(min(h, w) * self.face_fraction))
        top, left = (h - side) // 2, (w - side) // 2
        return image[..., top:top + side, left:left + side]

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        device = next(self.arcface.parameters(), torch.empty(0)).device
        return self.arcface(self.face(self.decode(latent)).to(device))


def face_fraction(face_margin: float) -> float:
    """The face box's share of the crop's side for ``data.face_margin`` (``face.detect.square_crop``)."""
    return 1.0 / (1.0 + 2.0 * max(0.0, face_margin))


def build_recognizer(cfg, model, vae) -> LatentFaceEmbedder:
    """The configured identity-loss recognizer: ``loss.recognizer``'s ArcFace on the compute device, ``vae`` (the
    checkpoint's) for the decode, ``model`` (the ModelPatcher) for the latent's sampler space."""
    import comfy.model_management

    if vae is None:
        raise ValueError("loss.identity decodes the prediction with the checkpoint's VAE: load it (need_vae)")
    arcface = load_arcface(cfg.loss.recognizer, comfy.model_management.get_torch_device())
    return LatentFaceEmbedder(vae, model.model.process_latent_out, arcface, face_fraction(cfg.data.face_margin),
                              cfg.loss.recognizer_resolution)
