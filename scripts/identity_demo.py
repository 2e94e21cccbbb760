"""The method at work, in a few minutes on a CPU: the identity toy through the pack's nodes, from the small weights
shipped in benchmarks/identity_toy_demo/ (part of `make demo`).

    .venv/bin/python scripts/identity_demo.py [--out out/identity_demo.png] [--identities 8] [--poses 4]

For one reference of each of the first 8 of the toy's 16 synthetic identities, three arms sample the same target poses with the
same noise: the base model alone (no adapter), the training-free default ("init from model") and the adapter trained
by the pack's trainer (its weights file through InvAdapterLoader). InvAdapterEncodeReference encodes each reference,
InvAdapterApply installs it, ComfyUI's sampler draws the samples; an identity classifier says whose identity each
sample shows. Written: one picture (--out) with each arm's identity accuracy; the same numbers go to the terminal,
and the last line printed is one JSON object. The weights' provenance and how to regenerate them:
benchmarks/identity_toy_demo/PROVENANCE.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from invadapter_core.comfyui.host import use_comfyui  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "out" / "identity_demo.png", help="the picture")
    p.add_argument("--identities", type=int, default=8, help="references: one per identity, the first N of 16")
    p.add_argument("--poses", type=int, default=4, help="target poses (samples) per reference and arm")
    p.add_argument("--rows", type=int, default=4, help="references shown in the picture")
    p.add_argument("--shown", type=int, default=3, help="samples shown per arm and row")
    p.add_argument("--steps", type=int, default=50, help="sampling and inversion steps (the weights were trained "
                                                         "with 50)")
    p.add_argument("--seed", type=int, default=5, help="seed of the references' and targets' poses and the noise")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the toy's batches are small)")
    p.add_argument("--weights", type=Path, help="folder of the shipped weights (default: benchmarks/identity_toy_demo)")
    args = p.parse_args(argv)
    if not 1 <= args.identities <= 16:
        p.error(f"--identities {args.identities}: the toy has 16 identities; give 1 to 16")
    if args.poses < 1 or args.rows < 1 or args.shown < 1:
        p.error("--poses, --rows and --shown must be at least 1")
    args.rows, args.shown = min(args.rows, args.identities), min(args.shown, args.poses)
    return args


def say(message: str) -> None:
    print(f"[identity-demo] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse(argv)
    started = time.time()
    use_comfyui(cpu=True)
    import comfy.cli_args

    # torch's SDPA for the UNet's own attention (ComfyUI falls back to chunked attention on a CPU without the flag)
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.utils
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False
    torch.set_num_threads(args.threads)
    from identity_toy_lib import evaluate, picture, shipped
    from identity_toy_lib.sampling import SamplerSettings

    try:
        toy = shipped.load(args.weights or shipped.FOLDER)
    except (FileNotFoundError, RuntimeError) as e:  # missing or damaged weights: the message says how to remake them
        print(f"identity demo: {e}", file=sys.stderr)
        return 1
    plan = evaluate.make_plan(args.identities, 1, args.poses, seed=args.seed)
    settings = SamplerSettings(steps=args.steps)
    evaluation = evaluate.Evaluation(toy.base, toy.judges, plan, settings, "lowest sigma", say)
    who = plan.identity.repeat_interleave(args.poses)
    chance = 1 / len(toy.base.identities)
    images, correct, accuracy, report = {}, {}, {}, {}
    for name, adapter in evaluation.arms(toy.adapter):
        images[name], cost = evaluation.run(name, adapter)
        correct[name] = toy.judges.identity_probabilities(images[name]).argmax(-1) == who
        accuracy[name] = (int(correct[name].sum()), len(who))
        report[name] = {**evaluation.score(images[name]), **cost}

    rows = sorted({round(i * (args.identities - 1) / max(args.rows - 1, 1)) for i in range(args.rows)})
    picture.save(args.out, evaluation.reference_images, images, correct, accuracy, rows, args.poses, args.shown,
                 chance)
    print(f"Identity toy ({args.identities} references x {args.poses} poses per arm; chance {100 * chance:.2f} %):")
    for name, (hits, total) in accuracy.items():
        print(f"  {name:<14} identity accuracy {100 * hits / total:5.1f} %  ({hits}/{total})")
    print(f"Picture: {args.out.resolve()}")
    print(json.dumps({"arms": report, "samples_per_arm": len(who), "chance": chance, "picture": str(args.out),
                      "seconds": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
