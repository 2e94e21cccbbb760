"""Images in: ComfyUI IMAGE tensors checked and made RGB (the face crop, the reference encoder) and image files
decoded (the trainer's preprocessing, the evaluation CLI)."""
from __future__ import annotations

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class SkipItem(Exception):
    """One item that cannot be used; the reason is reported and the run goes on."""


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


def load_image(path: str) -> torch.Tensor:
    """RGB float [H, W, 3] in 0..1 (EXIF orientation applied); SkipItem when the file cannot be decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise SkipItem(f"unreadable image ({type(e).__name__}: {e})") from None
    if rgb.ndim != 3 or rgb.shape[0] < 8 or rgb.shape[1] < 8:
        raise SkipItem(f"image too small ({rgb.shape[1]}x{rgb.shape[0]} px)")
    return torch.from_numpy(rgb.copy()).float() / 255.0
