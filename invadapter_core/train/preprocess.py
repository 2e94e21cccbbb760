"""`preprocess`: the expensive per-image work, done once and written to shards that training streams.

Per image: load, face crop (or centre crop), resize to the reference resolution, VAE-encode, CLIP-encode the
caption, DDIM-invert with the caption at guidance 1 (``encode.invert_latent``, the encode node's own code) and keep
the trajectory. On a flow model (Flux, Chroma, Qwen-Image) the same inversion runs on the model's own flow schedule
with the conditioning its sampler would build (``encode.reference_conds``: Flux's pooled vector and its guidance
embedding at the model's default, 3.5 for Flux-dev), and each sample's guidance is kept in the shard. Bad items
(unreadable image, missing caption, no face) are reported to ``report-r<rank>.jsonl`` and skipped. Under torchrun
every process takes every WORLD_SIZE-th image; no process group is needed. Shards already on disk are kept, so an
interrupted preprocess resumes where it stopped. Each image's identity (a manifest's "identity") goes into its shard;
photos of one person are grouped only when training reads all the shards (``groups``), so no process waits.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from ..reference.encode import invert_latent, reference_conds
from ..arch.layout import layout_of, model_family
from .config import Config, require
from .data import (EMPTY_CONTEXT_FILE, Item, SkipItem, clean_caption, list_items, load_image, shard_name,
                   write_shard)
from .distributed import DistInfo
from .model import check_trainable, is_joint

log = logging.getLogger("InvAdapter.train")
CONTEXT_TOKENS = 77  # one CLIP window; longer captions are cut (their tail would need a second window)
FACE_CROP_MODES = ("auto", "detect", "center")


# ------------------------------------------------------------------------------------------------ cropping
def make_cropper(cfg: Config) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """(image [H, W, 3] -> the square crop [res, res, 3], how it crops: the detector's name or "centre crop");
    the crop raises SkipItem when face detection is on and finds no face."""
    d = cfg.data
    if d.face_crop not in FACE_CROP_MODES:
        raise ValueError(f"data.face_crop must be one of {FACE_CROP_MODES}, got {d.face_crop!r}")
    from ..face import detect as face

    detector = None
    if d.face_crop in ("auto", "detect"):
        roots = [d.insightface_root] if d.insightface_root else []
        try:
            detector = face.get_detector(d.face_detector, insightface_roots=roots)
        except face.FaceCropError as e:
            if d.face_crop == "detect":
                raise
            log.warning("no face detector available (%s): using centre crops", str(e).splitlines()[0])

    def crop(image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[:2]
        if detector is None:
            box = face.center_crop(h, w)
        else:
            found = face.select_face(face.detect_faces(detector, image, d.min_face_size), "largest")
            if found is None:
                raise SkipItem(f"no face found (detector {detector.name}, min_face_size {d.min_face_size} px)")
            box = face.square_crop(found.box, h, w, d.face_margin)
        x1, y1, x2, y2 = box
        return face.resize_hwc(image[y1:y2, x1:x2], d.resolution, d.resolution)

    return crop, (detector.name if detector is not None else "centre crop")


# ------------------------------------------------------------------------------------------------ encoding
def encode_caption(clip, caption: str) -> tuple[torch.Tensor, Optional[torch.Tensor], bool]:
    """[77, D] float32, the pooled output [P] (what an SDXL UNet's ADM vector is built from; None if the text
    encoder has none), and whether the caption was longer than one CLIP window (then cut)."""
    with torch.no_grad():
        context, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
    pooled = None if pooled is None else pooled[0].float().cpu()
    return context[0, :CONTEXT_TOKENS].float().cpu(), pooled, context.shape[1] > CONTEXT_TOKENS


def has_adm(model) -> bool:
    """The UNet takes an ADM vector (SDXL's pooled text and size conditioning)."""
    return model.model.model_config.unet_config.get("adm_in_channels") is not None


def prompt_tensors(model, context: torch.Tensor, pooled: Optional[torch.Tensor], resolution: int) -> dict:
    """What a shard keeps of a batch of prompts: "context" [B, T, D]; for a UNet with an ADM input also "adm"
    [B, A] (built by the model's own extra_conds, with the image's own size: ``encode.reference_conds``) and
    "pooled" [B, P]."""
    tensors = {"context": context}
    if is_joint(layout_of(model)):  # an MM-DiT: its pooled vector (Flux's y), as its own extra_conds builds it
        conds = joint_conds(model, context, pooled, resolution)
        if "y" in conds:
            tensors.update(adm=conds["y"].expand(context.shape[0], -1).clone(), pooled=pooled)  # y is pooled itself
        return tensors
    if has_adm(model):
        side = layout_of(model).latent_side(resolution)
        x0 = torch.zeros(context.shape[0], layout_of(model).latent_channels, side, side)
        conds = reference_conds(model, context, {"pooled_output": pooled}, x0, (resolution, resolution))
        tensors.update(adm=conds["y"], pooled=pooled)
    return tensors


def joint_conds(model, context: torch.Tensor, pooled: Optional[torch.Tensor], resolution: int) -> dict:
    """An MM-DiT's apply_model conditioning for a batch of prompts (``encode.reference_conds``): the context, the
    pooled vector where it takes one, and the guidance embedding's input at the model's own default."""
    side = layout_of(model).latent_side(resolution)
    x0 = torch.zeros(context.shape[0], layout_of(model).latent_channels, side, side)
    return reference_conds(model, context, {} if pooled is None else {"pooled_output": pooled}, x0,
                           (resolution, resolution))


def layout(cfg: Config, model) -> dict:
    """What a shard's tensors depend on; training refuses shards whose layout differs from the others."""
    d = cfg.data
    return {"family": model_family(model), "resolution": d.resolution, "inversion_steps": d.inversion_steps,
            "inversion_scheduler": d.inversion_scheduler, "face_crop": d.face_crop, "face_margin": d.face_margin}


class Reporter:
    """Skipped items, one JSON line each (and a log line), per process."""

    def __init__(self, path: Path):
        self.path = path
        self.counts: dict[str, int] = {}

    def skip(self, item: Item, reason: str) -> None:
        kind = reason.split(" (")[0]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        log.warning("skipped %s: %s", item.image, reason)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"image": item.image, "reason": reason}) + "\n")


def prepare_item(item: Item, crop) -> tuple[torch.Tensor, str]:
    if item.problem:
        raise SkipItem(item.problem)
    caption = clean_caption(item.caption)
    return crop(load_image(item.image)), caption


def process_batch(model, clip, vae, cfg: Config, pixels: list[torch.Tensor], captions: list[str]):
    """(states [B, n+1, C, h, w], prompt tensors {"context" [B, 77, D], SDXL: "adm", "pooled"}, sigmas [n+1],
    truncated captions)."""
    encoded = [encode_caption(clip, c) for c in captions]
    joint = is_joint(layout_of(model))
    pooled = torch.stack([e[1] for e in encoded]) if has_adm(model) or (joint and encoded[0][1] is not None) else None
    tensors = prompt_tensors(model, torch.stack([e[0] for e in encoded]), pooled, cfg.data.resolution)
    with torch.no_grad():
        latent = vae.encode(torch.stack(pixels))
        # one inversion for the batch: every sample with its own caption (reference_pass takes per-sample conds)
        conds = {"c_crossattn": tensors["context"], **({"y": tensors["adm"]} if "adm" in tensors else {})}
        if joint and "guidance" in (found := joint_conds(model, tensors["context"], pooled, cfg.data.resolution)):
            conds["guidance"] = tensors["guidance"] = found["guidance"].expand(len(pixels)).contiguous()
        ref = invert_latent(model, latent, conds, cfg.data.inversion_steps, cfg.data.inversion_scheduler,
                            (cfg.data.resolution, cfg.data.resolution), keep_features=False)
    return ref.states.movedim(1, 0), tensors, ref.sigmas.float(), sum(e[2] for e in encoded)


# ------------------------------------------------------------------------------------------------ the run
def preprocess(cfg: Config, model, clip, vae, info: DistInfo, progress: bool = True) -> dict:
    """Writes this process's shards; returns a summary (images kept/skipped, reasons, seconds)."""
    from tqdm import tqdm

    check_trainable(model)
    out = Path(require(cfg.data.cache_dir, "data.cache_dir"))
    out.mkdir(parents=True, exist_ok=True)
    _refuse_other_world_sizes(out, info.world_size)
    items = list_items(cfg.data.source, cfg.data.identity_folders)
    mine = items[info.rank::info.world_size]
    crop, cropping = make_cropper(cfg)
    log.info("face crop: %s (data.face_crop = %s, data.face_detector = %s)", cropping, cfg.data.face_crop,
             cfg.data.face_detector)
    storage = {"float16": torch.float16, "float32": torch.float32}.get(cfg.data.storage_dtype)
    if storage is None:
        raise ValueError(f"data.storage_dtype must be float16 or float32, got {cfg.data.storage_dtype!r}")
    if info.is_main:
        empty, empty_pooled, _ = encode_caption(clip, "")
        tensors = prompt_tensors(model, empty[None], None if empty_pooled is None else empty_pooled[None],
                                 cfg.data.resolution)
        save_file({k: v[0].contiguous() for k, v in tensors.items()}, str(out / EMPTY_CONTEXT_FILE))
    report = Reporter(out / f"report-r{info.rank:03d}.jsonl")
    shape = layout(cfg, model)
    size = cfg.data.shard_size
    summary = {"rank": info.rank, "face_crop": cropping, "items": len(mine), "kept": 0, "skipped": 0, "truncated_captions": 0,
               "shards_written": 0, "shards_kept": 0}
    start = time.time()
    bar = tqdm(total=len(mine), desc=f"preprocess r{info.rank}", disable=not (progress and info.is_main),
               dynamic_ncols=True)
    for shard in range((len(mine) + size - 1) // size):
        chunk = mine[shard * size:(shard + 1) * size]
        path = out / shard_name(info.rank, info.world_size, shard)
        if path.exists():  # written by an earlier (interrupted) run
            summary["shards_kept"] += 1
            bar.update(len(chunk))
            continue
        kept = _process_chunk(model, clip, vae, cfg, chunk, crop, report, summary, bar)
        if kept is None:
            continue
        states, tensors, sigmas, captions, images, identities = kept
        extra = {k: v.to(storage) for k, v in tensors.items() if k != "context"}
        write_shard(str(path), states.to(storage), tensors["context"].to(storage), sigmas, captions, images, shape,
                    extra, identities)
        summary["shards_written"] += 1
    bar.close()
    summary["skipped"] = sum(report.counts.values())
    summary["skip_reasons"] = report.counts
    summary["seconds"] = round(time.time() - start, 2)
    (out / f"preprocess-r{info.rank:03d}.json").write_text(json.dumps(summary, indent=1))
    log.info("preprocess rank %d: %d kept, %d skipped %s, %d shards in %.1f s (face crop: %s)", info.rank,
             summary["kept"], summary["skipped"], report.counts or "", summary["shards_written"], summary["seconds"],
             cropping)
    return summary


def _process_chunk(model, clip, vae, cfg, chunk, crop, report, summary, bar) -> Optional[tuple]:
    states, tensors, captions, images, identities = [], {}, [], [], []
    sigmas = None
    batch: list[tuple[Item, torch.Tensor, str]] = []

    def flush():
        nonlocal sigmas
        if not batch:
            return
        s, prompt, sig, cut = process_batch(model, clip, vae, cfg, [b[1] for b in batch], [b[2] for b in batch])
        states.append(s.cpu())
        for key, t in prompt.items():
            tensors.setdefault(key, []).append(t.cpu())
        sigmas = sig
        captions.extend(b[2] for b in batch)
        images.extend(b[0].image for b in batch)
        identities.extend(b[0].identity for b in batch)
        summary["kept"] += len(batch)
        summary["truncated_captions"] += cut
        bar.update(len(batch))
        batch.clear()

    for item in chunk:
        try:
            pixels, caption = prepare_item(item, crop)
        except SkipItem as e:
            report.skip(item, str(e))
            bar.update(1)
            continue
        batch.append((item, pixels, caption))
        if len(batch) >= cfg.data.batch_size:
            flush()
    flush()
    if not states:
        return None
    return torch.cat(states), {k: torch.cat(v) for k, v in tensors.items()}, sigmas, captions, images, identities


def _refuse_other_world_sizes(out: Path, world_size: int) -> None:
    other = [p.name for p in out.glob("shard-*.safetensors") if f"of{world_size:03d}-" not in p.name]
    if other:
        raise RuntimeError(f"{out} holds shards of a preprocess run with another number of processes ({other[0]}, "
                           f"...): finish with the same number of processes, or clear the folder")
