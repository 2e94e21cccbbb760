"""Make ComfyUI importable for the pack's command-line tools (trainer, evaluation), before anything imports
``comfy.model_management``, and give them ComfyUI's own model folders.

Finding ComfyUI ($COMFYUI_PATH, the ComfyUI whose custom_nodes holds the pack, ``.host/comfyui_path``) and putting it
first on ``sys.path`` is ``invadapter_core.host``'s job, shared with the benchmark and the tests. Two things happen
here: ComfyUI decides its device when ``comfy.model_management`` is first imported, taking the *current* CUDA device,
so under torchrun each process selects its GPU (LOCAL_RANK) first; and ComfyUI parses ``sys.argv`` only after
``comfy.options.enable_args_parsing()`` (its ``main.py`` calls it), which must not have happened, or ComfyUI would
read the tool's arguments as its own. CPU mode is set only when no accelerator is present (ComfyUI would otherwise
ask CUDA for a device and fail).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence


def setup_comfy(base_directory: str | None = None, extra_model_paths: Sequence[str] = ()) -> None:
    """Idempotent. Inside a running ComfyUI (or a test session that already set it up) nothing is changed.

    ``base_directory`` and ``extra_model_paths`` are ComfyUI's ``--base-directory`` and
    ``--extra-model-paths-config``: model names then resolve as that ComfyUI server would resolve them (the
    ``extra_model_paths.yaml`` in ComfyUI's folder is read too, as its main.py does)."""
    if "comfy.model_management" in sys.modules:
        return
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local_rank))
    from .host import comfyui_path, use_comfyui

    if not (comfyui_path() / "comfy" / "sd.py").exists():
        raise RuntimeError(f"{comfyui_path()} is not a ComfyUI checkout (no comfy/sd.py): fix COMFYUI_PATH")
    root = use_comfyui()
    import comfy.options

    if comfy.options.args_parsing:
        raise RuntimeError("comfy.options.enable_args_parsing() was called: ComfyUI would parse the tool's "
                           "command line as its own")
    if base_directory is not None:
        if "folder_paths" in sys.modules:  # it reads the base directory when first imported
            raise RuntimeError("folder_paths was imported before the base directory was set")
        import comfy.cli_args

        comfy.cli_args.args.base_directory = str(Path(base_directory).expanduser().resolve())
    load_model_paths(root, extra_model_paths)


def load_model_paths(root: Path, extra_model_paths: Sequence[str] = ()) -> None:
    """ComfyUI's extra_model_paths.yaml (if there is one) and the given ones, read with ComfyUI's own reader."""
    import utils.extra_config  # ComfyUI's top-level utils package

    default = root / "extra_model_paths.yaml"
    for path in ([str(default)] if default.is_file() else []) + list(extra_model_paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"extra model paths config {path} does not exist")
        utils.extra_config.load_extra_path_config(path)
