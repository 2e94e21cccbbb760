"""Make ComfyUI importable for the trainer, before anything imports ``comfy.model_management``.

The trainer runs ComfyUI's own loader and UNet; finding ComfyUI ($COMFYUI_PATH, else ``.host/comfyui_path``) and
putting it first on ``sys.path`` is ``invadapter_core.host``'s job, shared with the benchmark and the tests. Two
things are the trainer's own: ComfyUI decides its device when ``comfy.model_management`` is first imported, taking
the *current* CUDA device, so under torchrun each process selects its GPU (LOCAL_RANK) first; and ComfyUI parses
``sys.argv`` only after ``comfy.options.enable_args_parsing()`` (its ``main.py`` calls it), which must not have
happened, or ComfyUI would read the trainer's arguments as its own. CPU mode is set only when no accelerator is
present (ComfyUI would otherwise ask CUDA for a device and fail).
"""
from __future__ import annotations

import os
import sys


def setup_comfy() -> None:
    """Idempotent. Inside a running ComfyUI (or a test session that already set it up) nothing is changed."""
    if "comfy.model_management" in sys.modules:
        return
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local_rank))
    from ..host import comfyui_path, use_comfyui

    if not (comfyui_path() / "comfy" / "sd.py").exists():
        raise RuntimeError(f"{comfyui_path()} is not a ComfyUI checkout (no comfy/sd.py): fix COMFYUI_PATH")
    use_comfyui()
    import comfy.options

    if comfy.options.args_parsing:
        raise RuntimeError("comfy.options.enable_args_parsing() was called: ComfyUI would parse the trainer's "
                           "command line as its own")
