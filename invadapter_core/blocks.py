"""Naming of the UNet's transformer blocks, shared by the weight format, the feature cache and the patches."""
from __future__ import annotations

BlockKey = tuple  # (stage, block id, index inside the SpatialTransformer), e.g. ("input", 1, 0)
STAGES = ("input", "middle", "output")


def block_key(extra_options: dict) -> BlockKey:
    """The key of the block a ComfyUI attention patch is running in."""
    stage, number = extra_options["block"]
    return (stage, int(number), int(extra_options.get("block_index", 0)))


def block_name(key: BlockKey) -> str:
    return f"{key[0]}.{key[1]}.{key[2]}"


def parse_block_name(name: str) -> BlockKey:
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in STAGES or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"not a block name: {name!r} (expected e.g. 'input.1.0')")
    return (parts[0], int(parts[1]), int(parts[2]))


def sort_key(key: BlockKey):
    """UNet execution order: input blocks, middle, output blocks."""
    return (STAGES.index(key[0]), key[1], key[2])
