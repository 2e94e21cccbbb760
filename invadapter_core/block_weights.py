"""Per-level EAA strengths (granularity control, as DynaIP's choice of fused feature levels).

A level is a UNet stage at a resolution: the transformer blocks at full latent resolution carry texture, skin and
eyes ("fine"); the low-resolution ones and the middle block carry face shape and layout ("coarse").
"""
from __future__ import annotations

from dataclasses import dataclass, field

LEVELS = ("input_high", "input_mid", "input_low", "middle", "output_low", "output_mid", "output_high")
PRESETS = {
    "all": dict.fromkeys(LEVELS, 1.0),
    "coarse": {"input_high": 0.0, "input_mid": 0.5, "input_low": 1.0, "middle": 1.0,
               "output_low": 1.0, "output_mid": 0.5, "output_high": 0.0},
    "fine": {"input_high": 1.0, "input_mid": 0.5, "input_low": 0.0, "middle": 0.0,
             "output_low": 0.0, "output_mid": 0.5, "output_high": 1.0},
}


def level_of(stage: str, downscale: int) -> str:
    """The level of a block from its stage and how much smaller than the latent its token grid is."""
    if stage == "middle":
        return "middle"
    return f"{stage}_{'high' if downscale <= 1 else 'mid' if downscale == 2 else 'low'}"


def call_level(extra_options: dict) -> str:
    """The level of the block a ComfyUI attention patch runs in (from the shapes ComfyUI passes along)."""
    latent_w = extra_options["original_shape"][-1]
    grid_w = extra_options["activations_shape"][-1]
    return level_of(extra_options["block"][0], max(1, round(latent_w / max(grid_w, 1))))


@dataclass
class BlockWeights:
    self_attn: dict[str, float] = field(default_factory=lambda: dict(PRESETS["all"]))
    cross_attn: dict[str, float] = field(default_factory=lambda: dict(PRESETS["all"]))

    @classmethod
    def preset(cls, name: str) -> "BlockWeights":
        if name not in PRESETS:
            raise ValueError(f"unknown block weight preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(dict(PRESETS[name]), dict(PRESETS[name]))

    def scale(self, kind: str, level: str) -> float:
        return (self.self_attn if kind == "self" else self.cross_attn).get(level, 1.0)

    def describe(self) -> str:
        row = lambda d: ", ".join(f"{k}={d[k]:g}" for k in LEVELS)  # noqa: E731
        return f"self: {row(self.self_attn)}\ncross: {row(self.cross_attn)}"
