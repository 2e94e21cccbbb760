"""Does the joint EAA carry identity on an MM-DiT, and which rows and RoPE positions should be its defaults? The
identity toy (``identity_toy.py``) on a tiny base built from ComfyUI's Flux classes, on a CPU.

    .venv/bin/python benchmarks/identity_toy_dit.py [--threads 2]

1. A tiny Flux-family base (``identity_toy_lib.dit_base``: ComfyUI's Flux network, flow sampling, the toy's faces,
   pose encoder and pixel-unshuffle "VAE") is pretrained with rectified flow, or taken from the cache; the identity
   and attribute classifiers are the UNet toy's (they judge images).
2. The joint EAA's K/V maps are trained by the pack's trainer (``invadapter_core.train.loop.Trainer``, its flow
   path) with the default options (rows "image", positions "own"), each target with a reference of the same
   identity in another pose, inverted by the pack's flow inversion.
3. Arms sample the same target poses with the same noise through ComfyUI's sampler, the EAA installed in-process
   (``adapter.joint``; the nodes do not serve Flux yet): no adapter; training-free and trained, each with the term
   on the image rows or on the image and text rows, and the reference's RoPE positions own or shifted. The samples are
   held out: their identities' references and target poses were drawn apart from training. Measured as in the UNet
   toy: identity accuracy (chance 1/16), mean p(reference identity), the strict reference rate and the anti-copy
   rate. The last line printed is one JSON object; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from invadapter_core.comfyui.host import use_comfyui  # noqa: E402

OPTIONS = (("image", "own"), ("image and text", "own"), ("image", "shifted"))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "out" / "identity-toy-dit"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-steps", type=int, default=1500)
    p.add_argument("--base-batch", type=int, default=64)
    p.add_argument("--base-ema", type=float, default=0.995)
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-timestep", type=int, default=600, help="as the UNet toy: identity is decided at high noise")
    p.add_argument("--pool", type=int, default=8, help="reference images per identity in the training pool")
    p.add_argument("--holdout", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="simple")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--eval-refs", type=int, default=2, help="references per identity")
    p.add_argument("--eval-poses", type=int, default=4, help="target poses per reference")
    return p.parse_args(argv)


def say(message: str) -> None:
    print(f"[identity-toy-dit] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse(argv)
    started = time.time()
    use_comfyui()
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.utils
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False
    torch.set_num_threads(args.threads)
    from identity_toy_lib import classifiers, data, dit_base, evaluate
    from identity_toy_lib.base import PretrainRecipe, images_to_latent
    from identity_toy_lib.sampling import SamplerSettings, generate
    from invadapter_core.adapter.joint import JointApplication, install_joint
    from invadapter_core.adapter.weights import load_adapter
    from invadapter_core.reference.encode import invert_latent
    from invadapter_core.train.config import load_config
    from invadapter_core.train.loop import Trainer

    timings = {}
    t = time.time()
    recipe = PretrainRecipe(steps=args.base_steps, batch=args.base_batch, ema=args.base_ema)
    base, base_info = dit_base.load_or_pretrain(recipe, say)
    judges, _ = classifiers.load_or_train(base.identities, steps=args.classifier_steps, log=say)
    timings["base_and_judges_s"] = round(time.time() - t, 1)
    settings = SamplerSettings(steps=args.sample_steps, sampler=args.sampler, scheduler=args.scheduler)

    t = time.time()
    pool = data.build_pool(base, args.pool, settings.steps, settings.scheduler, settings.sampler, "lowest sigma",
                           seed=args.seed + 2)
    timings["pool_s"] = round(time.time() - t, 1)
    out = Path(args.out)
    values = {"data.resolution": 32, "model.train_cross": False, "train.output_dir": str(out / "run"),
              "train.batch_size": args.batch, "train.max_steps": args.train_steps, "train.seed": args.seed,
              "train.log_every": 50, "train.checkpoint_every": 0, "train.resume": "no", "train.caption_dropout": 0.1,
              "train.min_timestep": args.min_timestep, "optim.lr": args.lr, "optim.warmup_steps": 20,
              "validation.every": args.train_steps, "validation.images": 0, "validation.seed": args.seed + 1,
              "train.export_dtype": "float32", "train.tensorboard": False}
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])
    t = time.time()
    trainer = Trainer(cfg, base.model, progress=False,
                      data=data.ToySamples(base, pool, args.batch * args.train_steps, seed=args.seed + 3),
                      holdout=data.ToySamples(base, pool, args.holdout, seed=args.seed + 4))
    result = trainer.run()
    timings["train_s"] = round(time.time() - t, 1)
    trained = load_adapter(str(result.weights))

    # held-out evaluation: references and target poses drawn from their own seed, inverted as the encode step does
    plan = evaluate.make_plan(len(base.identities), args.eval_refs, args.eval_poses, seed=args.seed + 5)
    reference_images = base.render(plan.identity, plan.reference_pose)
    t = time.time()
    references = [invert_latent(base.model, images_to_latent(reference_images[r:r + 1]),
                                base.context(plan.reference_pose[r:r + 1]), settings.steps, settings.scheduler,
                                (32, 32), sampler_name=settings.sampler) for r in range(len(plan.identity))]
    timings["encode_s"] = round(time.time() - t, 1)
    judge = SimpleNamespace(plan=plan, judges=judges, base=base, reference_images=reference_images)

    arms = {}
    arm_list = [("no adapter", None, None, None)] + [
        (f"{kind} (rows {rows}, positions {positions})", kind, rows, positions)
        for kind in ("training-free", "trained") for rows, positions in OPTIONS]
    for name, kind, rows, positions in arm_list:
        t = time.time()
        images = []
        for r in range(len(plan.identity)):
            model = base.model
            if kind is not None:
                app = JointApplication(base.model, references[r], args.strength, rows=rows, positions=positions,
                                       adapter=trained if kind == "trained" else None)
                model = install_joint(base.model, app)
            images.append(generate(model, base.context(plan.target_pose[r]), base.empty_context(),
                                   int(plan.seed[r]), settings))
        arms[name] = {**evaluate.Evaluation.score(judge, torch.cat(images)), "seconds": round(time.time() - t, 1)}
        say(f"{name}: {arms[name]}")
    timings["total_s"] = round(time.time() - started, 1)
    print(json.dumps({"chance": 1 / len(base.identities), "samples_per_arm": plan.samples, "base": base_info,
                      "adapter_parameters": result.parameters["total"], "heldout": result.heldout,
                      "train_loss_first_last": [result.losses[0], result.losses[-1]], "arms": arms,
                      "timings": timings, "threads": args.threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
