"""Colour distance (CIEDE2000) and the colour palettes the installed ComfyUI frontend ships, for the link colour
test."""
from __future__ import annotations

import importlib.resources
import math
import re


def hex_to_rgb(color: str) -> tuple[float, float, float]:
    digits = color.strip().lstrip("#")
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    if not re.fullmatch(r"[0-9A-Fa-f]{6}", digits):
        raise ValueError(f"not a #RGB or #RRGGBB colour: {color!r}")
    return tuple(int(digits[i:i + 2], 16) / 255 for i in (0, 2, 4))


def rgb_to_lab(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """sRGB (0..1) -> CIELAB, D65 white."""
    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = map(linear, rgb)
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t):
        return t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def delta_e2000(lab1, lab2) -> float:
    """CIEDE2000 colour difference (Sharma, Wu and Dalal 2005); about 1 is just noticeable, above 10 two colours
    read as different at a glance."""
    l1, a1, b1 = lab1
    l2, a2, b2 = lab2
    c_mean = (math.hypot(a1, b1) + math.hypot(a2, b2)) / 2
    g = 0.5 * (1 - math.sqrt(c_mean ** 7 / (c_mean ** 7 + 25 ** 7)))
    a1, a2 = (1 + g) * a1, (1 + g) * a2
    c1, c2 = math.hypot(a1, b1), math.hypot(a2, b2)
    h1 = math.degrees(math.atan2(b1, a1)) % 360 if c1 else 0.0
    h2 = math.degrees(math.atan2(b2, a2)) % 360 if c2 else 0.0
    dh = 0.0 if c1 * c2 == 0 else (h2 - h1 + 180) % 360 - 180
    d_l, d_c = l2 - l1, c2 - c1
    d_h = 2 * math.sqrt(c1 * c2) * math.sin(math.radians(dh / 2))
    l_mean, c_mean = (l1 + l2) / 2, (c1 + c2) / 2
    if c1 * c2 == 0:
        h_mean = h1 + h2
    elif abs(h1 - h2) <= 180:
        h_mean = (h1 + h2) / 2
    else:
        h_mean = (h1 + h2 + 360) / 2 if h1 + h2 < 360 else (h1 + h2 - 360) / 2
    t = (1 - 0.17 * math.cos(math.radians(h_mean - 30)) + 0.24 * math.cos(math.radians(2 * h_mean))
         + 0.32 * math.cos(math.radians(3 * h_mean + 6)) - 0.20 * math.cos(math.radians(4 * h_mean - 63)))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / math.sqrt(20 + (l_mean - 50) ** 2)
    s_c = 1 + 0.045 * c_mean
    s_h = 1 + 0.015 * c_mean * t
    r_c = 2 * math.sqrt(c_mean ** 7 / (c_mean ** 7 + 25 ** 7))
    r_t = -math.sin(math.radians(60 * math.exp(-(((h_mean - 275) / 25) ** 2)))) * r_c
    return math.sqrt((d_l / s_l) ** 2 + (d_c / s_c) ** 2 + (d_h / s_h) ** 2 + r_t * (d_c / s_c) * (d_h / s_h))


def colour_distance(color1: str, color2: str) -> float:
    return delta_e2000(rgb_to_lab(hex_to_rgb(color1)), rgb_to_lab(hex_to_rgb(color2)))


PALETTE_PATTERN = re.compile(r"id:`([\w-]+)`,name:`[^`]*`,(?:light_theme:!0,)?colors:\{node_slot:\{([^}]*)\}")
DEFAULT_PALETTE = "dark"  # the frontend's "Dark (Default)"


def frontend_palettes() -> dict[str, dict[str, str]]:
    """{palette id: {core type: link colour}} of the colour palettes built into the installed
    comfyui_frontend_package, read from its bundle (types the palette leaves blank are left out)."""
    assets = importlib.resources.files("comfyui_frontend_package") / "static" / "assets"
    palettes = {}
    for entry in assets.iterdir():
        if entry.name.endswith(".js"):
            for palette, slots in PALETTE_PATTERN.findall(entry.read_text(errors="replace")):
                palettes[palette] = {t: c for t, c in re.findall(r"(\w+):`([^`]*)`", slots) if c}
    return palettes


def frontend_palette_ids() -> list[str]:
    """Ids of the colour palettes built into the installed comfyui_frontend_package."""
    return sorted(frontend_palettes())
