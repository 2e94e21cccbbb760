"""Test bootstrap: the real ComfyUI host on sys.path, CPU mode, and shared fixtures."""
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.host import import_comfy_cpu  # noqa: E402

import_comfy_cpu()  # ComfyUI's top-level `nodes` module must win over our `nodes/` package
# ... and be bound now: when the clone's folder is not a valid package name (e.g. "ComfyUI-InvAdapter"), pytest puts
# the repository root first on sys.path while collecting, where `import nodes` would find our package instead
import nodes  # noqa: E402,F401
pytest_plugins = ["support.fixtures"]


def load_pack():
    """Import this node pack as ComfyUI would (a package named after its folder)."""
    import folder_paths

    from invadapter_core.comfyui.host import load_pack as load

    if "ComfyUI_InvAdapter_under_test" not in sys.modules:
        # importing the pack copies its example images into ComfyUI's input folder: not into the shared host's
        folder_paths.set_input_directory(tempfile.mkdtemp(prefix="invadapter-input-"))
    return load("ComfyUI_InvAdapter_under_test")


@pytest.fixture(scope="session")
def pack():
    return load_pack()
