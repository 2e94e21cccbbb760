"""The evaluation loop: plan (identity x prompt x seed x setting), skip what results.csv already has, generate and
score the rest one image at a time, then summarize. Needs ComfyUI set up (``__main__`` does it).

Under torchrun (N processes) the images still to do are split into N consecutive shares, one per process (each
process encodes only its own identities' references); each appends to its own results-r<rank>.csv, and rank 0 merges
them into results.csv, in the grid's order, and summarizes over every row."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

from PIL import Image

from ..comfyui import torchrun
from ..face.detect import DetectorUnavailable, FaceCropError, InsightFaceModelsMissing
from ..face.recognize import FaceIdError, to_uint8
from ..files.images import ImageFileError, load_image_file
from .dataset import DatasetError, load_identities, read_prompts, slug
from .metrics import ClipMetric, FaceMetric
from .pipeline import BLOCK_PRESET_NONE, INIT_FROM_MODEL, Config, Generator, Nodes, PipelineError, Settings, model_name
from .results import SUMMARY_NAME, ResultsFile, ResumeMismatch, check_run, merge_results, partial_name, row_key, \
    summarize, verify_run

log = logging.getLogger("InvAdapter.evaluate")


class EvaluationError(ValueError):
    pass


class PeerStopped(RuntimeError):
    """Under torchrun, another process stopped (interrupted or failed) before the end of the grid."""


# How long a process that finished its share waits for the others (the processes need no other collective; torchrun
# stops the rest when one fails, so this only bounds a hang)
WAIT_FOR_OTHERS = timedelta(days=7)


@dataclasses.dataclass
class Job:
    identity: object
    prompt_index: int
    prompt: str
    seed: int
    config: Config

    @property
    def key(self):
        return row_key(self.identity.name, self.prompt, self.seed, self.config.name)


def save_png(image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    # written aside and renamed: under torchrun two processes may write the same identity's reference.png
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.png")
    Image.fromarray(to_uint8(image[0] if image.ndim == 4 else image)).save(temporary)
    os.replace(temporary, path)
    return str(path)


def _settings(args) -> Settings:
    return Settings(steps=args.steps, cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler, width=args.width,
                    height=args.height, negative=args.negative, resolution=args.resolution,
                    keep_features=not args.no_keep_features, inversion=args.inversion, capture=args.capture,
                    feature_precision=args.feature_precision,
                    start_percent=args.start_percent, end_percent=args.end_percent, combine=args.combine,
                    apply_to=args.apply_to, detector=args.detector, insightface_model=args.insightface_model,
                    margin=args.margin, min_face_size=args.crop_min_face_size, face_device=args.face_device,
                    on_no_face=args.on_no_face)


# run.json's keys (settings.* flattened) -> the option that sets them, to name a changed setting as the user typed it
OPTION_OF = {"settings.keep_features": "keep features (--no-keep-features)", "settings.min_face_size": "--crop-min-face-size",
             "settings.insightface_model": "--insightface-model", "data": "DATA"}


def option_name(key: str) -> str:
    return OPTION_OF.get(key) or "--" + key.split(".")[-1].replace("_", "-")


def _configs(args, nodes: Nodes) -> list[Config]:
    presets = [p for p in nodes.pack["InvAdapterBlockWeights"].define_schema().inputs[0].options if p != "custom"]
    bad = [p for p in args.block_weights if p not in presets + [BLOCK_PRESET_NONE]]
    if bad:
        raise EvaluationError(f"unknown --block-weights {', '.join(bad)}; choose from "
                              f"{', '.join([BLOCK_PRESET_NONE] + presets)}")
    adapters = [a if a == INIT_FROM_MODEL else model_name("invadapter", a, "adapter")
                for a in (args.adapter or [INIT_FROM_MODEL])]
    return [Config(a, ws, wc, bw) for a, ws, wc, bw in itertools.product(
        dict.fromkeys(adapters), dict.fromkeys(args.weight_self), dict.fromkeys(args.weight_cross),
        dict.fromkeys(args.block_weights))]


def _face_device(settings: Settings):
    """The face crop's and Face Similarity's device widget: "cpu" (their default), or ComfyUI's device."""
    import comfy.model_management as mm

    return mm.get_torch_device() if settings.face_device == "gpu" else "cpu"


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def evaluate(args, progress: Callable[[str], None] | None = None) -> dict | None:
    """The summary; None on the processes other than rank 0 under torchrun."""
    import torch

    try:
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            return _evaluate(args, progress or (lambda s: None), torchrun.env_info())
    except (DatasetError, PipelineError, ResumeMismatch, FaceIdError, FaceCropError, ImageFileError) as e:
        raise EvaluationError(str(e)) from None
    finally:
        torchrun.cleanup()


def _no_face_advice(settings: Settings) -> str:
    return (f"put a photo with a clearer, larger face first by name, lower --crop-min-face-size (now "
            f"{settings.min_face_size} px), try another --detector (now {settings.detector}), or pass --on-no-face "
            f"'center crop' to encode the photo's centre square")


def _evaluate(args, progress: Callable[[str], None], info: torchrun.DistInfo) -> dict | None:
    import comfy.model_management as mm
    import folder_paths

    # everything is checked before --out is created: a refused run leaves nothing behind
    out: Path = args.out
    prompts = args.prompt or (read_prompts(args.prompts) if args.prompts else None)
    identities = load_identities(str(args.data), prompts, args.caption)
    nodes = Nodes()
    checkpoint = model_name("checkpoints", args.checkpoint, "checkpoint")
    configs = _configs(args, nodes)
    settings = _settings(args)
    Generator.validate(nodes, settings)
    for root in args.insightface_root:
        folder_paths.add_model_folder_path("insightface", str(Path(root).resolve()), is_default=True)
    run = {"data": str(Path(args.data).resolve()), "checkpoint": checkpoint,
           "settings": dataclasses.asdict(settings), "recognizer": args.recognizer,
           "insightface_model": args.insightface_model, "min_face_size": args.min_face_size,
           "clip": args.clip, "clip_vision": args.clip_vision}
    verify_run(out, run, args.restart, option_name)
    face = FaceMetric(args.recognizer, args.insightface_model, folder_paths.get_folder_paths("insightface"),
                      _face_device(settings), args.min_face_size)
    clip = ClipMetric(nodes, args.clip, args.clip_vision)

    seeds = range(args.seed, args.seed + max(1, args.images_per_prompt))
    plan = [Job(identity, i, prompt, seed, config) for identity in identities for config in configs
            for i, prompt in enumerate(identity.prompts) for seed in seeds]
    order = {job.key: i for i, job in enumerate(plan)}
    # gloo also on CUDA: the processes only wait for each other, for as long as the slowest share takes (nccl's
    # watchdog would stop a process that waits longer than its timeout)
    torchrun.setup(backend="gloo", timeout=WAIT_FOR_OTHERS)
    results = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        check_run(out, run, args.restart, option_name)
        merge_results(out, order)  # an interrupted torchrun run's rows (any number of processes) count as done
        results = ResultsFile(out)  # (drops a torn last row) before the others read the file
    torchrun.barrier()  # every process now reads the same results.csv, so all agree on the shares
    if results is None:
        results = ResultsFile(out)
    todo = [job for job in plan if not results.done(job.key)]
    resumed = len(plan) - len(todo)
    if resumed and info.is_main:
        progress(f"resuming: {resumed} of {len(plan)} images already in {results.path}")
    # consecutive shares: a process encodes a reference only for the identities in its share
    share = todo[info.rank * len(todo) // info.world_size:(info.rank + 1) * len(todo) // info.world_size]
    first, total = (resumed, len(plan)) if not info.enabled else (0, len(share))
    sink = results
    if info.enabled:
        sink = ResultsFile(out, partial_name(info.rank))
        say = progress
        progress = lambda line: say(f"rank {info.rank}: {line}")  # noqa: E731
        progress(f"{len(share)} of the {len(todo)} images to do ({sink.path.name}, device "
                 f"{mm.get_torch_device()})")

    if info.is_main:
        for reason in clip.skipped.values():
            progress(reason)
    skipped_identities: dict[str, str] = {}
    generator = Generator(nodes, checkpoint, settings) if share else None
    done = skipped_images = 0
    for identity in identities:
        mine = [job for job in share if job.identity is identity]
        if not mine:
            continue
        try:
            # as LoadImage reads it, so a graph given this file scores and encodes the same pixels
            photo = load_image_file(identity.reference)
            crop = generator.face_crop(photo[None])
        except (ImageFileError, FaceCropError) as e:
            if isinstance(e, (DetectorUnavailable, InsightFaceModelsMissing)):  # no detector: nothing can be done
                raise
            no_face = isinstance(e, FaceCropError) and str(e).startswith("No face found")
            reason = f"reference photo {identity.reference}: " + (
                f"no face found (detector {settings.detector}, faces under {settings.min_face_size} px ignored): "
                f"{_no_face_advice(settings)}" if no_face else str(e))
            skipped_identities[identity.name] = reason
            skipped_images += len(mine)
            progress(f"[{first + done + skipped_images}/{total}] skipping identity {identity.name} "
                     f"({len(mine)} image(s)): {reason}")
            continue
        others = []
        for path in identity.other_photos:
            try:
                others.append(load_image_file(path))
            except ImageFileError as e:
                progress(f"identity {identity.name}: photo left out ({e})")
        faces = face.identity(photo, others)
        if faces.reference is None:
            progress(f"identity {identity.name}: the recognizer finds no face in {identity.reference}; its FACE-SIM "
                     f"stays empty")
        save_png(crop, out / "images" / slug(identity.name) / "reference.png")
        clip_reference = clip.image(crop)
        for adapter in dict.fromkeys(job.config.adapter for job in mine):
            reference = generator.encode(crop, identity.caption, adapter)
            for config in dict.fromkeys(job.config for job in mine if job.config.adapter == adapter):
                model = generator.apply(reference, config)
                for job in (j for j in mine if j.config == config):
                    mm.throw_exception_if_processing_interrupted()
                    start = time.perf_counter()
                    image = generator.generate(model, job.prompt, job.seed)
                    path = save_png(image, out / "images" / slug(identity.name) / slug(config.name)
                                    / f"p{job.prompt_index}_s{job.seed}.png")
                    row = {"identity": identity.name, "prompt_index": job.prompt_index, "prompt": job.prompt,
                           "seed": job.seed, "config": config.name, "adapter": config.adapter,
                           "weight_self": config.weight_self, "weight_cross": config.weight_cross,
                           "block_weights": config.block_weights, "image": str(Path(path).relative_to(out)),
                           **face.score(image, faces), **clip.scores(image, clip_reference, job.prompt)}
                    row["seconds"] = round(time.perf_counter() - start, 3)
                    sink.append(row)
                    done += 1
                    progress(f"[{first + done + skipped_images}/{total}] {identity.name} p{job.prompt_index} "
                             f"seed {job.seed} {config.name}: face_sim {_fmt(row['face_sim'])} clip_t {_fmt(row['clip_t'])} "
                             f"clip_i {_fmt(row['clip_i'])} ({row['seconds']:.1f} s)")

    if info.enabled:
        try:
            counts = torchrun.gather((done, skipped_images, skipped_identities, str(mm.get_torch_device())))
        except RuntimeError as e:  # gloo's error when a peer's connection closes
            raise PeerStopped(f"another process of this torchrun run stopped ({str(e).splitlines()[0]})") from None
        if not info.is_main:
            return None
        done, skipped_images = sum(c[0] for c in counts), sum(c[1] for c in counts)
        reasons = {name: why for c in counts for name, why in c[2].items()}
        skipped_identities = {i.name: reasons[i.name] for i in identities if i.name in reasons}
        devices = [c[3] for c in counts]
    else:
        devices = [str(mm.get_torch_device())]
    merge_results(out, order)  # the partials; and the grid's order where a resumed run appended out of it
    results = ResultsFile(out)
    keys = {job.key for job in plan}
    rows = [r for r in results.rows if row_key(r["identity"], r["prompt"], r["seed"], r["config"]) in keys]
    summary = {
        "checkpoint": checkpoint, "device": devices[0], "processes": len(devices), "devices": devices,
        "recognizer": face.name,
        "face_sim_scale": face.scale.description, "images": len(rows), "generated": done, "resumed": resumed,
        "not_evaluated": skipped_images,
        "configs": summarize(rows, configs), "skipped_metrics": clip.skipped,
        "skipped_identities": skipped_identities, "settings": dataclasses.asdict(settings),
        "csv": str(results.path), "out": str(out)}
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
    return summary
