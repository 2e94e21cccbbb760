"""Block levels: how the pack groups a network's attention blocks by depth (granularity control, as DynaIP's choice
of fused feature levels), and the standard groupings.

A level is a stage at a resolution, ranked within the network: "high" is the finest resolution that has attention
blocks (SD1.x/2.x: the full latent; SDXL: half of it), "low" the coarsest, "mid" any between. The high-resolution
blocks carry texture, skin and eyes ("fine"); the low-resolution ones and the middle block carry face shape and
layout ("coarse").
"""
from __future__ import annotations

LEVELS = ("input_high", "input_mid", "input_low", "middle", "output_low", "output_mid", "output_high")
PRESETS = {
    "all": dict.fromkeys(LEVELS, 1.0),
    "coarse": {"input_high": 0.0, "input_mid": 0.5, "input_low": 1.0, "middle": 1.0,
               "output_low": 1.0, "output_mid": 0.5, "output_high": 0.0},
    "fine": {"input_high": 1.0, "input_mid": 0.5, "input_low": 0.0, "middle": 0.0,
             "output_low": 0.0, "output_mid": 0.5, "output_high": 1.0},
}


def preset_levels(name: str) -> set[str]:
    """The levels a preset gives any strength to (what a reference must keep features of for it)."""
    return {level for level, w in PRESETS[name].items() if w != 0}


def level_of(stage: str, rank: int, ranks: int) -> str:
    """The level of a block from its stage and the rank of its resolution among the network's attention
    resolutions (0 = finest, ``ranks`` of them in all)."""
    if stage == "middle":
        return "middle"
    return f"{stage}_{'high' if rank == 0 else 'low' if rank == ranks - 1 else 'mid'}"


# MM-DiTs (Flux, Chroma) run every block on one token grid, so the UNet's resolution ranks have nothing to map onto
# (and its coarse/fine presets would mean nothing there): their levels are the stream and the depth within it.
DIT_LEVELS = ("double_early", "double_late", "single_early", "single_mid", "single_late")
DIT_PRESETS = {
    "all": dict.fromkeys(DIT_LEVELS, 1.0),
    "double only": {lv: 1.0 if lv.startswith("double") else 0.0 for lv in DIT_LEVELS},
}


def dit_level_of(stream: str, index: int, count: int) -> str:
    """The level of an MM-DiT block: its stream ("double", "single") and where it sits in that stream's depth
    (double blocks in halves, the longer single stream in thirds)."""
    parts = ("early", "late") if stream == "double" else ("early", "mid", "late")
    return f"{stream}_{parts[min(index * len(parts) // max(count, 1), len(parts) - 1)]}"
