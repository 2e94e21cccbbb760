"""A real headless ComfyUI server in a subprocess, with the pack's API client (scripts/comfy_client.py) for it.
Importable without pytest (scripts/demo.py uses it too).

The server gets a throw-away base directory: models/<folder>/ hold symlinks to the generated test files,
custom_nodes/ holds a symlink to this repo (the pack), and the log goes to <base>/server.log.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from . import host

if str(host.ROOT / "scripts") not in sys.path:
    sys.path.append(str(host.ROOT / "scripts"))
from comfy_client import ComfyClient, ExecutionFailed, PromptRejected  # noqa: E402,F401 (re-exported for tests)

# Nodes /object_info must list once the pack has loaded; extend as the pack grows.
PACK_NODES = ["InvAdapterLoader", "InvAdapterEncodeReference", "InvAdapterApply", "InvAdapterSaveReference",
              "InvAdapterLoadReference", "InvAdapterFaceCrop", "InvAdapterCombineReferences",
              "InvAdapterBlockWeights", "InvAdapterAttentionMaps",
              "InvAdapterFaceSimilarity", "InvAdapterSelectBest", "InvAdapterIdentityPrompt"]
PACK_LINK_NAME = "ComfyUI-InvAdapter"
STARTUP_TIMEOUT = float(os.environ.get("INVADAPTER_SERVER_STARTUP_TIMEOUT", 120))


class ServerError(RuntimeError):
    """The server did not start, or the pack did not load; the message ends with the server log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Start with ``ComfyServer(models={"checkpoints": [path, ...]}).start()``; ``stop()`` (or use as a context
    manager). ``models`` maps a ComfyUI model folder to files, or to {link name: file} to choose the names.
    Without ``base_dir`` the server gets a temporary one, removed again by ``stop()``."""

    def __init__(self, models: dict | None = None, base_dir: str | Path | None = None,
                 expected_nodes=PACK_NODES, extra_args=(), startup_timeout: float = STARTUP_TIMEOUT):
        self.owns_base = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="invadapter-comfy-"))
        self.models = models or {}
        self.expected_nodes = list(expected_nodes)
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.process: subprocess.Popen | None = None
        self.client: ComfyClient | None = None

    # ------------------------------------------------------------------ lifecycle
    def _prepare_base(self) -> None:
        for sub in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_LINK_NAME
        if not link.exists():
            link.symlink_to(host.ROOT, target_is_directory=True)
        for folder, files in self.models.items():
            target = self.base / "models" / folder
            target.mkdir(parents=True, exist_ok=True)
            named = files if isinstance(files, dict) else {Path(f).name: f for f in files}
            for name, src in named.items():
                dst = target / name
                if dst.is_symlink() or dst.exists():
                    dst.unlink()
                dst.symlink_to(Path(src).resolve())

    def command(self) -> list[str]:
        return [host.python_exe(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--dont-print-server", "--disable-api-nodes",
                "--base-directory", str(self.base),
                # the default database sits inside the ComfyUI tree and is locked by a second server
                "--database-url", "sqlite:///:memory:", *self.extra_args]

    def start(self) -> "ComfyServer":
        self._prepare_base()
        log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(self.command(), cwd=host.comfyui_path(), stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        try:
            self._wait_ready()
            self.client = ComfyClient(self.url, diagnostics=lambda: f"--- server log (tail) ---\n{self.log_tail()}")
            self._check_pack(self.client.object_info())
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        # Custom nodes are imported before the HTTP server starts listening, so the first answer means "loaded".
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.process.returncode} during startup\n"
                                  f"{self.log_tail()}")
            try:
                answered = requests.get(f"{self.url}/object_info", timeout=5).status_code == 200
                # still alive: had ours lost the port race it would have exited, and another server be answering
                if answered and self.process.poll() is None:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s\n{self.log_tail()}")

    def _check_pack(self, object_info: dict) -> None:
        log = self.log_path.read_text(errors="replace")
        if "(IMPORT FAILED)" in log:
            raise ServerError(f"a custom node pack failed to import\n{self.log_tail()}")
        missing = [n for n in self.expected_nodes if n not in object_info]
        if missing:
            raise ServerError(f"/object_info lacks the pack's nodes {missing}\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        if self.owns_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"
