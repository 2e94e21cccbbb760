"""The trainer's whole config checked before anything loads: one line per problem, naming the key and the fix.

``load_config`` already gives every key its type; these are the ranges, choices and files the commands rely on
later (a wrong one would otherwise fail minutes in, with a traceback, or train on nonsense).
"""
from __future__ import annotations

import math
import os
from typing import Optional

from .config import Config

DTYPES = ("float16", "bfloat16", "float32")
STORAGE_DTYPES = ("float16", "float32")
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive, a legacy pickle (.ckpt)


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a checkpoint ComfyUI can load (None: it looks like one). Reads only the header."""
    if not os.path.isfile(path):
        return "does not exist" if not os.path.exists(path) else "is not a file"
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(PICKLE_MAGIC):
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            if not list(f.keys()):
                return "is a safetensors file without tensors"
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return "is neither a safetensors file nor a PyTorch checkpoint"
    return None


def check_config(cfg: Config, command: str) -> list[str]:
    """Every problem of ``cfg`` for ``command`` (preprocess, train, count), one line each; empty: usable."""
    import comfy.samplers

    from ..face.detect import DETECTORS
    from ..adapter.injection import COMBINE_MODES
    from .model import PRECISIONS
    from .groups import REFERENCE_MODES
    from .preprocess import FACE_CROP_MODES

    problems: list[str] = []

    def need(ok: bool, key: str, value, what: str) -> None:
        if not ok:
            problems.append(f"{key} = {value!r}: {what}")

    def number(key: str, value, low=None, high=None, low_open=False, what: str = "") -> None:
        """A finite number in [low, high] ((low, high] with ``low_open``)."""
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
        if not ok:
            bounds = [f"{'above' if low_open else 'at least'} {low}" if low is not None else "",
                      f"at most {high}" if high is not None else ""]
            need(False, key, value, what or f"must be a finite number {' and '.join(b for b in bounds if b)}")

    def choice(key: str, value, options) -> None:
        need(value in options, key, value, f"must be one of {', '.join(map(str, options))}")

    def required_path(key: str, value: str, must_exist: bool = False) -> None:
        if not value:
            problems.append(f"{key} is not set: put it in the config file or pass --set {key}=...")
        elif must_exist and not os.path.exists(value):
            need(False, key, value, "does not exist")

    m, d, t, o, v = cfg.model, cfg.data, cfg.train, cfg.optim, cfg.validation
    # model
    if m.checkpoint and m.diffusion_model:
        problems.append("model.checkpoint and model.diffusion_model are both set: give one checkpoint, or the "
                        "separate files (diffusion_model, text_encoders, clip_type, vae)")
    elif m.diffusion_model:
        files = [("model.diffusion_model", m.diffusion_model)] + \
            [(f"model.text_encoders[{i}]", f) for i, f in enumerate(m.text_encoders)] + \
            ([("model.vae", m.vae)] if m.vae else [])
        for key, path in files:
            why = checkpoint_problem(path)
            need(why is None, key, path, f"{why}; point it at the model file (.safetensors)")
        need(bool(m.text_encoders), "model.text_encoders", m.text_encoders,
             "give the text encoder files the diffusion model uses (preprocessing and validation encode captions)")
        need(bool(m.vae), "model.vae", m.vae, "give the VAE file (preprocessing encodes the faces with it)")
        from .model import clip_type
        try:
            clip_type(m.clip_type)
        except ValueError as e:
            need(False, "model.clip_type", m.clip_type, str(e))
    elif not m.checkpoint:
        problems.append("model.checkpoint is not set: put it in the config file or pass --set model.checkpoint=... "
                        "(or give model.diffusion_model, model.text_encoders and model.vae)")
    else:
        why = checkpoint_problem(m.checkpoint)
        need(why is None, "model.checkpoint", m.checkpoint,
             f"{why}; point it at the SD 1.5 checkpoint (.safetensors or .ckpt)")
    number("model.tokens_m", m.tokens_m, 1)
    need(m.init in ("base", "random") or os.path.isfile(m.init), "model.init", m.init,
         "must be 'base', 'random' or an existing Inv-Adapter weights file")
    # data
    if command == "preprocess":
        required_path("data.source", d.source, must_exist=True)
        if d.source and os.path.isfile(d.source):
            need(d.source.endswith((".jsonl", ".json")), "data.source", d.source,
                 "a file source must be a .jsonl manifest")
            need(not d.identity_folders, "data.identity_folders", d.identity_folders,
                 "is for a folder source; a manifest names the person with \"identity\" on each line")
    if command in ("preprocess", "train"):
        required_path("data.cache_dir", d.cache_dir)
    number("data.resolution", d.resolution, 0, low_open=True, what="must be a positive number of pixels (512 "
                                                                    "for SD 1.5)")
    choice("data.face_crop", d.face_crop, FACE_CROP_MODES)
    choice("data.face_detector", d.face_detector, DETECTORS)
    number("data.face_margin", d.face_margin, 0)
    number("data.min_face_size", d.min_face_size, 1)
    number("data.inversion_steps", d.inversion_steps, 2)
    choice("data.inversion_scheduler", d.inversion_scheduler, comfy.samplers.SCHEDULER_NAMES)
    number("data.shard_size", d.shard_size, 1)
    number("data.batch_size", d.batch_size, 1)
    choice("data.storage_dtype", d.storage_dtype, STORAGE_DTYPES)
    choice("data.reference", d.reference, REFERENCE_MODES)
    # train
    if command == "train":
        required_path("train.output_dir", t.output_dir)
        number("train.max_steps", t.max_steps, 1, what="must be 1 or more (0 would train nothing and write the "
                                                       "untrained weights)")
    number("train.batch_size", t.batch_size, 1)
    number("train.grad_accum", t.grad_accum, 1)
    number("train.caption_dropout", t.caption_dropout, 0, 1)
    number("train.min_timestep", t.min_timestep, 0, 999)
    number("train.max_timestep", t.max_timestep, 0, 999)
    if t.min_timestep > t.max_timestep:
        problems.append(f"train.min_timestep = {t.min_timestep} is above train.max_timestep = {t.max_timestep}: "
                        f"set min_timestep <= max_timestep")
    number("train.references", t.references, 0)
    choice("train.reference_combine", t.reference_combine, COMBINE_MODES)
    choice("train.mixed_precision", t.mixed_precision, PRECISIONS)
    number("train.log_every", t.log_every, 1)
    number("train.checkpoint_every", t.checkpoint_every, 0)
    number("train.keep_checkpoints", t.keep_checkpoints, 0)
    need(t.resume in ("auto", "no") or os.path.isdir(t.resume), "train.resume", t.resume,
         "must be 'auto', 'no' or an existing checkpoint folder")
    choice("train.export_dtype", t.export_dtype, DTYPES)
    # optim
    number("optim.lr", o.lr, 0, low_open=True)
    number("optim.weight_decay", o.weight_decay, 0)
    need(isinstance(o.betas, list) and len(o.betas) == 2
         and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in o.betas),
         "optim.betas", o.betas, "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    number("optim.eps", o.eps, 0, low_open=True)
    number("optim.warmup_steps", o.warmup_steps, 0)
    number("optim.grad_clip", o.grad_clip, 0)
    # loss (the identity term's recognizer: only what `train` loads)
    number("loss.identity", cfg.loss.identity, 0)
    number("loss.recognizer_resolution", cfg.loss.recognizer_resolution, 0)
    if command == "train" and cfg.loss.identity and cfg.loss.recognizer:  # no recognizer: the term is off
        from ..face.arcface_torch import recognizer_problem

        why = recognizer_problem(cfg.loss.recognizer)
        need(why is None, "loss.recognizer", cfg.loss.recognizer, why)
    # validation
    number("validation.every", v.every, 0)
    number("validation.holdout", v.holdout, -1)
    number("validation.images", v.images, 0)
    need(all(isinstance(p, str) for p in v.prompts), "validation.prompts", v.prompts, "must be a list of strings")
    number("validation.steps", v.steps, 1)
    number("validation.cfg", v.cfg, 0)
    choice("validation.sampler", v.sampler, comfy.samplers.SAMPLER_NAMES)
    choice("validation.scheduler", v.scheduler, comfy.samplers.SCHEDULER_NAMES)
    number("validation.size", v.size, 0)
    return problems


def check_export(checkpoint: str, output: str) -> list[str]:
    """The export command's arguments: a weights file (or a checkpoint folder holding one) and a writable target."""
    problems = []
    source = os.path.join(checkpoint, "adapter.safetensors") if os.path.isdir(checkpoint) else checkpoint
    if not os.path.isfile(source):
        problems.append(f"checkpoint {checkpoint!r}: "
                        + ("the folder holds no adapter.safetensors (pass a checkpoints/step-N folder)"
                           if os.path.isdir(checkpoint) else "not found (pass a checkpoints/step-N folder or an "
                                                             "Inv-Adapter weights file)"))
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        problems.append(f"output {output!r} is a folder: name the .safetensors file to write")
    elif not os.path.isdir(folder):
        problems.append(f"output {output!r}: its folder {folder} does not exist; create it first")
    elif not os.access(folder, os.W_OK):
        problems.append(f"output {output!r}: its folder {folder} is not writable")
    return problems
