"""Does the pack's EAA, trained by the pack's trainer, carry identity, including identities it never saw? A toy-scale
proof that runs on a CPU.

    .venv/bin/python benchmarks/identity_toy.py [--threads 2] [--out out/identity-toy]

By default, **identities the adapter never saw** (issue 21): a tiny base model (ComfyUI's UNetModel as an
SD15-family model, 32x32 synthetic cartoon faces, conditioned on the pose only) is pretrained on 16 identities and
fine-tuned on all 1,280 attribute combinations; the pack's trainer (``invadapter_core.train.loop.train``: its EAA
modules, injection, loop, optimiser, checkpoints and weights file) trains an EAA on references and targets of 128
training identities, with the trainer's defaults for data that names people and a recognizer (MFF: 2 photos per
target; the identity loss, through the toy's recognizer of ``recognizer.py``: another architecture, trained on the
training identities only, never the judge); each reference is another photo of the identity, inverted by the pack's
inversion. Then three arms sample the same held-out identities, target poses and noise through the pack's nodes: no
adapter, the training-free default ("init from model"), and the trained weights file loaded by InvAdapterLoader
(references encoded by InvAdapterEncodeReference); the attribute classifier and its embedding judge each sample
against the reference's identity (``unseen.py``), on held-out identities (``unseen_identities.<arm>``) and, apart,
training ones (``training_identities.<arm>``). ``--references K``, ``--identity-loss W`` and ``--identity-tokens k``
(the identity token, entering through the toy's text path ``token_path.py``) set IDAdapter's ingredients;
``benchmarks/identity_toy_ablation.py`` runs them one by one at several seeds. Models, pools, the judge and the
recognizer are cached in ~/.cache/invadapter-comfyui/identity-toy (regenerated when missing).

``--closed-set``: the 16-identity proof (issue 16; ``make demo``'s weights come from it): the adapter trained and
judged on the base's 16 identities, with one reference and no identity loss. Measured: identity accuracy (the
identity classifier picks the reference's identity; chance 1/16), mean p(reference identity), the strict
known-identity rate (the attribute classifier reads exactly one of the 16 identities), the strict reference rate
(exactly the reference's), and the anti-copy rate (the sample is closer to the reference identity drawn in the
target pose than to the reference image itself).

The last line printed is one JSON object; grid images (reference | no adapter | training-free | trained) are written
to --out. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from invadapter_core.comfyui.host import use_comfyui  # noqa: E402

CONVENTIONS = ("lowest sigma", "classic")  # invadapter_core.reference.inversion.CONVENTIONS (importable only after ComfyUI is set up)
ARMS = ("no adapter", "training-free", "trained")
# The unseen-identity mode's defaults: the CI test's and the ablation's recipe (trained with MFF and the identity
# loss, as the trainer's on-when-possible defaults train on real faces), evaluated on 64 held-out identities.
UNSEEN_DEFAULTS = {"base_batch": 32, "train_steps": 300, "batch": 16, "lr": 3e-3, "pool": 2, "validate_every": 150,
                   "references": 2, "identity_loss": 1.0, "sample_steps": 30, "eval_refs": 64, "eval_poses": 2}
# --closed-set: the 16-identity proof's recipe (its 68 % result and the demo's weights); one reference, no identity
# loss (there is no recognizer apart from the judges on 16 identities)
CLOSED_SET_DEFAULTS = {"base_batch": 64, "train_steps": 600, "batch": 64, "lr": 1e-3, "pool": 16,
                       "validate_every": 100, "references": 1, "identity_loss": 0.0, "sample_steps": 50,
                       "eval_refs": 2, "eval_poses": 8}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=str(REPO / "out" / "identity-toy"), help="grid image and the training run")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter training and the evaluation plan")
    g = p.add_argument_group("base model and classifiers (cached by these settings)")
    g.add_argument("--base-file", type=Path,
                   help="start from this base file instead (benchmarks/identity_toy_demo/toy_base.safetensors: the "
                        "shipped one, no pretraining); the other base settings are then unused")
    g.add_argument("--base-steps", type=int, default=1400)
    g.add_argument("--base-batch", type=int, help="the base's batch (default: 32; --closed-set: 64)")
    g.add_argument("--identities", type=int, default=16, help="how many of the 16 identities")
    g.add_argument("--base-ema", type=float, default=0.998, help="EMA decay of the base's weights (0.99 for a "
                                                                 "few hundred steps)")
    g.add_argument("--classifier-steps", type=int, default=600)
    g = p.add_argument_group("unseen identities (the default mode): the base draws all 1,280 attribute "
                             "combinations, the adapter trains on a subset, evaluation is on identities it never saw")
    g.add_argument("--closed-set", action="store_true",
                   help="the 16-identity proof instead (issue 16; the demo's weights come from it): the adapter "
                        "trained and judged on the base's 16 identities, with one reference and no identity loss")
    g.add_argument("--unseen", action="store_true",
                   help="the default mode, named (kept for older command lines): base on every attribute "
                        "combination (prompted with the pose only); the adapter's references and targets from "
                        "--train-identities of them; the held-out loss and the evaluation on --heldout-identities "
                        "it never saw (and, reported apart, on training identities). The JSON line has "
                        "unseen_identities.<arm> and training_identities.<arm>")
    g.add_argument("--unseen-base-steps", type=int, default=200,
                   help="the base for unseen identities: the 16-identity base (--base-* settings) fine-tuned this "
                        "many steps on all 1,280 combinations (lr 5e-4, EMA 0.99)")
    g.add_argument("--heldout-identities", type=int, default=256, help="identities held out (a fixed, seeded set)")
    g.add_argument("--train-identities", type=int, default=128, help="training identities (from the others)")
    g.add_argument("--heldout-pool", type=int, default=32,
                   help="held-out identities with inverted references for the held-out loss (--pool each)")
    g.add_argument("--eval-train-refs", type=int, default=16,
                   help="training-identity references evaluated (-1: as many as held-out ones, --eval-refs)")
    g.add_argument("--eval-references", default="1",
                   help="comma-separated photos per reference at evaluation (e.g. 1,3: every adapter arm also with "
                        "3 photos, combined by --combine; keys get ' K=3')")
    g.add_argument("--recognizer-steps", type=int, default=600, help="training steps of the identity loss's "
                                                                      "recognizer")
    g = p.add_argument_group("adapter training (the pack's trainer)")
    g.add_argument("--train-steps", type=int, help="default: 300 (--closed-set: 600)")
    g.add_argument("--batch", type=int, help="default: 16 (--closed-set: 64)")
    g.add_argument("--lr", type=float, help="default: 3e-3 (--closed-set: 1e-3)")
    g.add_argument("--warmup", type=int, default=20)
    g.add_argument("--tokens-m", type=int, default=16, help="M of the cross EAA's token aggregation")
    g.add_argument("--pool", type=int, help="reference images per identity in the training pool (default: 2; "
                                            "--closed-set: 16)")
    g.add_argument("--holdout", type=int, default=64, help="held-out samples for the held-out loss")
    g.add_argument("--validate-every", type=int, help="steps between held-out losses (default: 150; --closed-set: "
                                                      "100)")
    g.add_argument("--min-timestep", type=int, default=600,
                   help="train.min_timestep: identity is decided at high noise (0: 16 %% identity accuracy, 400: 50 %%, "
                        "600: 68 %%, measured)")
    g.add_argument("--references", type=int,
                   help="train.references: K photos of the target's identity per target (MFF; --pool >= K). "
                        "Default: 2, as the trainer's auto on data naming people (--closed-set: 1)")
    g.add_argument("--combine", default="concat", choices=("concat", "average"),
                   help="train.reference_combine, and the evaluation's combine of several photos")
    g.add_argument("--identity-loss", type=float,
                   help="loss.identity: weight of the identity loss (the toy's recognizer, trained on the training "
                        "identities only). Default: 1, as the trainer's when a recognizer is set (--closed-set: 0, "
                        "it has no recognizer)")
    g.add_argument("--identity-tokens", type=int, default=0,
                   help="model.identity_tokens: k identity token embeddings (IDAdapter's textual injection) mapped "
                        "from the reference's features, appended to the pose context (identity_toy_lib.token_path); "
                        "0: none")
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--sample-steps", type=int, help="default: 30 (--closed-set: 50)")
    g.add_argument("--sampler", default="euler_ancestral", help="ComfyUI sampler (euler_ancestral: DDIM eta = 1)")
    g.add_argument("--scheduler", default="normal")
    g.add_argument("--inversion", default=CONVENTIONS[0], choices=CONVENTIONS, help="the encode node's convention")
    g.add_argument("--eval-refs", type=int, help="held-out references, one per identity (default: 64; "
                                                  "--closed-set: references per identity, 2)")
    g.add_argument("--eval-poses", type=int, help="target poses per reference (default: 2; --closed-set: 8)")
    g.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    g.add_argument("--no-eval", action="store_true", help="train only (no classifiers, no sampling)")
    g.add_argument("--export-demo-weights", metavar="DIR",
                   help="also write the base, the classifiers and the trained adapter as `make demo`'s small "
                        "shipped weights, with their PROVENANCE.md (benchmarks/identity_toy_demo)")
    g.add_argument("--curve-every", type=int, default=0,
                   help="also checkpoint every N steps and evaluate each checkpoint's weights (trained arm): the "
                        "identity-accuracy learning curve (0: off)")
    args = p.parse_args(argv)
    if args.closed_set and args.unseen:
        p.error("--closed-set and --unseen are the two modes: give one")
    args.unseen = not args.closed_set
    for key, value in (CLOSED_SET_DEFAULTS if args.closed_set else UNSEEN_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.unseen and (args.base_file or args.export_demo_weights or args.curve_every):
        p.error("unseen identities train their own base on every combination: add --closed-set for --base-file, "
                "--export-demo-weights and --curve-every")
    if args.closed_set and args.identity_loss:
        p.error("--identity-loss needs the unseen-identity mode (its recognizer trains on the training identities, "
                "apart from the judges); leave out --closed-set")
    return args


def say(message: str) -> None:
    print(f"[identity-toy] {message}", file=sys.stderr, flush=True)


def trainer_config(args, out: Path):
    from invadapter_core.train.config import load_config

    values = {"data.resolution": 32, "model.tokens_m": args.tokens_m, "train.output_dir": str(out),
              "train.batch_size": args.batch, "train.max_steps": args.train_steps, "train.seed": args.seed,
              "train.log_every": 25, "train.checkpoint_every": args.curve_every or max(args.train_steps // 2, 1),
              "train.keep_checkpoints": 1000 if args.curve_every else 3, "train.resume": "no",
              "train.min_timestep": args.min_timestep, "optim.lr": args.lr, "optim.warmup_steps": args.warmup, "validation.every": args.validate_every,
              "validation.images": 0, "validation.seed": args.seed + 1, "train.references": args.references,
              "train.reference_combine": args.combine, "loss.identity": args.identity_loss,
              "model.identity_tokens": args.identity_tokens}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def learning_curve(evaluation, run: Path, last_step: int, last: dict | None) -> list[dict]:
    """Identity accuracy of every intermediate checkpoint's weights (the trained arm's measurement)."""
    curve = []
    for folder in sorted((run / "checkpoints").glob("step-*")):
        step = int(folder.name.split("-")[1])
        if step == last_step:
            continue
        named = run / "curve" / f"step-{step}.safetensors"  # every checkpoint's file is adapter.safetensors:
        named.parent.mkdir(exist_ok=True)                     # a unique name for the loader's folder lookup
        shutil.copy(folder / "adapter.safetensors", named)
        images, cost = evaluation.run(f"checkpoint {step}", evaluation.load(named))
        curve.append({"step": step, **evaluation.score(images), **cost})
        say(f"checkpoint {step}: {curve[-1]}")
    if last is not None:
        curve.append({"step": last_step, **last})
    return curve


def unseen_main(args, base, base_info, recipe, timings: dict, started: float) -> int:
    """--unseen: train on training identities, evaluate on held-out ones (and, apart, on training ones)."""
    from identity_toy_lib import base as toy_base
    from identity_toy_lib import data, evaluate, grid, recognizer, unseen
    from identity_toy_lib.sampling import SamplerSettings
    from identity_toy_lib.token_path import ToyTextPath
    from invadapter_core.train.loop import Trainer

    chosen = unseen.split(args.heldout_identities, args.train_identities)
    tag = f"s{unseen.SPLIT_SEED}h{args.heldout_identities}t{args.train_identities}"
    settings = SamplerSettings(steps=args.sample_steps, sampler=args.sampler, scheduler=args.scheduler)
    # the base file's long name, shortened (a pool's cache name adds its own settings)
    base_name = "unseen-" + hashlib.sha1(Path(base_info["path"]).stem.encode()).hexdigest()[:10]
    t = time.time()
    # the pools are fixed across training seeds (seed 2, as the 16-identity pool at --seed 0): one cache for all
    pool, cached = data.load_or_build_pool(base, base_name, args.pool, settings.steps, settings.scheduler,
                                           settings.sampler, args.inversion, seed=2, identities=chosen.train,
                                           tag="train" + tag)
    held_ids = chosen.heldout[:args.heldout_pool]
    held_pool, held_cached = data.load_or_build_pool(base, base_name, args.pool, settings.steps, settings.scheduler,
                                                     settings.sampler, args.inversion, seed=3, identities=held_ids,
                                                     tag=f"heldout{args.heldout_pool}" + tag)
    timings["pool_s"] = round(time.time() - t, 1)
    say(f"reference pools: {len(pool.identity)} of {len(chosen.train)} training identities, {len(held_pool.identity)}"
        f" of {len(held_ids)} held-out ones{' (cached)' if cached and held_cached else ''}, {timings['pool_s']} s")
    ident = None
    if args.identity_loss:
        t = time.time()
        ident, ident_info = recognizer.load_or_train(base.identities[chosen.train], "train" + tag,
                                                     args.recognizer_steps, say)
        timings["recognizer_s"] = round(time.time() - t, 1)
    out = Path(args.out)
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)
    t = time.time()
    k = args.references
    trainer = Trainer(trainer_config(args, run), base.model, vae=base.vae, progress=False,
                      data=data.ToySamples(base, pool, args.batch * max(args.train_steps, 1), seed=args.seed + 3,
                                           references=k),
                      holdout=data.ToySamples(base, held_pool, args.holdout, seed=args.seed + 4, references=k),
                      recognizer=ident.latent_embedding if ident is not None else None,
                      text_path=ToyTextPath(base) if args.identity_tokens else None)
    result = trainer.run()
    timings["train_s"] = round(time.time() - t, 1)
    other = list(data.ToySamples(base, held_pool, args.holdout, seed=args.seed + 4, other_identity=True,
                                 references=k))
    report = {"mode": "unseen identities", "threads": args.threads, "inversion": args.inversion,
              "identities": {"all": len(base.identities), "heldout": len(chosen.heldout),
                             "train": len(chosen.train), "split_seed": unseen.SPLIT_SEED},
              "chance": unseen.CHANCE, "references": k, "combine": args.combine, "identity_loss": args.identity_loss,
              "identity_tokens": args.identity_tokens,
              "heldout": result.heldout, "heldout_loss_other_identity": trainer.heldout_loss(samples=other),
              "train_loss_first_last": [result.losses[0], result.losses[-1]],
              "weights": str(result.weights), "parameters": result.parameters["total"],
              "base": {**base_info, "steps": recipe.steps, "batch": recipe.batch, "ema": recipe.ema, "lr": recipe.lr,
                       "fine_tuned_from": toy_base.base_path(recipe.init).name}}
    if ident is not None:
        report["recognizer"] = ident_info
    if not args.no_eval:
        t = time.time()
        judge, _ = unseen.load_or_train_judge(args.classifier_steps, log=say)
        timings["judge_s"] = round(time.time() - t, 1)
        train_refs = args.eval_refs if args.eval_train_refs < 0 else args.eval_train_refs
        counts = sorted({int(c) for c in args.eval_references.split(",")})
        wanted = [a.strip() for a in args.arms.split(",")]
        for key, ids, refs, seed in (("unseen_identities", chosen.heldout, args.eval_refs, args.seed + 5),
                                     ("training_identities", chosen.train, train_refs, args.seed + 6)):
            if refs <= 0:
                continue
            plan = unseen.make_plan(ids, refs, args.eval_poses, max(counts), seed=seed)
            arms, images = {}, {}
            for count in counts:
                evaluation = evaluate.Evaluation(base, None, plan, settings, args.inversion, say, references=count,
                                                 combine=args.combine)
                for name, adapter in evaluation.arms(result.weights):
                    if name not in wanted or (count > 1 and adapter is None):
                        continue
                    label = name if count == 1 else f"{name} K={count}"
                    images[label], cost = evaluation.run(f"{key} {label}", adapter)
                    arms[label] = {**unseen.score(judge, base, plan, images[label], evaluation.reference_images),
                                   **cost}
                    say(f"{key} {label}: {arms[label]}")
            out.mkdir(parents=True, exist_ok=True)
            grid.save(out / f"grid-{key}.png", evaluation.reference_images, images, args.eval_poses)
            report[key] = arms
        report["samples_per_arm"] = args.eval_refs * args.eval_poses
        report["samples_per_arm_training_identities"] = train_refs * args.eval_poses
    timings["total_s"] = round(time.time() - started, 1)
    report["timings"] = timings
    print(json.dumps(report))
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    started = time.time()
    use_comfyui()
    import comfy.cli_args

    # torch's SDPA for the UNet's own attention (ComfyUI falls back to chunked attention on a CPU without the flag)
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.utils
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False  # hundreds of short inversions: their console bars would drown the log

    torch.set_num_threads(args.threads)
    from identity_toy_lib import base as toy_base
    from identity_toy_lib import classifiers, data, evaluate, grid, shipped
    from identity_toy_lib.sampling import SamplerSettings
    from identity_toy_lib.token_path import ToyTextPath
    from invadapter_core.train.loop import Trainer

    timings = {}
    t = time.time()
    recipe = toy_base.PretrainRecipe(steps=args.base_steps, batch=args.base_batch, identities=args.identities,
                                     ema=args.base_ema)
    if args.unseen:  # the 16-identity base above, fine-tuned on every attribute combination
        recipe = toy_base.PretrainRecipe(steps=args.unseen_base_steps, batch=args.base_batch, ema=0.99, lr=5e-4,
                                         identities=toy_base.ALL_COMBINATIONS, init=recipe)
    if args.base_file:
        base, base_info = shipped.load_base(args.base_file)
    else:
        base, base_info = toy_base.load_or_pretrain(recipe, say)
    timings["base_s"] = round(time.time() - t, 1)
    judges = None
    if args.unseen:
        return unseen_main(args, base, base_info, recipe, timings, started)
    if not args.no_eval or args.export_demo_weights:
        t = time.time()
        judges, classifier_info = classifiers.load_or_train(base.identities, steps=args.classifier_steps, log=say)
        timings["classifiers_s"] = round(time.time() - t, 1)

    settings = SamplerSettings(steps=args.sample_steps, sampler=args.sampler, scheduler=args.scheduler)
    t = time.time()
    base_name = base_info.get("cache_name") or Path(base_info["path"]).stem
    pool, cached = data.load_or_build_pool(base, base_name, args.pool, settings.steps,
                                           settings.scheduler, settings.sampler, args.inversion, seed=args.seed + 2)
    timings["pool_s"] = round(time.time() - t, 1)
    say(f"reference pool: {len(pool.identity)} references inverted ({args.inversion}){' (cached)' if cached else ''}"
        f" in {timings['pool_s']} s")

    out = Path(args.out)
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)  # the benchmark's own run folder: every run starts from the same initialisation
    t = time.time()
    trainer = Trainer(trainer_config(args, run), base.model, vae=base.vae, progress=False,
                      data=data.ToySamples(base, pool, args.batch * max(args.train_steps, 1), seed=args.seed + 3),
                      holdout=data.ToySamples(base, pool, args.holdout, seed=args.seed + 4),
                      text_path=ToyTextPath(base) if args.identity_tokens else None)
    result = trainer.run()
    timings["train_s"] = round(time.time() - t, 1)
    # the same held-out targets, timesteps and noise, each with a reference of another identity
    other = list(data.ToySamples(base, pool, args.holdout, seed=args.seed + 4, other_identity=True))
    report = {"chance": 1 / len(base.identities), "threads": args.threads, "inversion": args.inversion,
              "heldout": result.heldout, "heldout_loss_other_identity": trainer.heldout_loss(samples=other),
              "train_loss_first_last": [result.losses[0], result.losses[-1]],
              "weights": str(result.weights), "parameters": result.parameters["total"],
              "base": base_info if args.base_file else {**base_info, "steps": recipe.steps, "batch": recipe.batch,
                                                        "ema": recipe.ema}}

    if args.export_demo_weights:
        given = argv if argv is not None else sys.argv[1:]
        command = shlex.join([".venv/bin/python", "benchmarks/identity_toy.py", *given])
        details = {"base recipe": "from the file" if args.base_file else vars(recipe), "base": Path(base_info["path"]).name, "adapter training": {
            k: getattr(args, k) for k in ("train_steps", "batch", "lr", "warmup", "tokens_m", "pool", "min_timestep",
                                          "seed")}, "held-out loss": result.heldout[-1], "timings": timings}
        exported = shipped.export(Path(args.export_demo_weights), base, judges, result.weights, command, args.seed,
                                  details)
        say(f"demo weights: {', '.join(str(p) for p in exported)}")
        report["demo_weights"] = [str(p) for p in exported]
    if judges is not None and not args.no_eval:
        plan = evaluate.make_plan(len(base.identities), args.eval_refs, args.eval_poses, seed=args.seed + 5)
        evaluation = evaluate.Evaluation(base, judges, plan, settings, args.inversion, say)
        arms, images = {}, {}
        wanted = [a.strip() for a in args.arms.split(",")]
        for name, adapter in evaluation.arms(result.weights):
            if name not in wanted:
                continue
            images[name], cost = evaluation.run(name, adapter)
            arms[name] = {**evaluation.score(images[name]), **cost}
            say(f"{name}: {arms[name]}")
        if args.curve_every:
            report["curve"] = learning_curve(evaluation, run, result.step, arms.get("trained"))
        out.mkdir(parents=True, exist_ok=True)
        grid_path = out / "grid.png"
        grid.save(grid_path, evaluation.reference_images, images, args.eval_poses, every=args.eval_refs)
        report.update(arms=arms, grid=str(grid_path), samples_per_arm=plan.samples)
    timings["total_s"] = round(time.time() - started, 1)
    report["timings"] = timings
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
