"""Test bootstrap: the real ComfyUI host on sys.path, CPU mode, and shared fixtures."""
import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.host import import_comfy_cpu  # noqa: E402

import_comfy_cpu()  # ComfyUI's top-level `nodes` module must win over our `nodes/` package
pytest_plugins = ["support.fixtures"]


def load_pack():
    """Import this node pack as ComfyUI would (a package named after its folder)."""
    name = "ComfyUI_InvAdapter_under_test"
    if name in sys.modules:
        return sys.modules[name]
    import folder_paths

    # importing the pack copies its example images into ComfyUI's input folder: not into the shared host's
    folder_paths.set_input_directory(tempfile.mkdtemp(prefix="invadapter-input-"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack():
    return load_pack()
