"""Make ComfyUI importable for the trainer, before anything imports ``comfy.model_management``.

The trainer runs ComfyUI's own loader and UNet, so ComfyUI must be on ``sys.path`` first (its top-level ``nodes``
module must win over this repo's ``nodes/`` package). ComfyUI decides its device when ``comfy.model_management`` is
first imported: it picks the current CUDA device, so under torchrun each rank selects its GPU here first; on a
machine without any accelerator it has to be told ``--cpu`` (it would otherwise ask CUDA for a device and fail).
ComfyUI parses ``sys.argv`` only when ``comfy.options.enable_args_parsing()`` was called (its ``main.py`` does);
the trainer never calls it, so ``comfy.cli_args`` parses an empty list and our own CLI arguments stay ours.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def comfyui_path() -> Path:
    """$COMFYUI_PATH, else the path ``make setup`` wrote to ``.host/comfyui_path``."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).expanduser().resolve()
    marker = REPO_ROOT / ".host" / "comfyui_path"
    if marker.exists():
        return Path(marker.read_text().strip())
    raise RuntimeError("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (or run `make setup`, which "
                       "writes .host/comfyui_path)")


def has_accelerator() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def setup_comfy() -> None:
    """Idempotent. Inside a running ComfyUI (or a test session that already set it up) nothing is changed."""
    if "comfy.model_management" not in sys.modules:
        path = str(comfyui_path())
        if not (Path(path) / "comfy" / "sd.py").exists():
            raise RuntimeError(f"{path} is not a ComfyUI checkout (no comfy/sd.py): fix COMFYUI_PATH")
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
        root = str(REPO_ROOT)
        if root not in sys.path:
            sys.path.insert(1, root)
        import torch

        local_rank = os.environ.get("LOCAL_RANK")
        if local_rank is not None and torch.cuda.is_available():
            torch.cuda.set_device(int(local_rank))  # ComfyUI's device = torch.cuda.current_device()
        import comfy.options

        if comfy.options.args_parsing:
            raise RuntimeError("comfy.options.enable_args_parsing() was called: ComfyUI would parse the trainer's "
                               "command line as its own")
        import comfy.cli_args

        if not has_accelerator():
            comfy.cli_args.args.cpu = True
