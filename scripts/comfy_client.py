"""A small client for ComfyUI's HTTP API (standard library only; run_listening also needs websocket-client):
upload a face photo, set the checkpoint, queue a workflow, wait for it, fetch the images it saved.

    python scripts/comfy_client.py workflows/api/basic.json --face me.jpg \\
        --checkpoint v1-5-pruned-emaonly-fp16.safetensors [--server http://127.0.0.1:8188] [--out out/]

prints the path of every image the workflow saved, one per line. The workflow may be API format (workflows/api/)
or a UI graph (example_workflows/, converted with the server's /object_info). ``--face`` goes to every LoadImage
that feeds a face crop, in node order; give it once per face photo (the last one fills the remaining photos).

From Python::

    client = ComfyClient("http://127.0.0.1:8188")
    prompt = use_inputs(load_workflow("workflows/api/basic.json", client), [client.upload_image("me.jpg")],
                        "v1-5-pruned-emaonly-fp16.safetensors")
    entry = client.run(prompt, timeout=1800)
    pngs = client.images(entry["prompt_id"])
"""
from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class PromptRejected(RuntimeError):
    """POST /prompt answered 400 (validation failed): ``body`` is the JSON answer, with ``error`` and
    ``node_errors``."""

    def __init__(self, body: dict):
        self.body = body
        self.node_errors = body.get("node_errors", {})
        super().__init__(f"prompt rejected: {json.dumps(body, indent=1)[:4000]}")


class ExecutionFailed(RuntimeError):
    """The prompt ran and failed: ``error`` is the execution_error message (exception_message, node_type, ...)."""

    def __init__(self, error: dict, diagnostics: str = ""):
        self.error = error
        super().__init__(f"execution failed in node {error.get('node_id')} ({error.get('node_type')}): "
                         f"{error.get('exception_type')}: {error.get('exception_message')}\n"
                         f"{''.join(error.get('traceback', []))}" + (f"\n{diagnostics}" if diagnostics else ""))


class ComfyClient:
    """The HTTP API, as the browser and API users drive it. ``diagnostics`` (optional) returns text appended to
    errors, e.g. the tail of the server's log."""

    def __init__(self, url: str = "http://127.0.0.1:8188", diagnostics=lambda: ""):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.diagnostics = diagnostics

    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60):
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def _json(self, path: str, timeout: float = 60):
        return json.loads(self._request(path, timeout=timeout))

    def object_info(self) -> dict:
        return self._json("/object_info")

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected when any node fails validation: ComfyUI
        answers 400 only when no output can run, and otherwise queues the outputs that can (a face crop's preview
        without the generation), so such a partial prompt is taken off the queue again."""
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        try:
            answer = json.loads(self._request("/prompt", body, {"Content-Type": "application/json"}))
        except urllib.error.HTTPError as error:
            if error.code == 400:
                raise PromptRejected(json.loads(error.read())) from None
            raise
        if answer.get("node_errors"):
            self._request("/queue", json.dumps({"delete": [answer["prompt_id"]]}).encode(),
                          {"Content-Type": "application/json"})
            raise PromptRejected(answer)
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._json(f"/history/{prompt_id}", timeout=30).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Poll /history until the prompt is done; return its history entry (raises ExecutionFailed on an error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str") == "error":
                for kind, data in status.get("messages", []):
                    if kind == "execution_error":
                        raise ExecutionFailed(data, self.diagnostics())
                if status.get("status_str") == "error":
                    raise ExecutionFailed({"exception_message": json.dumps(status)[:2000]}, self.diagnostics())
                return entry
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout:.0f} s\n{self.diagnostics()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue and wait; the history entry gets the ``prompt_id``."""
        prompt_id = self.queue(prompt)
        entry = self.wait(prompt_id, timeout)
        entry["prompt_id"] = prompt_id
        return entry

    def run_listening(self, prompt: dict, events=("invadapter.notice",), timeout: float = 300.0
                      ) -> tuple[dict, list[dict]]:
        """Run a prompt while listening on the websocket as API clients do: (history entry, the data of every
        message of the given ``events`` types sent for it). Needs the websocket-client package."""
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

    def output_images(self, prompt_id: str, kinds=("output",)) -> list[dict]:
        """{filename, subfolder, type} of the images the prompt's nodes produced: by default the saved ones (SaveImage);
        add "temp" for previews."""
        entry = self.history(prompt_id) or {}
        return [image for node_id in sorted(entry.get("outputs", {}), key=str)
                for image in entry["outputs"][node_id].get("images", []) if image.get("type") in kinds]

    def view(self, image: dict) -> bytes:
        """GET /view: the file of one image reference."""
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}")

    def images(self, prompt_id: str, kinds=("output",)) -> list[bytes]:
        """The files of output_images(), as bytes (PNG for SaveImage)."""
        return [self.view(image) for image in self.output_images(prompt_id, kinds)]

    def upload_image(self, image, name: str | None = None) -> str:
        """POST /upload/image (a path or bytes) into the input folder, replacing a file of that name; returns the name
        LoadImage takes."""
        if not isinstance(image, (bytes, bytearray)):
            name = name or Path(image).name
            image = Path(image).read_bytes()
        name = name or f"upload-{uuid.uuid4().hex[:8]}.png"
        boundary = uuid.uuid4().hex
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n").encode() + bytes(image) + \
               (f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'
                f"--{boundary}--\r\n").encode()
        answer = json.loads(self._request("/upload/image", body,
                                          {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]


def load_workflow(path: str | Path, client: ComfyClient) -> dict:
    """An API-format prompt from an API workflow file, or from a UI graph (converted with the server's
    /object_info, as the frontend's Run does for plain graphs)."""
    data = json.loads(Path(path).read_text())
    if "nodes" in data and "links" in data:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from workflow_ui import ui_to_api

        return ui_to_api(data, client.object_info())
    return data


def use_inputs(prompt: dict, faces: list[str], checkpoint: str | None = None) -> dict:
    """Put ``checkpoint`` on every CheckpointLoaderSimple and the uploaded ``faces`` on the LoadImage nodes that feed
    a face crop (in node order; the last face fills the rest). Returns ``prompt``, changed."""
    if checkpoint:
        for node in prompt.values():
            if node["class_type"] == "CheckpointLoaderSimple":
                node["inputs"]["ckpt_name"] = checkpoint
    photo_loaders = set()
    for node in prompt.values():
        source = node["inputs"].get("image") if node["class_type"] == "InvAdapterFaceCrop" else None
        if isinstance(source, list) and prompt[source[0]]["class_type"] == "LoadImage":
            photo_loaders.add(source[0])
    photo_loaders = sorted(photo_loaders, key=lambda i: (len(i), i))  # numeric ids in numeric order
    if faces and not photo_loaders:
        raise ValueError("the workflow has no LoadImage feeding an InvAdapterFaceCrop: it takes no face photo")
    for index, node_id in enumerate(photo_loaders):
        if faces:
            prompt[node_id]["inputs"]["image"] = faces[min(index, len(faces) - 1)]
    return prompt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("workflow", type=Path, help="API workflow (workflows/api/) or UI graph (example_workflows/)")
    parser.add_argument("--face", type=Path, action="append", default=[], help="face photo to upload (repeatable)")
    parser.add_argument("--checkpoint", help="checkpoint file name in the server's models/checkpoints")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where the images are written")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the result")
    args = parser.parse_args(argv)
    for face in args.face:
        if not face.is_file():
            parser.error(f"--face {face}: no such file")
    client = ComfyClient(args.server)
    try:
        prompt = use_inputs(load_workflow(args.workflow, client), [client.upload_image(f) for f in args.face],
                            args.checkpoint)
        prompt_id = client.queue(prompt)
        print(f"queued {args.workflow} as prompt {prompt_id}; waiting", file=sys.stderr)
        client.wait(prompt_id, args.timeout)
        images = client.output_images(prompt_id)
    except (PromptRejected, ExecutionFailed, TimeoutError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except urllib.error.URLError as error:
        print(f"error: cannot reach ComfyUI at {args.server} ({error.reason}): is it running?", file=sys.stderr)
        return 1
    if not images:
        print("error: the workflow saved no image (does it end in Save Image?)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for image in images:
        path = args.out / Path(image["filename"]).name
        path.write_bytes(client.view(image))
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
