"""Finding the ComfyUI host for code that runs outside a ComfyUI server (trainer, evaluation, benchmark, demo, tests).

COMFYUI_PATH wins; then the ComfyUI whose custom_nodes folder holds this pack (an installed pack); then the path
`make setup` wrote to .host/comfyui_path beside this repository.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]  # invadapter_core/comfyui/host.py -> the repository


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "sd.py").is_file() and (path / "folder_paths.py").is_file()


def containing_comfyui() -> Path | None:
    """The ComfyUI this pack is installed in (<ComfyUI>/custom_nodes/<pack>), also when the pack is a symlink there."""
    for repo in (Path(__file__).absolute().parents[2], REPO):  # invadapter_core/comfyui/host.py -> the pack
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


# --- the command-line tools (trainer, evaluation) ---------------------------------------------------------------
# ComfyUI decides its device when ``comfy.model_management`` is first imported, taking the *current* CUDA device, so
# under torchrun each process selects its GPU (LOCAL_RANK) first; and ComfyUI parses ``sys.argv`` only after
# ``comfy.options.enable_args_parsing()`` (its ``main.py`` calls it), which must not have happened, or ComfyUI would
# read the tool's arguments as its own. CPU mode is set only when no accelerator is present.

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
