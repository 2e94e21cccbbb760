"""Command line: ``python -m invadapter_core.train {config,preprocess,train,export,count}`` (run from the repo root).

ComfyUI is imported only after the arguments are parsed (``comfyui.host.setup_comfy``), so ``--help`` is instant
and ComfyUI never sees these arguments.
"""
from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = """\
Train Inv-Adapter EAA weights for an SD1.x, SD2.x or SDXL-family checkpoint, or Flux.1 / Chroma / Qwen-Image
(a checkpoint or its separate files) (docs/method.md §5).

  1. python -m invadapter_core.train config > train.toml      # every option, with its default and help
  2. edit train.toml: model.checkpoint, data.source, data.cache_dir, train.output_dir
  3. python -m invadapter_core.train preprocess --config train.toml
       face crop, VAE latents, caption encodings and DDIM inversion trajectories -> shards in data.cache_dir
  4. python -m invadapter_core.train train --config train.toml
       only the EAA parameters train; checkpoints, log.jsonl and samples/ in train.output_dir; the final
       train.output_dir/invadapter.safetensors goes into ComfyUI/models/invadapter/
  Several GPUs / nodes: torchrun --nproc_per_node=N -m invadapter_core.train {preprocess,train} --config ...
  (torchrun is installed beside this python: .venv/bin/torchrun; on CPUs the processes talk over gloo)
  Ctrl-C saves a checkpoint; the same command resumes from it.

Data: a folder of images with a caption .txt beside each (same name), or a .jsonl manifest of
{"image": "relative/or/absolute.png", "caption": "..."} lines, optionally naming the person ("identity": "p17"):
several photos per person train with another photo of the person as the reference (data.reference) and
train.references > 1. Unreadable images, missing captions and images
without a face are reported (data.cache_dir/report-r*.jsonl) and skipped.
ComfyUI is found through $COMFYUI_PATH or the repo's .host/comfyui_path. See docs/training.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m invadapter_core.train", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def with_config(p):
        p.add_argument("--config", "-c", help="TOML or JSON config file (sections model, data, train, optim, "
                                              "validation; see the `config` command)")
        p.add_argument("--set", "-s", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (JSON value or bare string); repeatable, "
                            "e.g. --set train.max_steps=100")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
        return p

    with_config(sub.add_parser("config", help="print the config (defaults, or --config with --set applied) as "
                                              "commented TOML"))
    with_config(sub.add_parser("preprocess", help="face crop, encode, invert: write the training shards"))
    with_config(sub.add_parser("train", help="train the EAA on the shards (resumes from the latest checkpoint)"))
    with_config(sub.add_parser("count", help="print the adapter's parameter count for the configured checkpoint"))
    export = sub.add_parser("export", help="a checkpoint folder's weights -> one weights file (another dtype)")
    export.add_argument("checkpoint", help="checkpoints/step-N folder (or any Inv-Adapter weights file)")
    export.add_argument("output", help="the .safetensors file to write")
    export.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError, dump_toml, load_config

    try:
        cfg = load_config(args.config, args.set) if args.command != "export" else None
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_toml(cfg))
        return 0
    from ..comfyui.host import setup_comfy
    from .distributed import env_info

    setup_comfy()
    info = env_info()
    logging.basicConfig(level=logging.INFO, format=f"[r{info.rank}] %(levelname)s %(name)s: %(message)s")
    from .config_check import check_config, check_export

    # everything the command will rely on, before anything loads (imported after the logging setup: the modules
    # it names may log on import)
    problems = check_export(args.checkpoint, args.output) if args.command == "export" \
        else check_config(cfg, args.command)
    if problems:
        for problem in problems:
            print(f"config error: {problem}" if args.command != "export" else f"error: {problem}", file=sys.stderr)
        return 2
    from ..face.arcface_torch import ArcFaceFileError
    from .data import DataError
    from .loop import Interrupted

    try:
        return COMMANDS[args.command](cfg, args, info)
    except (ConfigError, DataError, FileNotFoundError, ArcFaceFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        where = (f"the checkpoint of step {e.resume_step}" if e.resume_step else "the start (no checkpoint yet)")
        print(f"interrupted at step {e.step}; run the same command to resume from {where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        again = {"preprocess": "finished shards are kept", "train": "no step was trained yet"}.get(args.command)
        print(f"interrupted{f' ({again})' if again else ''}; run the same command to resume", file=sys.stderr)
        return 130


def run_preprocess(cfg, args, info) -> int:
    from .model import load_configured_base
    from .preprocess import preprocess

    model, clip, vae = load_configured_base(cfg, "auto", True, True)
    summary = preprocess(cfg, model, clip, vae, info, progress=not args.quiet)
    if summary["kept"] == 0 and summary["shards_kept"] == 0 and info.world_size == 1:
        reasons = ", ".join(f"{n} {why}" for why, n in summary.get("skip_reasons", {}).items()) or "no images found"
        print(f"error: preprocessing kept none of the {summary['items']} item(s) of {cfg.data.source} ({reasons}; "
              f"details in {cfg.data.cache_dir}/report-r000.jsonl): fix or caption the images, then run "
              f"preprocess again", file=sys.stderr)
        return 1
    return 0


def run_train(cfg, args, info) -> int:
    import comfy.model_management

    from .config import ConfigError, require
    from .loop import train
    from .model import load_configured_base, resolve_precision

    from .data import ShardSet
    from .groups import check_grouping

    # a missing cache, or settings that need identities the shards lack, fail before the model loads
    check_grouping(ShardSet(require(cfg.data.cache_dir, "data.cache_dir")), cfg)
    precision = resolve_precision(cfg.train.mixed_precision, comfy.model_management.get_torch_device())
    identity = cfg.loss.identity != 0 and bool(cfg.loss.recognizer)  # on when possible: a recognizer is set
    model, clip, vae = load_configured_base(cfg, precision,
                                            need_clip=bool(cfg.validation.prompts) or cfg.model.identity_tokens > 0,
                                            need_vae=cfg.validation.every > 0 or identity)
    recognizer = None
    if identity:
        from .identity import build_recognizer

        recognizer = build_recognizer(cfg, model, vae)
    text_path = None
    if cfg.model.identity_tokens > 0:  # the identity token enters each caption through the checkpoint's own CLIP
        from .text_path import ClipTextPath

        try:
            text_path = ClipTextPath(clip)
        except ValueError as e:
            raise ConfigError(f"model.identity_tokens: {e}") from None
    try:
        train(cfg, model, vae if cfg.validation.every > 0 else None, clip, progress=not args.quiet,
              recognizer=recognizer, text_path=text_path)
    finally:
        from .distributed import cleanup

        cleanup()
    return 0


def run_count(cfg, args, info) -> int:
    from .model import build_adapter, count_parameters, load_configured_base

    model, _, _ = load_configured_base(cfg, "auto", False, False)
    adapter = build_adapter(model, cfg.data.resolution, cfg.model.tokens_m, "random", cfg.model.train_self,
                            cfg.model.train_cross)
    for kind, n in count_parameters(adapter).items():
        print(f"{kind:10s} {n:>14,}")
    return 0


def run_export(cfg, args, info) -> int:
    import os

    import torch

    from ..adapter.weights import AdapterFileError, load_adapter, save_adapter

    source = args.checkpoint
    if os.path.isdir(source):
        source = os.path.join(source, "adapter.safetensors")
    try:
        save_adapter(load_adapter(source), args.output, getattr(torch, args.dtype))
    except (AdapterFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


COMMANDS = {"preprocess": run_preprocess, "train": run_train, "count": run_count, "export": run_export}

if __name__ == "__main__":
    sys.exit(main())
