"""ComfyUI IMAGE tensors in, checked and made RGB, shared by the face crop and the reference encoder."""
from __future__ import annotations

import os
from typing import Optional

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


def truncated_image_file(path: str) -> Optional[str]:
    """Why the image file ``path`` cannot be fully decoded (its data ends early), or None. ComfyUI's LoadImage
    decodes such a file anyway and fills the missing rows with black; here PIL decodes it with truncated images
    refused (the flag is global: set only for this read, as ComfyUI's own ``node_helpers.pillow`` does)."""
    from PIL import Image, ImageFile, ImageSequence, UnidentifiedImageError

    if not os.path.isfile(path):
        return None
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            for frame in ImageSequence.Iterator(image):
                frame.load()
    except UnidentifiedImageError:
        return None  # not an image PIL reads (ComfyUI may read it otherwise): nothing to say
    except (OSError, SyntaxError, ValueError) as e:
        return str(e) or type(e).__name__
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return None
