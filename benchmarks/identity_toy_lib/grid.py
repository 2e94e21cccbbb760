"""The picture for people: one column per identity (its first reference), one row per arm."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def save(path: Path, references: torch.Tensor, arms: dict[str, torch.Tensor], poses: int, every: int = 1,
         scale: int = 4, pad: int = 2) -> None:
    """Row 0: every ``every``-th reference; then each arm's sample for the first target pose of that reference.
    ``references`` [R, 3, H, W]; ``arms`` name -> [R * poses, 3, H, W] (reference-major, as ``Evaluation.run``
    returns them)."""
    from PIL import Image

    rows = [references[::every]] + [images[::poses * every] for images in arms.values()]
    r, _, h, w = rows[0].shape
    canvas = torch.ones(3, len(rows) * (h + pad) - pad, r * (w + pad) - pad)
    for i, row in enumerate(rows):
        for j in range(r):
            canvas[:, i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = row[j]
    canvas = F.interpolate(canvas[None], scale_factor=scale, mode="nearest")[0]
    array = (canvas.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
    Image.fromarray(array).save(path)
