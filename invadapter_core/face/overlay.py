"""The face-similarity overlay: each image with its score written on it and a box around the face that was scored."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .recognize import to_uint8
from .scores import FaceScores
from ..files.images import to_rgb

COLOURS = {"same person": (40, 200, 90), "different": (235, 70, 55), None: (250, 205, 40), "no face": (160, 160, 160)}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable (needs Pillow >= 10.1 with FreeType)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def draw_scores(images: torch.Tensor, scores: FaceScores) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> a new RGB IMAGE [B, H, W, 3]: the similarity (and the raw number) at the top left, the
    scored face boxed; green/red against the recognizer's same-person threshold, yellow where it has none, grey text
    "no face" where no face was found."""
    rgb = to_rgb(images)
    if rgb.shape[0] != len(scores):
        raise ValueError(f"{rgb.shape[0]} images but {len(scores)} scores: score this batch first")
    out = []
    for i in range(rgb.shape[0]):
        pil = Image.fromarray(to_uint8(rgb[i]))
        draw = ImageDraw.Draw(pil)
        h, w = rgb.shape[1:3]
        sim = scores.similarity[i]
        if math.isnan(sim):
            colour, lines = COLOURS["no face"], ["no face"]
        else:
            colour = COLOURS[scores.scale.verdict(sim)]
            lines = [f"{sim:.2f}", f"{scores.scale.raw_name[:4]} {scores.raw[i]:.2f}"]
            box = (scores.faces[i] or {}).get("box")
            if box:
                draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=colour,
                               width=max(1, round(min(h, w) / 160)))
        size = max(8, round(min(h, w) / 14))
        font = _font(size)
        pad = max(1, size // 5)
        y = pad
        for line in lines:
            left, top, right, bottom = draw.textbbox((pad, y), line, font=font)
            draw.rectangle([left - pad, top - pad, right + pad, bottom + pad], fill=(0, 0, 0))
            draw.text((pad, y), line, fill=colour, font=font)
            y = bottom + 2 * pad
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0))
    return torch.stack(out)
