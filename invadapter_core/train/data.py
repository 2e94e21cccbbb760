"""Training data: the raw items (image + caption), the preprocessed shards, and a resumable sample order.

The trainer consumes ``TrainingSample``s from a *data source*: any Python iterable of them. The preprocessed shards
(``ShardSet``) are one; another (e.g. ``benchmarks/identity_toy.py``'s synthetic identities) can be passed to
``loop.train`` directly. A source with ``__len__`` and ``__getitem__`` is drawn in seeded epoch permutations
(``SampleOrder``: exact resume, N processes == one with N x the batch); a plain iterable is streamed in order
(``StreamOrder``: process r takes every W-th item, a resumed run skips the items already trained on). A source
used with caption dropout gives the empty prompt as its ``empty_context`` attribute ([T, D]) (for UNets with an ADM
input also ``empty_adm`` [A] and ``empty_pooled`` [P]).

A shard is one safetensors file holding, for S images of one reference resolution:
    states   [S, n+1, 4, h, w]  the DDIM inversion trajectory in sampler space (states[:, 0] = the clean latent)
    context  [S, 77, 768]       the caption's CLIP encoding (first 77 tokens)
    sigmas   [n+1]              the trajectory's sigmas (ascending), the same for every image
with metadata ``invadapter.kind`` = "training shard", ``captions`` / ``images`` (JSON lists), ``identities`` (JSON
list: each image's person from the manifest, null for none; absent when no image has one) and ``layout`` (JSON:
resolution, inversion steps/scheduler, base family) so `train` can refuse shards made with other settings. Which
photos of a person serve as a target's references is ``groups``'s.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files.images import IMAGE_EXTENSIONS, SkipItem, load_image  # noqa: F401 - preprocessing's image loading
from ..files.format import META
from ..files.manifest import manifest_entries

SHARD_KIND = "training shard"
EMPTY_CONTEXT_FILE = "empty_context.safetensors"
EMPTY_PROMPT = ("empty_context", "empty_adm", "empty_pooled")  # what a data source gives of the empty prompt


class DataError(ValueError):
    """A data set that cannot be used at all (as opposed to single bad items, which are skipped)."""


@dataclass
class Item:
    image: str
    caption: Optional[str]  # None: no caption found
    problem: Optional[str] = None  # set when the item is already known to be unusable (bad manifest line)
    identity: Optional[str] = None  # the person in the photo (a manifest's "identity"): groups photos for training


# ------------------------------------------------------------------------------------------------ raw items
def list_items(source: str, identity_folders: bool = False) -> list[Item]:
    """``identity_folders``: a folder source's subfolders name the person (``faces/<person>/*.jpg``)."""
    if not source:
        raise DataError("data.source is not set: a folder of images + .txt captions, or a .jsonl manifest")
    if os.path.isdir(source):
        return _folder_items(Path(source), identity_folders)
    if os.path.isfile(source) and source.endswith((".jsonl", ".json")):
        return _manifest_items(Path(source))
    raise DataError(f"data.source {source} is neither a folder nor a .jsonl manifest")


def _folder_items(folder: Path, identity_folders: bool = False) -> list[Item]:
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8", errors="replace") if caption_file.is_file() else None
        parts = path.relative_to(folder).parts  # images directly in the folder name no one
        items.append(Item(str(path), caption, identity=parts[0] if identity_folders and len(parts) > 1 else None))
    if not items:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return items


def _manifest_items(manifest: Path) -> list[Item]:
    items = []
    for number, entry in manifest_entries(manifest):
        where = f"{manifest.name} line {number}"
        try:
            if isinstance(entry, Exception):
                raise entry
            image = entry["image"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            items.append(Item(where, None, problem=f"bad manifest line ({type(e).__name__}: {e})"))
            continue
        caption = entry.get("caption") if isinstance(entry, dict) else None
        identity = entry.get("identity") if isinstance(entry, dict) else None
        if isinstance(identity, int) and not isinstance(identity, bool):
            identity = str(identity)
        if identity is not None and not (isinstance(identity, str) and identity.strip()):
            items.append(Item(where, None, problem=f"bad manifest line (\"identity\" must be a non-empty string or "
                                                   f"an integer naming the person, got {identity!r})"))
            continue
        items.append(Item(str(manifest.parent / image), caption if isinstance(caption, str) else None,
                          identity=identity.strip() if identity is not None else None))
    if not items:
        raise DataError(f"the manifest {manifest} lists no images")
    return items


def clean_caption(caption: Optional[str]) -> str:
    if caption is None:
        raise SkipItem("no caption (expected a .txt file beside the image, or a \"caption\" in the manifest)")
    caption = " ".join(caption.split())
    if not caption:
        raise SkipItem("empty caption")
    return caption


# ------------------------------------------------------------------------------------------------ shards
def shard_name(rank: int, world_size: int, index: int) -> str:
    return f"shard-r{rank:03d}of{world_size:03d}-{index:05d}.safetensors"


def write_shard(path: str, states: torch.Tensor, context: torch.Tensor, sigmas: torch.Tensor, captions: list[str],
                images: list[str], layout: dict, extra: Optional[dict[str, torch.Tensor]] = None,
                identities: Optional[list[Optional[str]]] = None) -> None:
    """``extra``: per-sample tensors beside the context (SDXL: "adm" [S, A] and "pooled" [S, P]); ``identities``:
    each image's person (None: unknown), kept only when some image has one."""
    meta = {META + "kind": SHARD_KIND, "captions": json.dumps(captions), "images": json.dumps(images),
            "layout": json.dumps(layout, sort_keys=True)}
    if identities and any(i is not None for i in identities):
        meta["identities"] = json.dumps(identities)
    tmp = path + ".partial"
    tensors = {"states": states.contiguous(), "context": context.contiguous(), "sigmas": sigmas.contiguous()}
    tensors.update({k: v.contiguous() for k, v in (extra or {}).items()})
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # an interrupted preprocess never leaves a half shard under the real name


@dataclass
class ReferenceView:
    """Another photo of the sample's identity, as the reference branch reads it (MFF: ``train.references``)."""
    states: torch.Tensor             # [n+1, C, h, w] its inversion trajectory, in sampler space
    context: torch.Tensor            # [T, D] the caption it was inverted with
    adm: Optional[torch.Tensor] = None  # [A] its ADM vector (SDXL)


@dataclass
class TrainingSample:
    """One training example. The generation pass denoises ``target`` under ``context``; the reference branch reads
    its features off ``reference_states`` (the reference's inversion trajectory, inverted with
    ``reference_context``). In the paper's setting the reference is the target image itself (what the shards hold);
    it may as well be another image of the same identity."""
    target: torch.Tensor             # [C, h, w] the clean latent, in sampler space (process_latent_in applied)
    context: torch.Tensor            # [T, D] the generation's prompt (the caption)
    reference_sigmas: torch.Tensor   # [n+1] ascending
    reference_states: torch.Tensor   # [n+1, C, h, w] the reference's trajectory, in sampler space
    reference_context: torch.Tensor  # [T, D] the caption the reference was inverted with
    caption: str = ""
    # UNets with an ADM input (SDXL): the generation's and the reference pass's ADM vectors ([A]: the caption's pooled
    # output and the image's size), and the caption's pooled output (what ComfyUI's sampler builds the ADM from)
    adm: Optional[torch.Tensor] = None
    reference_adm: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None
    guidance: Optional[float] = None  # models with a guidance embedding (Flux-dev): what both passes get
    # more photos of the same identity (same sigmas as the reference): ``train.references`` = K uses the reference
    # and the first K - 1 of these, combined as inference combines several photos (mixed facial features)
    more_references: tuple = ()


class ShardSet:
    """Every shard of a cache folder, indexed by a global sample number; tensors are read lazily (memory-mapped)."""

    def __init__(self, cache_dir: str):
        if not cache_dir or not os.path.isdir(cache_dir):
            raise DataError(f"data.cache_dir {cache_dir!r} does not exist: run `preprocess` first")
        self.files = sorted(str(p) for p in Path(cache_dir).glob("shard-*.safetensors"))
        if not self.files:
            raise DataError(f"no shards in {cache_dir}: run `preprocess` first")
        self.layout: Optional[dict] = None
        self.index: list[tuple[int, int]] = []  # global sample -> (file number, row)
        self.captions: list[str] = []
        self.identities: list[Optional[str]] = []  # each image's person (None: the manifest named none)
        sigmas = None
        worlds = set()
        for number, path in enumerate(self.files):
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get(META + "kind") != SHARD_KIND:
                    raise DataError(f"{path} is not a training shard; remove it from {cache_dir}")
                layout = json.loads(meta["layout"])
                s = f.get_tensor("sigmas")
                rows = f.get_slice("states").get_shape()[0]
            if self.layout is None:
                self.layout, sigmas = layout, s
            elif layout != self.layout or not torch.equal(s, sigmas):
                raise DataError(f"{path} was preprocessed with other settings ({layout}) than {self.files[0]} "
                                f"({self.layout}): clear {cache_dir} and preprocess again")
            worlds.add(Path(path).name.split("of")[1][:3])
            self.captions += json.loads(meta["captions"])
            self.identities += json.loads(meta["identities"]) if "identities" in meta else [None] * rows
            self.index += [(number, row) for row in range(rows)]
        if len(worlds) > 1:
            raise DataError(f"{cache_dir} holds shards of preprocess runs with different process counts "
                            f"({sorted(worlds)}): some images would be there twice; clear it and preprocess again")
        self.sigmas = sigmas.double()
        empty = Path(cache_dir) / EMPTY_CONTEXT_FILE
        if not empty.is_file():
            raise DataError(f"{empty} is missing (rank 0 of `preprocess` writes it): run `preprocess` again")
        with safe_open(str(empty), framework="pt") as f:
            self.empty_context = f.get_tensor("context").float()  # [T, D]
            # the empty prompt's ADM vector and pooled output, for models with an ADM input (SDXL)
            self.empty_adm = f.get_tensor("adm").float() if "adm" in f.keys() else None
            self.empty_pooled = f.get_tensor("pooled").float() if "pooled" in f.keys() else None
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    @property
    def grouped(self) -> bool:
        """Some images name their person: the photos can be grouped by identity (``groups``)."""
        return any(i is not None for i in self.identities)

    def _handle(self, number: int):
        if number not in self._open:
            if len(self._open) > 64:  # bound the open file handles on huge data sets
                self._open.clear()
            self._open[number] = safe_open(self.files[number], framework="pt")
        return self._open[number]

    def view(self, i: int) -> ReferenceView:
        """Image i as a reference photo (of another image of its identity)."""
        states, context, extra, _ = self._read(i)
        return ReferenceView(states, context, extra.get("adm"))

    def _read(self, i: int) -> tuple[torch.Tensor, torch.Tensor, dict, object]:
        number, row = self.index[i]
        f = self._handle(number)
        states, context = f.get_slice("states")[row].float(), f.get_slice("context")[row].float()
        return states, context, {key: f.get_slice(key)[row].float() for key in ("adm", "pooled") if key in f.keys()}, f

    def __getitem__(self, i: int) -> TrainingSample:
        """Image i as its own reference (the paper's setting)."""
        states, context, extra, f = self._read(i)
        row = self.index[i][1]
        adm = extra.get("adm")
        guidance = float(f.get_slice("guidance")[row:row + 1]) if "guidance" in f.keys() else None
        return TrainingSample(states[0], context, self.sigmas, states, context, self.captions[i], adm=adm,
                              reference_adm=adm, pooled=extra.get("pooled"), guidance=guidance)


class Subset:
    """Part of a map-style data source (the training part, or the held-out part)."""

    def __init__(self, source, indices: range):
        self.source, self.indices = source, indices
        for name in EMPTY_PROMPT:
            setattr(self, name, getattr(source, name, None))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> TrainingSample:
        return self.source[self.indices[i]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def is_map_style(source) -> bool:
    return hasattr(source, "__len__") and hasattr(source, "__getitem__")


# ------------------------------------------------------------------------------------------------ order
class SampleOrder:
    """Which samples each process trains on at micro-step k: a pure function of (seed, k, rank), so a resumed run
    continues exactly where it stopped. Each epoch is a seeded permutation; process r of W takes positions
    r, r+W, r+2W, ... so W processes with batch B see exactly what one process with batch W*B would.
    """

    def __init__(self, size: int, batch: int, rank: int, world_size: int, seed: int):
        self.size, self.batch, self.rank, self.world = size, batch, rank, world_size
        self.seed = seed
        self.global_batch = batch * world_size
        self.batches_per_epoch = size // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(f"{size} training images are fewer than one global batch ({batch} per process x "
                            f"{world_size} processes): lower train.batch_size or add data")
        self._perm: tuple[int, Optional[torch.Tensor]] = (-1, None)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.size, generator=gen))
        return self._perm[1]

    def draw(self, micro_step: int) -> list[tuple[int, int]]:
        """[(sample index, draw id)] for this process; the draw id (unique per epoch and position) seeds the
        sample's own noise, timestep and caption dropout, independent of the number of processes."""
        epoch, b = divmod(micro_step, self.batches_per_epoch)
        perm = self.permutation(epoch)
        start = b * self.global_batch
        positions = [start + j * self.world + self.rank for j in range(self.batch)]
        return [(int(perm[p]), epoch * self.size + p) for p in positions]

    def samples(self, source, micro_step: int) -> list[tuple[TrainingSample, int]]:
        """A source with ``sample_for_draw(index, draw_id, seed)`` (``groups.IdentitySource``) picks what varies
        per draw (another photo of the person) from the draw id, as ``step.draw`` does the noise."""
        pick = getattr(source, "sample_for_draw", None)
        return [(pick(index, draw_id, self.seed) if pick else source[index], draw_id)
                for index, draw_id in self.draw(micro_step)]


class StreamOrder:
    """A plain iterable, consumed in order: micro-step k takes the k-th run of ``batch x world`` items, this process
    every W-th of them (positions r, r+W, ...), so the draw ids (the position in the stream) match SampleOrder's
    guarantee that N processes train what one process with N x the batch would. When the iterable ends it is
    iterated again (an epoch); a resumed run skips the items already trained on."""

    batches_per_epoch = None

    def __init__(self, batch: int, rank: int, world_size: int):
        self.batch, self.rank, self.world = batch, rank, world_size
        self.global_batch = batch * world_size
        self._iterator, self._position = None, 0

    def _next(self, source):
        if self._iterator is None:
            self._iterator = iter(source)
        for attempt in range(2):
            try:
                item = next(self._iterator)
                self._position += 1
                return item
            except StopIteration:
                if attempt or self._position == 0:
                    raise DataError("the training data source yields no samples") from None
                self._iterator = iter(source)  # the next epoch
        raise DataError("the training data source ran out and yields nothing when iterated again")

    def samples(self, source, micro_step: int) -> list[tuple[TrainingSample, int]]:
        start = micro_step * self.global_batch
        if self._position > start:
            raise RuntimeError(f"stream order at item {self._position} cannot go back to micro-step {micro_step}")
        while self._position < start:  # a resumed run: skip what was trained on
            self._next(source)
        taken = [(self._next(source), start + j) for j in range(self.global_batch)]
        return [taken[j * self.world + self.rank] for j in range(self.batch)]


# ------------------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
