"""Finding the ComfyUI host for code that runs outside a ComfyUI server (trainer, benchmark, demo, tests).

COMFYUI_PATH wins; otherwise the path `make setup` wrote to .host/comfyui_path beside this repository.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def comfyui_path() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).resolve()
    marker = REPO / ".host" / "comfyui_path"
    if marker.exists():
        return Path(marker.read_text().strip())
    raise RuntimeError("ComfyUI not found: run `make setup`, or set COMFYUI_PATH=/path/to/ComfyUI")


def no_accelerator() -> bool:
    import torch

    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (torch.cuda.is_available() or has_xpu or torch.backends.mps.is_available())


def use_comfyui(cpu: bool | None = None) -> Path:
    """Put ComfyUI first on sys.path (its top-level `nodes` must win over this repo's `nodes/` package) and set
    CPU mode (by default: when no accelerator is present), which must happen before anything imports
    comfy.model_management."""
    path = comfyui_path()
    if str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    import comfy.cli_args  # parses no command line: comfy.options.args_parsing is False outside main.py

    if cpu or (cpu is None and no_accelerator()):
        comfy.cli_args.args.cpu = True
    return path
