"""Host helpers for code that runs outside pytest (scripts/demo.py) as well as in it; ComfyUI discovery itself
lives in invadapter_core.comfyui.host (shared with the trainer and the benchmark)."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from invadapter_core.comfyui.host import comfyui_path, use_comfyui  # noqa: E402,F401


def python_exe() -> str:
    """The venv's python (it has ComfyUI's requirements); falls back to the running interpreter."""
    venv = Path(os.environ.get("INVADAPTER_VENV", ROOT / ".venv"))
    exe = venv / "bin" / "python"
    return str(exe) if exe.exists() else sys.executable


def import_comfy_cpu() -> None:
    """ComfyUI first on sys.path and CPU mode (before anything imports comfy.model_management)."""
    use_comfyui(cpu=True)
    import comfy.cli_args

    comfy.cli_args.args.disable_api_nodes = True


def ctrl_c_reaches_the_child() -> None:
    """``preexec_fn`` for a child a test interrupts as Ctrl-C would: a test run started in the background by a
    non-interactive shell ignores SIGINT, children inherit that, and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
