"""Images in: ComfyUI IMAGE tensors checked and made RGB (the face crop, the reference encoder) and image files
decoded (the trainer's preprocessing, the evaluation CLI)."""
from __future__ import annotations

import os
from typing import Optional

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


class ImageFileError(ValueError):
    """An image file that cannot be read (the message names the file and why)."""


def load_image_file(path) -> torch.Tensor:
    """An image file as ComfyUI's LoadImage node decodes it: RGB float32 [H, W, 3] in 0..1 on the CPU (the first
    frame). LoadImage decodes through PyAV (FFmpeg), whose JPEG decoder gives other pixels than PIL's (up to 3/255
    apart: enough to move a detected face box by a pixel and a face similarity by 0.02), so code that scores or
    encodes a photo outside a graph (the evaluation) must read it this way to match what a graph computes.
    Needs ComfyUI importable (``invadapter_core.comfyui.host.use_comfyui``)."""
    from comfy_api.latest import InputImpl
    from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

    path = str(path)
    try:  # LoadImage.load_image: PyAV first ...
        images = InputImpl.VideoFromFile(path).get_components().images
        if images.shape[0] > 0:
            return images[0].to("cpu", torch.float32)
    except Exception as pyav_error:  # noqa: BLE001 - LoadImage would fail here too: PIL gets a try, then say why
        problem = f"{type(pyav_error).__name__}: {pyav_error}"
    else:
        problem = "no frame"
    try:  # ... then PIL, as LoadImage does for what PyAV does not decode (animated WebP)
        import numpy as np

        with Image.open(path) as im:
            frame = ImageOps.exif_transpose(next(ImageSequence.Iterator(im))).convert("RGB")
            return torch.from_numpy(np.array(frame).astype(np.float32) / 255.0)
    except (OSError, UnidentifiedImageError, ValueError, StopIteration, Image.DecompressionBombError) as e:
        raise ImageFileError(f"{path}: unreadable image ({problem}; {type(e).__name__}: {e})") from None


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
