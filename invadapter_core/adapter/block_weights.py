"""Per-level EAA strengths (granularity control, as DynaIP's choice of fused feature levels): a strength for each
of the network's block levels (``arch.levels``), for self- and cross-attention apart."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..arch.levels import LEVELS, PRESETS


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
