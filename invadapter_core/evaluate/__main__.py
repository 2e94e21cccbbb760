"""Command line: ``python -m invadapter_core.evaluate DATA --checkpoint CKPT --out DIR [...]`` from the pack's folder,
or ``python <pack>/scripts/evaluate.py ...`` from anywhere.

ComfyUI is imported only after the arguments are parsed, so ``--help`` is instant and ComfyUI never sees them.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

DESCRIPTION = """\
Evaluate Inv-Adapter as the paper does: generate identities x prompts through the pack (on your checkpoint, with
the training-free default or trained weights, at any settings) and report FACE-SIM, CLIP-T and CLIP-I.

  python -m invadapter_core.evaluate DATA --checkpoint sd15.safetensors --out eval/ \\
      --adapter "init from model" --adapter mine.safetensors --weight-self 0.6 1.0 --block-weights none coarse fine \\
      --clip clip_l.safetensors --clip-vision clip_vision_vit_l.safetensors

DATA is a folder (DATA/<identity>/ holds photos of one person: the first by name is the reference, the others are
used for the copy-paste indicator; DATA/prompts.txt one prompt a line, or <identity>/prompts.txt; optional
<identity>/caption.txt) or a .jsonl manifest with lines {"identity": "ada", "photos": ["ada/1.jpg", ...],
"prompts": ["..."], "caption": "..."}. Every combination of --adapter, --weight-self, --weight-cross and
--block-weights is one setting; each identity x prompt x seed x setting is one image.

Generation goes through the node classes a graph uses (CheckpointLoaderSimple, InvAdapterLoader, InvAdapterFaceCrop,
CLIPTextEncode, InvAdapterEncodeReference, InvAdapterBlockWeights, InvAdapterApply, EmptyLatentImage, KSampler,
VAEDecode) on ComfyUI's device (the GPU when there is one). Files may be paths or names in ComfyUI's models folders.

Output in --out: results.csv (one row per image: FACE-SIM and its raw number, similarity to the person's other
photos, the copy-paste indicator, CLIP-T, CLIP-I), images/, run.json (the settings), summary.json; the last line on
stdout is the summary as one JSON object (per setting: means over the images). FACE-SIM: with InsightFace ArcFace the
cosine (the paper's number); with dlib 1 - distance/1.2 (0.5 = dlib's same-person threshold), raw distance beside it.
copy_paste = FACE-SIM - real_photo_sim, where real_photo_sim is the reference photo's similarity to the person's other
photos: above 0 the generations look more like that one photo than the person's photos look like each other.
CLIP-T / CLIP-I need --clip-vision (and --clip for CLIP-T); without them they are skipped with a message.

An interrupted run resumes: run the same command again; images already in results.csv are skipped. More settings
can be added to the grid on a later run; other settings need another --out (or --restart). An identity whose
reference photo has no face is skipped (listed in the summary; the exit status is then 1).

Several GPUs: torchrun --nproc_per_node=N -m invadapter_core.evaluate ... (or torchrun ... scripts/evaluate.py).
Each process takes a consecutive share of the images still to do on its own GPU (LOCAL_RANK), appends its rows to
--out/results-r<rank>.csv, and rank 0 merges them into results.csv (grid order, each image once) and prints the
summary. An interrupted run resumes with the same or another number of processes (or one, without torchrun).

ComfyUI: $COMFYUI_PATH, else the ComfyUI whose custom_nodes folder holds this pack, else the repo's .host (make
setup). Model names resolve as that ComfyUI resolves them: its models folder (or --base-directory's), its
extra_model_paths.yaml and any --extra-model-paths-config.
Exit status: 0 done; 1 done, but an identity could not be evaluated; 2 refused (nothing written); 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m invadapter_core.evaluate", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a folder of identities (one sub-folder of photos each) or a .jsonl manifest")
    p.add_argument("--checkpoint", required=True,
                   help="the checkpoint (SD1.x/2.x): a path, or a name in models/checkpoints")
    p.add_argument("--out", required=True, type=Path, help="output folder (results.csv, images/, summary.json)")
    g = p.add_argument_group("settings grid (every combination is one setting)")
    g.add_argument("--adapter", action="append", default=None,
                   help="'init from model' (training-free, the default) or an adapter .safetensors (path or name in "
                        "models/invadapter); repeatable")
    g.add_argument("--weight-self", type=float, nargs="+", default=[1.0], help="lambda_s values (default 1.0)")
    g.add_argument("--weight-cross", type=float, nargs="+", default=[1.0], help="lambda_c values (default 1.0)")
    g.add_argument("--block-weights", nargs="+", default=["none"], metavar="PRESET",
                   help="InvAdapterBlockWeights presets: none (no per-level weights), all, coarse, fine (default none)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", default=None, help="a prompt for every identity (repeatable; "
                                                                    "replaces the data's prompts)")
    g.add_argument("--prompts", type=Path, help="a file of prompts, one a line (replaces the data's prompts)")
    g.add_argument("--negative", default="", help="negative prompt (default empty)")
    g.add_argument("--caption", default="a photo of a face",
                   help="caption of the reference photos without a caption.txt / manifest caption")
    g.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    g.add_argument("--images-per-prompt", type=int, default=1, help="seeds seed .. seed+N-1 (default 1)")
    g.add_argument("--steps", type=int, default=20, help="sampler and inversion steps (default 20)")
    g.add_argument("--cfg", type=float, default=7.0)
    g.add_argument("--sampler", default="euler")
    g.add_argument("--scheduler", default="simple", help="sampler and inversion scheduler (default simple)")
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--resolution", type=int, default=0,
                   help="reference (face crop) resolution; 0 (default): the model family's own, as the node's 0")
    g.add_argument("--inversion", default="lowest sigma",
                   help="InvAdapterEncodeReference's inversion convention: 'lowest sigma' (default) or 'classic'")
    g.add_argument("--capture", default="all levels",
                   help="InvAdapterEncodeReference's capture: 'all levels' (default), 'coarse levels' or 'fine levels'")
    g.add_argument("--feature-precision", default="model",
                   help="InvAdapterEncodeReference's feature_precision: 'model' (default) or 'fp8 (half the memory)'")
    g.add_argument("--start-percent", type=float, default=0.0)
    g.add_argument("--end-percent", type=float, default=1.0)
    g.add_argument("--combine", default="concat", choices=["concat", "average"])
    g.add_argument("--apply-to", default="cond and uncond", choices=["cond and uncond", "cond only"])
    g.add_argument("--no-keep-features", action="store_true", help="do not keep the inversion's features")
    g.add_argument("--detector", default="auto", choices=["auto", "insightface", "mtcnn"],
                   help="face crop detector for the reference photos")
    g.add_argument("--margin", type=float, default=0.5, help="face crop margin (default 0.5)")
    g.add_argument("--crop-min-face-size", type=int, default=40,
                   help="smallest face the face crop takes in a reference photo (px, default 40 as the node)")
    g.add_argument("--on-no-face", default="skip", choices=["skip", "center crop"],
                   help="a reference photo without a face: skip that identity (default), or encode its centre "
                        "square")
    g.add_argument("--face-device", default="cpu", choices=["cpu", "gpu"],
                   help="face detection (crop and FACE-SIM) on the CPU (default, as the nodes' default, so scores "
                        "match a graph's) or on ComfyUI's device")
    g = p.add_argument_group("metrics")
    g.add_argument("--recognizer", default="auto", choices=["auto", "insightface", "dlib"],
                   help="FACE-SIM recognizer: auto = InsightFace ArcFace when installed with its models, else dlib")
    g.add_argument("--insightface-model", default="antelopev2", choices=["antelopev2", "buffalo_l"])
    g.add_argument("--insightface-root", action="append", default=[],
                   help="a folder holding models/<name>/*.onnx (added to ComfyUI's insightface folders)")
    g.add_argument("--min-face-size", type=int, default=32, help="smallest face scored in a generation (px)")
    g.add_argument("--clip", help="CLIP text encoder for CLIP-T (path or name in models/text_encoders), e.g. "
                                  "clip_l.safetensors")
    g.add_argument("--clip-vision", help="CLIP vision model for CLIP-I and CLIP-T (path or name in "
                                         "models/clip_vision), the same CLIP as --clip")
    g = p.add_argument_group("ComfyUI (as its own options of the same names)")
    g.add_argument("--base-directory", help="ComfyUI's base directory for models (and input, output, ...)")
    g.add_argument("--extra-model-paths-config", action="append", default=[], metavar="PATH",
                   help="an extra_model_paths.yaml to load besides ComfyUI's own (repeatable)")
    g = p.add_argument_group("run")
    g.add_argument("--restart", action="store_true", help="discard the results already in --out")
    g.add_argument("--quiet", "-q", action="store_true", help="no per-image lines on stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from ..comfyui.host import setup_comfy

    try:
        setup_comfy(args.base_directory, args.extra_model_paths_config)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import comfy.model_management as mm

    from ..comfyui.torchrun import env_info
    from .results import partial_name
    from .run import EvaluationError, PeerStopped, evaluate

    info = env_info()

    def on_ctrl_c(signum, frame):
        # ComfyUI's own interruption (what its /interrupt does): sampling and the pack's inversion stop at their
        # next step, the loop before the next image. A KeyboardInterrupt could land inside a finalizer and be lost.
        # A second Ctrl-C raises KeyboardInterrupt at once.
        mm.interrupt_current_processing(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        summary = evaluate(args, progress=None if args.quiet else lambda s: print(s, file=sys.stderr, flush=True))
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, mm.InterruptProcessingException, PeerStopped) as e:
        if not info.enabled:
            print("interrupted: the images done so far are in results.csv; run the same command again to resume",
                  file=sys.stderr)
        else:
            print(f"rank {info.rank}: {e if isinstance(e, PeerStopped) else 'interrupted'}: its images so far are in "
                  f"{partial_name(info.rank)}; run the same command again (with any number of processes) to resume",
                  file=sys.stderr)
        return 130
    if summary is None:  # another process than rank 0: rank 0 merges, reports and sets the exit status
        return 0
    print(json.dumps(summary))
    if summary["skipped_identities"]:
        print(f"error: {len(summary['skipped_identities'])} identity(ies) could not be evaluated ("
              f"{summary['not_evaluated']} image(s)): " + "; ".join(
                  f"{name}: {why}" for name, why in summary["skipped_identities"].items()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
