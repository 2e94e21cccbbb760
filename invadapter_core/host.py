"""Finding the ComfyUI host for code that runs outside a ComfyUI server (trainer, evaluation, benchmark, demo, tests).

COMFYUI_PATH wins; then the ComfyUI whose custom_nodes folder holds this pack (an installed pack); then the path
`make setup` wrote to .host/comfyui_path beside this repository.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "sd.py").is_file() and (path / "folder_paths.py").is_file()


def containing_comfyui() -> Path | None:
    """The ComfyUI this pack is installed in (<ComfyUI>/custom_nodes/<pack>), also when the pack is a symlink there."""
    for repo in (Path(__file__).absolute().parents[1], REPO):
        if repo.parent.name == "custom_nodes" and is_comfyui(repo.parent.parent):
            return repo.parent.parent
    return None


def comfyui_path() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).resolve()
    installed = containing_comfyui()
    if installed is not None:
        return installed
    marker = REPO / ".host" / "comfyui_path"
    if marker.exists():
        return Path(marker.read_text().strip())
    raise RuntimeError(f"ComfyUI not found: this pack ({REPO}) is not inside a ComfyUI's custom_nodes folder and "
                       f"`make setup` has not run here; set COMFYUI_PATH=/path/to/ComfyUI, or run `make setup`")


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


PACK_PACKAGE = "ComfyUI_InvAdapter"


def load_pack(name: str = PACK_PACKAGE):
    """Import this node pack as ComfyUI does (a package from the repo's ``__init__.py``), for code that calls the
    pack's node classes in-process. ComfyUI must be importable first (``use_comfyui``); loaded once per name."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
