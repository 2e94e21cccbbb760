"""Draws the pack's own images (our work, no third-party content):

- assets/pose.png: an OpenPose skeleton (a person facing the camera, head and shoulders to the hips), the control
  image of the ControlNet example; OpenPose's 18 COCO keypoints, limb order and colours, as openpose ControlNets
  were trained on.
- assets/icon.png: the Comfy Registry icon (a face outline and the inversion loop that makes the identity).

    python scripts/draw_assets.py        # rewrites both (deterministic)
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ASSETS = Path(__file__).resolve().parents[1] / "assets"
POSE_SIZE = 512
# Keypoints on a 512 x 512 canvas, OpenPose COCO order: nose, neck, right shoulder/elbow/wrist, left
# shoulder/elbow/wrist, right hip/knee/ankle, left hip/knee/ankle, right eye, left eye, right ear, left ear
# ("right" is the person's right, on the image's left). None = not visible.
POSE = [(256, 150), (256, 250), (178, 252), (150, 352), (160, 452), (334, 252), (362, 352), (352, 452),
        (205, 470), None, None, (307, 470), None, None, (238, 130), (274, 130), (216, 142), (296, 142)]
# Limbs as pairs of keypoint indices, in OpenPose's drawing order; each limb has its own colour.
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def draw_pose() -> Image.Image:
    image = Image.new("RGB", (POSE_SIZE, POSE_SIZE), "black")
    limbs = Image.new("RGB", image.size, "black")
    draw = ImageDraw.Draw(limbs)
    for (a, b), color in zip(LIMBS, COLORS):
        if POSE[a] is not None and POSE[b] is not None:
            draw.line([POSE[a], POSE[b]], fill=tuple(int(c * 0.6) for c in color), width=8)
    image.paste(limbs)
    draw = ImageDraw.Draw(image)
    for point, color in zip(POSE, COLORS):
        if point is not None:
            x, y = point
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=color)
    return image


def draw_icon(size: int = 400) -> Image.Image:
    """A face outline (the reference) inside a loop with an arrow head (the inversion), in the pack's link colours."""
    scale = 4  # drawn large, then downsampled: smooth edges
    big = size * scale
    image = Image.new("RGBA", (big, big), (30, 30, 40, 255))
    draw = ImageDraw.Draw(image)
    s = lambda v: int(v * big)  # noqa: E731 (fractions of the side)
    start, end, radius = -50, 240, 0.4  # degrees, clockwise from 3 o'clock (PIL's convention)
    draw.arc([s(0.5 - radius), s(0.5 - radius), s(0.5 + radius), s(0.5 + radius)], start=start, end=end,
             fill=(200, 113, 244), width=s(0.05))
    theta = math.radians(end)  # the arrow head continues the loop where it ends, pointing clockwise
    cx, cy = 0.5 + radius * math.cos(theta), 0.5 + radius * math.sin(theta)
    tx, ty = -math.sin(theta), math.cos(theta)
    nx, ny = math.cos(theta), math.sin(theta)
    draw.polygon([(s(cx + 0.1 * tx), s(cy + 0.1 * ty)), (s(cx + 0.06 * nx), s(cy + 0.06 * ny)),
                  (s(cx - 0.06 * nx), s(cy - 0.06 * ny))], fill=(200, 113, 244))
    draw.ellipse([s(0.33), s(0.24), s(0.67), s(0.66)], outline=(244, 113, 165), width=s(0.035))  # head
    for eye_x in (0.43, 0.57):
        draw.ellipse([s(eye_x - 0.025), s(0.40), s(eye_x + 0.025), s(0.45)], fill=(244, 113, 165))
    draw.arc([s(0.42), s(0.46), s(0.58), s(0.58)], start=20, end=160, fill=(244, 113, 165), width=s(0.025))
    draw.arc([s(0.22), s(0.62), s(0.78), s(1.02)], start=200, end=340, fill=(77, 203, 187), width=s(0.035))
    return image.resize((size, size), Image.LANCZOS).convert("RGB")


def main() -> int:
    draw_pose().save(ASSETS / "pose.png", optimize=True)
    draw_icon().save(ASSETS / "icon.png", optimize=True)
    for name in ("pose.png", "icon.png"):
        print(ASSETS / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
