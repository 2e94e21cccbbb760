"""Where the toy's pretrained pieces live: outside the repository, named by the recipe that made them.

``$INVADAPTER_TOY_CACHE``, else ``~/.cache/invadapter-comfyui/identity-toy``. A file's name carries RECIPE and the
settings it depends on, so changing either makes a new file instead of reusing a stale one; a missing file is
regenerated. Bump RECIPE whenever the renderer, the model or a training recipe changes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from invadapter_core.files.safetensors_io import read_checked, save_atomic

RECIPE = "r1"


def cache_dir() -> Path:
    return Path(os.environ.get("INVADAPTER_TOY_CACHE") or "~/.cache/invadapter-comfyui/identity-toy").expanduser()


def cache_path(kind: str, **settings) -> Path:
    """e.g. cache_path("base", steps=1400, seed=0) -> <cache>/base-r1-steps1400-seed0.safetensors"""
    tail = "".join(f"-{k}{v}" for k, v in sorted(settings.items()))
    return cache_dir() / f"{kind}-{RECIPE}{tail}.safetensors"


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
                {"recipe": RECIPE, **metadata})


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return read_checked(str(path), "identity-toy cache file", RuntimeError, f"delete it; it is regenerated")


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` with the prefix removed (several modules share one file)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
