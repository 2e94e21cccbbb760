"""Synthetic identities: 32x32 RGB cartoon faces rendered in torch, a batch at a time.

An identity is a tuple of five discrete attributes (skin, hair colour, hair shape, eye colour, mark: 4*5*4*4*4 =
1,280 combinations). A pose is everything else, 11 numbers: centre offset (2), scale, rotation, background colour
(3), brightness, light gradient (2), mouth open. Images are float [B, 3, 32, 32] in 0..1; shapes are soft masks
(about one pixel of anti-aliasing), so rotations and sub-pixel offsets change pixels smoothly.
"""
from __future__ import annotations

import itertools
import math

import torch

SIZE = 32
ATTRIBUTES = {"skin": 4, "hair_colour": 5, "hair_shape": 4, "eye_colour": 4, "mark": 4}
POSE_DIM = 11
SKIN = torch.tensor([[1.00, 0.85, 0.74], [0.90, 0.68, 0.46], [0.62, 0.42, 0.28], [0.36, 0.24, 0.17]])
HAIR = torch.tensor([[0.08, 0.07, 0.07], [0.45, 0.25, 0.10], [0.95, 0.82, 0.35], [0.85, 0.30, 0.08],
                     [0.85, 0.85, 0.88]])
EYES = torch.tensor([[0.15, 0.35, 0.95], [0.10, 0.70, 0.20], [0.40, 0.22, 0.05], [0.75, 0.10, 0.75]])
MOUTH = torch.tensor([0.55, 0.08, 0.10])
MARK_RED = torch.tensor([0.90, 0.05, 0.05])
DARK = torch.tensor([0.05, 0.05, 0.06])
SHARPNESS = 2.5 * SIZE / 2  # sigmoid slope in normalised units: about one pixel from 0.2 to 0.8


def all_identities() -> torch.Tensor:
    """Every attribute combination [1280, 5] (long), in lexicographic order."""
    return torch.tensor(list(itertools.product(*(range(n) for n in ATTRIBUTES.values()))), dtype=torch.long)


def pick_identities(count: int, min_distance: int, seed: int) -> torch.Tensor:
    """``count`` identities [count, 5], any two differing in at least ``min_distance`` attributes (seeded greedy
    draw over a random order of all combinations)."""
    pool = all_identities()
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    chosen: list[torch.Tensor] = []
    for i in order.tolist():
        candidate = pool[i]
        if all(int((candidate != c).sum()) >= min_distance for c in chosen):
            chosen.append(candidate)
            if len(chosen) == count:
                return torch.stack(chosen)
    raise ValueError(f"cannot draw {count} identities {min_distance} attributes apart")


def random_poses(count: int, generator: torch.Generator) -> torch.Tensor:
    """[count, 11] poses, every entry in -1..1 (the scaled pose vector the base model is conditioned on)."""
    pose = torch.rand(count, POSE_DIM, generator=generator) * 2 - 1
    pose[:, 10] = torch.where(pose[:, 10] > 0, 1.0, -1.0)  # mouth open / closed
    return pose


def _soft(signed_distance: torch.Tensor) -> torch.Tensor:
    """Inside (negative distance) -> 1, outside -> 0, with a one-pixel ramp."""
    return torch.sigmoid(-signed_distance * SHARPNESS)


def _ellipse(x, y, cx, cy, rx, ry):
    return _soft((torch.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1) * min(rx, ry))


def _paint(image: torch.Tensor, mask: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Alpha-composite a per-sample colour [B, 3] (or one colour [3]) over ``image`` through ``mask`` [B, H, W]."""
    colour = colour.expand(image.shape[0], 3) if colour.dim() == 1 else colour
    m = mask[:, None]
    return image * (1 - m) + colour[:, :, None, None] * m


def render(identity: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """identity [B, 5] long, pose [B, 11] in -1..1 -> images [B, 3, 32, 32] in 0..1."""
    b = identity.shape[0]
    skin, hair_c, hair_s, eye_c, mark = identity.unbind(1)
    dx, dy = pose[:, 0] * 0.15, pose[:, 1] * 0.15
    scale = 1.0 + 0.15 * pose[:, 2]
    angle = pose[:, 3] * math.radians(20)
    background = 0.2 + 0.6 * (pose[:, 4:7] + 1) / 2
    brightness = 1.0 + 0.15 * pose[:, 7]
    gradient = 0.25 * pose[:, 8:10]
    mouth_open = pose[:, 10] > 0

    axis = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE * 2 - 1
    v, u = torch.meshgrid(axis, axis, indexing="ij")  # v down, u right
    u, v = u.expand(b, SIZE, SIZE), v.expand(b, SIZE, SIZE)
    col = lambda t: t[:, None, None]  # noqa: E731
    cos, sin = torch.cos(col(angle)), torch.sin(col(angle))
    # image -> face coordinates (face centred at 0, unrotated, unit scale)
    x = (cos * (u - col(dx)) + sin * (v - col(dy))) / col(scale)
    y = (-sin * (u - col(dx)) + cos * (v - col(dy))) / col(scale)

    image = background[:, :, None, None].expand(b, 3, SIZE, SIZE).clone()
    face = _ellipse(x, y, 0.0, 0.05, 0.52, 0.62)
    hair_colour, skin_colour = HAIR[hair_c], SKIN[skin]
    # hair behind the face: long hair falls to the shoulders
    long_hair = (hair_s == 1).float()
    behind = _ellipse(x, y, 0.0, 0.12, 0.68, 0.72) * _soft(y - 0.65) * col(long_hair)
    image = _paint(image, behind, hair_colour)
    image = _paint(image, face, skin_colour)
    cap = _ellipse(x, y, 0.0, 0.0, 0.58, 0.72)
    top = {0: _soft(y + 0.30),                                   # short: a cap down to the forehead
           1: _soft(y + 0.25),                                   # long: cap, plus the hair behind
           2: _soft(x.abs() - 0.16) * _soft(y + 0.2),            # mohawk: a narrow crest, tall
           3: _soft(y + 0.05 - 0.35 * torch.sigmoid(6 * x))}     # side fringe: deep on the left only
    crest = _ellipse(x, y, 0.0, -0.35, 0.16, 0.62) * _soft(y + 0.2)
    hair = torch.zeros_like(x)
    for shape, region in top.items():
        region = cap * region if shape != 2 else torch.maximum(crest, cap * _soft(y + 0.52))
        hair = hair + region * col((hair_s == shape).float())
    image = _paint(image, hair.clamp(0, 1), hair_colour)

    eyes = _ellipse(x, y, -0.22, -0.05, 0.13, 0.12) + _ellipse(x, y, 0.22, -0.05, 0.13, 0.12)
    image = _paint(image, eyes.clamp(0, 1), torch.tensor([0.97, 0.97, 0.97]))
    irises = _ellipse(x, y, -0.22, -0.04, 0.08, 0.09) + _ellipse(x, y, 0.22, -0.04, 0.08, 0.09)
    image = _paint(image, irises.clamp(0, 1), EYES[eye_c])

    mouth_ry = torch.where(mouth_open, 0.11, 0.035)
    mouth = _soft((torch.sqrt((x / 0.18) ** 2 + ((y - 0.33) / col(mouth_ry)) ** 2) - 1) * col(mouth_ry))
    image = _paint(image, mouth, MOUTH)

    is_mark = lambda k: col((mark == k).float())  # noqa: E731
    dot = _ellipse(x, y, -0.30, 0.18, 0.08, 0.08) * is_mark(1)                       # a red cheek dot
    beard = face * _soft(0.47 - y) * is_mark(2)                                       # a chin beard
    ring = lambda cx: _soft((torch.sqrt((x - cx) ** 2 + (y + 0.05) ** 2) - 0.17).abs() - 0.035)  # noqa: E731
    bridge = _soft((y + 0.05).abs() - 0.03) * _soft(x.abs() - 0.06)
    glasses = (ring(-0.22) + ring(0.22) + bridge).clamp(0, 1) * is_mark(3)            # glasses
    image = _paint(image, dot, MARK_RED)
    image = _paint(image, beard, hair_colour * 0.6)
    image = _paint(image, glasses, DARK)

    light = 1 + col(gradient[:, 0]) * u + col(gradient[:, 1]) * v
    image = image * (col(brightness) * light)[:, None]
    return image.clamp(0, 1)
