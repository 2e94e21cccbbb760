"""Test bootstrap: the real ComfyUI host on sys.path, CPU mode, and shared fixtures."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def comfyui_path() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).resolve()
    marker = ROOT / ".host" / "comfyui_path"
    if marker.exists():
        return Path(marker.read_text().strip())
    raise RuntimeError("ComfyUI host not found: run `make setup` (or set COMFYUI_PATH)")


COMFYUI = comfyui_path()
# ComfyUI first (its top-level `nodes` module must win over our `nodes/` package), then the pack root.
for p in (str(COMFYUI), str(ROOT)):
    if p in sys.path:
        sys.path.remove(p)
sys.path.insert(0, str(COMFYUI))
sys.path.insert(1, str(ROOT))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
comfy.cli_args.args.disable_api_nodes = True

sys.path.insert(0, str(ROOT / "tests"))
pytest_plugins = ["support.fixtures"]


def load_pack():
    """Import this node pack as ComfyUI would (a package named after its folder)."""
    name = "ComfyUI_InvAdapter_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack():
    return load_pack()
