"""A real headless ComfyUI server in a subprocess, and a small API client for it. Importable without pytest
(scripts/demo.py uses it too).

The server gets a throw-away base directory: models/<folder>/ hold symlinks to the generated test files,
custom_nodes/ holds a symlink to this repo (the pack), and the log goes to <base>/server.log.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import requests

from . import host

# Nodes /object_info must list once the pack has loaded; extend as the pack grows.
PACK_NODES = ["InvAdapterLoader", "InvAdapterEncodeReference", "InvAdapterApply", "InvAdapterSaveReference",
              "InvAdapterLoadReference", "InvAdapterFaceCrop", "InvAdapterCombineReferences",
              "InvAdapterBlockWeights", "InvAdapterAttentionMaps"]
PACK_LINK_NAME = "ComfyUI-InvAdapter"
STARTUP_TIMEOUT = float(os.environ.get("INVADAPTER_SERVER_STARTUP_TIMEOUT", 120))


class ServerError(RuntimeError):
    """The server did not start, or the pack did not load; the message ends with the server log."""


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: ``body`` is the JSON answer, with ``error`` and ``node_errors``."""

    def __init__(self, body: dict):
        self.body = body
        self.node_errors = body.get("node_errors", {})
        super().__init__(f"prompt rejected: {json.dumps(body, indent=1)[:4000]}")


class ExecutionFailed(RuntimeError):
    """The prompt ran and failed: ``error`` is the execution_error message (exception_message, node_type, ...)."""

    def __init__(self, error: dict, log_tail: str = ""):
        self.error = error
        super().__init__(f"execution failed in node {error.get('node_id')} ({error.get('node_type')}): "
                         f"{error.get('exception_type')}: {error.get('exception_message')}\n"
                         f"{''.join(error.get('traceback', []))}\n--- server log (tail) ---\n{log_tail}")


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
            self.client = ComfyClient(self.url, log_tail=self.log_tail)
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


class ComfyClient:
    """The HTTP API, as the browser and API users drive it."""

    def __init__(self, url: str, log_tail=lambda: ""):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.log_tail = log_tail

    def object_info(self) -> dict:
        r = requests.get(f"{self.url}/object_info", timeout=60)
        r.raise_for_status()
        return r.json()

    def queue(self, prompt: dict) -> str:
        r = requests.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": self.client_id}, timeout=60)
        if r.status_code == 400:
            raise PromptRejected(r.json())
        r.raise_for_status()
        return r.json()["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        r = requests.get(f"{self.url}/history/{prompt_id}", timeout=30)
        r.raise_for_status()
        return r.json().get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until the prompt is done (no websocket ordering races); return its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str") == "error":
                for kind, data in status.get("messages", []):
                    if kind == "execution_error":
                        raise ExecutionFailed(data, self.log_tail())
                if status.get("status_str") == "error":
                    raise ExecutionFailed({"exception_message": json.dumps(status)[:2000]}, self.log_tail())
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout:.0f} s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        prompt_id = self.queue(prompt)
        entry = self.wait(prompt_id, timeout)
        entry["prompt_id"] = prompt_id
        return entry

    def run_listening(self, prompt: dict, events=("invadapter.notice",), timeout: float = 300.0
                      ) -> tuple[dict, list[dict]]:
        """Run a prompt while listening on the websocket as API clients do: (history entry, the data of every
        message of the given ``events`` types sent for it)."""
        import websocket

        ws = websocket.create_connection(f"ws{self.url[len('http'):]}/ws?clientId={self.client_id}", timeout=timeout)
        seen = []
        try:
            prompt_id = self.queue(prompt)
            while True:
                message = ws.recv()
                if not isinstance(message, str):
                    continue  # binary previews
                data = json.loads(message)
                kind, body = data.get("type"), data.get("data") or {}
                if kind in events:
                    seen.append(body)
                done = kind == "executing" and body.get("node") is None and body.get("prompt_id") == prompt_id
                if done or (kind == "execution_error" and body.get("prompt_id") == prompt_id):
                    break
        finally:
            ws.close()
        entry = self.wait(prompt_id, timeout)
        entry["prompt_id"] = prompt_id
        return entry, seen

    def images(self, prompt_id: str) -> list[bytes]:
        """Every image the prompt's output nodes produced, as file bytes (PNG for SaveImage), via /view."""
        entry = self.history(prompt_id) or {}
        found = []
        for node_id in sorted(entry.get("outputs", {}), key=str):
            for image in entry["outputs"][node_id].get("images", []):
                params = {k: image.get(k, "") for k in ("filename", "subfolder", "type")}
                r = requests.get(f"{self.url}/view", params=params, timeout=60)
                r.raise_for_status()
                found.append(r.content)
        return found

    def upload_image(self, image, name: str | None = None) -> str:
        """Upload a path or PNG bytes to the input folder; returns the name LoadImage takes."""
        if not isinstance(image, (bytes, bytearray)):
            name = name or Path(image).name
            image = Path(image).read_bytes()
        name = name or f"upload-{uuid.uuid4().hex[:8]}.png"
        r = requests.post(f"{self.url}/upload/image", files={"image": (name, bytes(image), "image/png")},
                          data={"overwrite": "true"}, timeout=60)
        r.raise_for_status()
        body = r.json()
        return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]
