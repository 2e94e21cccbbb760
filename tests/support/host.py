"""Where the ComfyUI host and its venv live, for code that runs outside pytest (scripts/demo.py) as well as in it.

Mirrors tests/conftest.py: COMFYUI_PATH wins, else the path `make setup` wrote to .host/comfyui_path.
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def comfyui_path() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).resolve()
    marker = ROOT / ".host" / "comfyui_path"
    if marker.exists():
        return Path(marker.read_text().strip())
    raise RuntimeError("ComfyUI host not found: run `make setup` (or set COMFYUI_PATH)")


def python_exe() -> str:
    """The venv's python (it has ComfyUI's requirements); falls back to the running interpreter."""
    venv = Path(os.environ.get("INVADAPTER_VENV", ROOT / ".venv"))
    exe = venv / "bin" / "python"
    return str(exe) if exe.exists() else sys.executable


def import_comfy_cpu() -> None:
    """Put ComfyUI first on sys.path (its top-level `nodes` must win over our `nodes/`) and force CPU mode,
    which has to happen before anything imports comfy.model_management."""
    path = str(comfyui_path())
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_api_nodes = True
