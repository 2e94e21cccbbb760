"""Per-level EAA strengths (granularity control, as DynaIP's choice of fused feature levels).

A level is a UNet stage at a resolution, ranked within the UNet: "high" is the finest resolution that has
transformer blocks (SD1.x/2.x: the full latent; SDXL: half of it), "low" the coarsest, "mid" any between. The
high-resolution blocks carry texture, skin and eyes ("fine"); the low-resolution ones and the middle block carry
face shape and layout ("coarse").
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


def level_of(stage: str, rank: int, ranks: int) -> str:
    """The level of a block from its stage and the rank of its resolution among the UNet's transformer resolutions
    (0 = finest, ``ranks`` of them in all)."""
    if stage == "middle":
        return "middle"
    return f"{stage}_{'high' if rank == 0 else 'low' if rank == ranks - 1 else 'mid'}"


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
