"""ComfyUI IMAGE tensors in, checked and made RGB, shared by the face crop and the reference encoder."""
from __future__ import annotations

import torch


def to_rgb(images, error: type[Exception] = ValueError) -> torch.Tensor:
    """IMAGE [B, H, W, C] (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA) -> float32 RGB [B, H, W, 3] on the CPU;
    anything else raises ``error`` saying what was wrong."""
    if not torch.is_tensor(images) or images.ndim not in (3, 4):
        raise error(f"expected an IMAGE tensor [batch, height, width, channels], got "
                    f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    if images.ndim == 3:
        images = images[None]
    b, h, w, c = images.shape
    if b == 0 or h == 0 or w == 0:
        raise error(f"the image batch is empty (shape {tuple(images.shape)}): connect a loaded image")
    if c not in (1, 2, 3, 4):
        raise error(f"the images have {c} channels; expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA)")
    images = images.detach().to("cpu", torch.float32)
    if c in (1, 2):
        images = images[..., :1].expand(b, h, w, 3)
    elif c == 4:
        images = images[..., :3]
    return images
