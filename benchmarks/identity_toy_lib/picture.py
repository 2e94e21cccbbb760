"""The demo's picture, readable at a glance: one row per shown reference (the reference, then a few samples of each
arm in other poses), each arm's identity accuracy written above its samples, and a frame around every sample that
says whether the identity classifier reads the reference's identity in it (green) or not (red)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

GREEN, RED, INK, GREY, PAPER = (30, 150, 60), (210, 50, 40), (20, 20, 20), (110, 110, 110), (255, 255, 255)


def tile(image: torch.Tensor, scale: int):
    """[3, H, W] in 0..1 -> a PIL image ``scale`` times larger (nearest: the toy's pixels stay visible)."""
    from PIL import Image

    big = F.interpolate(image[None].float(), scale_factor=scale, mode="nearest")[0]
    return Image.fromarray((big.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8"))


def save(path: Path, references: torch.Tensor, arms: dict[str, torch.Tensor], correct: dict[str, torch.Tensor],
         accuracy: dict[str, tuple[int, int]], rows: list[int], poses: int, shown: int = 3, chance: float = 1 / 16,
         scale: int = 3) -> None:
    """``references`` [R, 3, H, W]; ``arms`` name -> samples [R * poses, 3, H, W] (reference-major); ``correct``
    name -> [R * poses] bool (the classifier reads the reference's identity); ``accuracy`` name -> (hits, samples)
    over every sample of the arm; ``rows``: the references shown; ``shown``: samples shown per arm and row."""
    from PIL import Image, ImageDraw, ImageFont

    size = references.shape[-1] * scale
    frame, gap, group_gap, margin = 4, 6, 24, 16
    title_font, font, small = (ImageFont.load_default(size=s) for s in (22, 16, 13))
    cell = size + 2 * frame
    group = shown * cell + (shown - 1) * gap
    header, footer = 86, 58
    width = 2 * margin + cell + len(arms) * (group_gap + group)
    height = header + len(rows) * (cell + gap) - gap + footer
    canvas = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 10), "Inv-Adapter on the identity toy: does the sample keep the reference's identity?",
              font=title_font, fill=INK)

    x0 = margin + cell + group_gap
    draw.text((margin, header - 24), "reference", font=font, fill=INK)
    for a, name in enumerate(arms):
        x = x0 + a * (group + group_gap)
        hits, total = accuracy[name]
        draw.text((x, header - 44), name, font=font, fill=INK)
        draw.text((x, header - 24), f"identity accuracy {100 * hits / total:.0f} % ({hits}/{total})", font=font,
                  fill=GREEN if hits / total > 2 * chance else GREY)

    for i, r in enumerate(rows):
        y = header + i * (cell + gap)
        canvas.paste(tile(references[r], scale), (margin + frame, y + frame))
        for a, (name, images) in enumerate(arms.items()):
            for k in range(shown):
                n = r * poses + k
                x = x0 + a * (group + group_gap) + k * (cell + gap)
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=GREEN if bool(correct[name][n]) else RED)
                canvas.paste(tile(images[n], scale), (x + frame, y + frame))

    y = height - footer + 10
    draw.text((margin, y), f"{round(1 / chance)} synthetic identities (chance {100 * chance:.2f} %); every arm samples the same target "
                           f"poses with the same noise; the target pose is the prompt, the identity comes only from "
                           f"the reference.", font=small, fill=GREY)
    draw.text((margin, y + 20), "Frame: green = an identity classifier reads the reference's identity in the sample, "
                                "red = another identity. Accuracy counts every sample of the arm, not only the ones "
                                "shown.", font=small, fill=GREY)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
