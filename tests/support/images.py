"""Images in and out of a test server: PNG bytes to arrays, one graph run to its image, a ControlNet hint."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from . import graphs


def png_array(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def run_image(client, graph) -> np.ndarray:
    """Run ``graph`` on the server of ``client``; its one output image as float RGB."""
    entry = client.run(graph)
    images = client.images(entry["prompt_id"])
    assert len(images) == 1, entry.get("outputs")
    return png_array(images[0])


def control_png() -> bytes:
    """A 64x64 hint image: a white disc on black, like a mask or an edge map."""
    yy, xx = np.mgrid[:64, :64]
    disc = (((yy - 32) ** 2 + (xx - 28) ** 2) < 18 ** 2).astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(np.stack([disc] * 3, -1)).save(buf, format="PNG")
    return buf.getvalue()


def controlnet_image(client, checkpoint: str, controlnet: str, seed: int, prefix: str) -> np.ndarray:
    """The plain txt2img graph (graphs.sd15_txt2img) steered by ``controlnet`` at strength 1 on control_png()."""
    hint = client.upload_image(control_png(), name="invadapter-test-hint.png")
    return run_image(client, graphs.sd15_txt2img(checkpoint, seed=seed, prefix=prefix,
                                                 controlnet=(controlnet, hint, 1.0)))
