"""Headless use through a real server: scripts/comfy_client.py (its command line and its pieces) and the README's
curl commands, run exactly as written (the shell variables they default are set to the test server, the random test
checkpoint and a smoke-sized copy of the workflow)."""
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from support.fixtures import CHECKPOINT
from support.graphs import ROOT, example_file, load_workflow, strip_meta
from support.host import python_exe

sys.path.append(str(ROOT / "scripts"))
from comfy_client import load_workflow as client_load_workflow  # noqa: E402
from comfy_client import use_inputs  # noqa: E402

CLIENT = ROOT / "scripts" / "comfy_client.py"
FACE = ROOT / "assets" / "face.png"


@pytest.fixture
def smoke_workflow(tmp_path):
    """workflows/api/<name>.json shrunk for a CPU run, as a file."""
    def write(name):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(load_workflow(name)))
        return path
    return write


def run_client(*args, timeout=900):
    return subprocess.run([python_exe(), str(CLIENT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_command_line_runs_a_workflow_and_prints_the_saved_images(comfy_server, smoke_workflow, tmp_path):
    out = tmp_path / "out"
    done = run_client(smoke_workflow("basic"), "--face", FACE, "--checkpoint", CHECKPOINT,
                      "--server", comfy_server.url, "--out", out)
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    assert len(paths) == 1 and paths[0].startswith(str(out)), done.stdout
    image = Image.open(paths[0])
    assert image.format == "PNG" and image.size == (64, 64)


def test_command_line_says_what_is_wrong(comfy_server, smoke_workflow, tmp_path):
    done = run_client(smoke_workflow("basic"), "--face", FACE, "--checkpoint", "no-such-model.safetensors",
                      "--server", comfy_server.url, "--out", tmp_path)
    assert done.returncode == 1 and "prompt rejected" in done.stderr and "ckpt_name" in done.stderr, done.stderr
    done = run_client(smoke_workflow("basic"), "--face", tmp_path / "missing.jpg", "--server", comfy_server.url)
    assert done.returncode == 2 and "missing.jpg: no such file" in done.stderr
    done = run_client(smoke_workflow("basic"), "--server", "http://127.0.0.1:9", timeout=60)
    assert done.returncode == 1 and "cannot reach ComfyUI at http://127.0.0.1:9" in done.stderr


def test_faces_go_to_the_loaders_that_feed_face_crops():
    prompt = use_inputs(load_workflow("two_photos", smoke=False), ["a.png", "b.png"], "mine.safetensors")
    assert prompt["2"]["inputs"]["image"] == "a.png" and prompt["21"]["inputs"]["image"] == "b.png"
    assert prompt["1"]["inputs"]["ckpt_name"] == "mine.safetensors"
    prompt = use_inputs(load_workflow("controlnet", smoke=False), ["a.png"])
    images = {n["_meta"]["title"]: n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"}
    assert images == {"Face photo": "a.png", "Control image (pose / depth)": "invadapter_example_pose.png"}
    with pytest.raises(ValueError, match="no LoadImage feeding an InvAdapterFaceCrop"):
        use_inputs(load_workflow("from_saved_reference", smoke=False), ["a.png"])


def test_a_ui_graph_is_read_as_its_api_twin(comfy_client):
    from_ui = client_load_workflow(example_file("basic"), comfy_client)
    api = client_load_workflow(ROOT / "workflows" / "api" / "basic.json", comfy_client)
    assert from_ui == strip_meta(api)


def readme_headless_commands() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Headless"):]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def run_readme_commands(server, workflow, cwd, checkpoint=CHECKPOINT):
    env = dict(os.environ, COMFY=server.url, CKPT=checkpoint, FACE=str(FACE), WORKFLOW=str(workflow))
    return subprocess.run(["bash", "-euo", "pipefail", "-c", readme_headless_commands()], capture_output=True,
                          text=True, timeout=900, cwd=cwd, env=env)


def test_readme_headless_commands_work_as_written(comfy_server, smoke_workflow, tmp_path):
    done = run_readme_commands(comfy_server, smoke_workflow("basic"), tmp_path)
    assert done.returncode == 0, done.stderr
    saved = re.findall(r"^saved (\S+)$", done.stdout, re.M)
    assert len(saved) == 1, done.stdout
    assert Image.open(tmp_path / saved[0]).size == (64, 64)


def test_readme_headless_commands_stop_on_a_wrong_checkpoint(comfy_server, smoke_workflow, tmp_path):
    done = run_readme_commands(comfy_server, smoke_workflow("basic"), tmp_path, checkpoint="not-there.safetensors")
    assert done.returncode != 0 and "node_errors" in done.stderr and "ckpt_name" in done.stderr, done.stderr
