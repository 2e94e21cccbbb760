"""End-to-end demo: a real headless ComfyUI with this pack runs a workflow through the HTTP API and the output
image is saved under out/; then the identity toy shows the method working (scripts/identity_demo.py: the pack's
nodes on small shipped weights, a picture with each arm's identity accuracy, out/identity_demo.png).

    make demo                       # or: .venv/bin/python scripts/demo.py [--workflow F] [--image P] [--checkpoint P]

The workflow is API-format JSON (what POST /prompt takes). Its inputs are substituted by node class: every
CheckpointLoaderSimple gets the demo checkpoint, every LoadImage the uploaded input image. Without --checkpoint
the random-weight shallow SD1.5 test checkpoint is used (generated once, cached), so the demo needs no
downloads; then the run is a CPU smoke run (shrink_for_smoke_run shrinks it) and its picture is noise: what it shows is
that the whole graph runs.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "api" / "basic.json"  # used when present, else the built-in plain SD1.5 graph
INPUT_IMAGE = ROOT / "assets" / "face.png"  # uploaded for the graph's LoadImage nodes
OUT_DIR = ROOT / "out"
sys.path.insert(0, str(ROOT / "tests"))
from support import graphs, host, models  # noqa: E402
from support.graphs import set_inputs, shrink_for_smoke_run  # noqa: E402
from support.server import ComfyServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", type=Path, default=WORKFLOW, help="API-format workflow JSON")
    parser.add_argument("--image", type=Path, help=f"input image for LoadImage (default: {INPUT_IMAGE.name})")
    parser.add_argument("--checkpoint", type=Path, help="SD1.5 checkpoint file (default: the random test one)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"where the image goes (default: {OUT_DIR})")
    parser.add_argument("--no-identity-toy", action="store_true", help="only the workflow run (no identity toy)")
    args = parser.parse_args()

    host.import_comfy_cpu()  # only used if the test checkpoint has to be generated
    smoke = args.checkpoint is None
    checkpoint = (args.checkpoint or models.shallow_sd15_checkpoint()).resolve()
    if args.workflow.exists():
        prompt, source = json.loads(args.workflow.read_text()), str(args.workflow)
    else:
        prompt, source = graphs.sd15_txt2img(checkpoint.name, steps=4, prefix="demo"), "built-in SD1.5 graph"
    print(f"workflow: {source}\ncheckpoint: {checkpoint}" + (" (random weights, smoke run)" if smoke else ""),
          file=sys.stderr)
    set_inputs(prompt, "CheckpointLoaderSimple", {"ckpt_name": checkpoint.name})
    if smoke:
        shrink_for_smoke_run(prompt)

    with ComfyServer(models={"checkpoints": {checkpoint.name: checkpoint}}) as server:
        client = server.client
        if any(node.get("class_type") == "LoadImage" for node in prompt.values()):
            image = args.image or INPUT_IMAGE
            set_inputs(prompt, "LoadImage", {"image": client.upload_image(image)})
        start = time.time()
        entry = client.run(prompt, timeout=1800)
        images = client.images(entry["prompt_id"])
        print(f"ran in {time.time() - start:.1f} s, {len(images)} image(s)", file=sys.stderr)

    if not images:
        print("the workflow produced no image (does it end in SaveImage?)", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(images):
        path = args.out_dir / (f"demo_{i}.png" if len(images) > 1 else "demo.png")
        path.write_bytes(data)
        paths.append(path)
    for path in paths:
        print(f"Output image: {path.resolve()}")
    if args.no_identity_toy:
        return 0
    # its own process: the toy sets torch's threads and ComfyUI's attention flag before ComfyUI is imported
    print("identity toy: the pack's nodes on the shipped toy weights (scripts/identity_demo.py)", file=sys.stderr,
          flush=True)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "identity_demo.py"),
                           "--out", str(args.out_dir / "identity_demo.png")]).returncode


if __name__ == "__main__":
    sys.exit(main())
