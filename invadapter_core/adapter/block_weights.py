"""Per-level EAA strengths (granularity control, as DynaIP's choice of fused feature levels): a strength for each
of the network's block levels (``arch.levels``), for self- and cross-attention apart."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..arch.levels import DIT_LEVELS, DIT_PRESETS, LEVELS, PRESETS


@dataclass
class BlockWeights:
    self_attn: dict[str, float] = field(default_factory=lambda: dict(PRESETS["all"]))
    cross_attn: dict[str, float] = field(default_factory=lambda: dict(PRESETS["all"]))

    @classmethod
    def preset(cls, name: str) -> "BlockWeights":
        """A UNet preset (``PRESETS``) or an MM-DiT one (``DIT_PRESETS``, "all" is both)."""
        if name not in PRESETS and name not in DIT_PRESETS:
            raise ValueError(f"unknown block weight preset {name!r}; expected one of "
                             f"{', '.join(dict.fromkeys([*PRESETS, *DIT_PRESETS]))}")
        levels = {**PRESETS.get(name, {}), **DIT_PRESETS.get(name, {})}
        return cls(dict(levels), dict(levels))

    def misses(self, levels) -> bool:
        """The weights change only levels a model does not have (a UNet preset on an MM-DiT, or the reverse):
        on this model every block would act at full strength."""
        here = [v for k, v in self.self_attn.items() if k in levels]
        return any(v != 1 for k, v in self.self_attn.items() if k not in levels) and all(v == 1 for v in here)

    def scale(self, kind: str, level: str) -> float:
        return (self.self_attn if kind == "self" else self.cross_attn).get(level, 1.0)

    def describe(self) -> str:
        row = lambda d: ", ".join(f"{k}={d[k]:g}" for k in (*LEVELS, *DIT_LEVELS) if k in d)  # noqa: E731
        return f"self: {row(self.self_attn)}\ncross: {row(self.cross_attn)}"
