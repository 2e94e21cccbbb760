"""`train`: the training run (docs/method.md §5) on a data source (the preprocessed shards, or any
iterable of ``TrainingSample``s). What one micro-batch computes (timesteps, references, the two passes, the loss
terms) is ``step``'s; this module drives the run around it:
AdamW on the EAA parameters only; gradient accumulation, clipping, autocast on CUDA, DDP under torchrun.
The base model is any ComfyUI ModelPatcher of a family the pack serves (the CLI loads a checkpoint; a caller can
pass its own model object); the data source is the shards of ``data.cache_dir`` unless ``train`` is given one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..arch.layout import layout_of, model_family
from ..adapter.weights import save_adapter
from . import distributed, step
from .checkpoint import find_resume, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, require
from .data import SampleOrder, ShardSet, StreamOrder, Subset, TrainingSample, is_map_style
from .groups import auto_references, check_grouping, identity_split
from .model import (attach_identity_token, build_adapter, count_parameters, freeze, generation_pass, is_joint,
                    load_fully, resolve_precision)
from .validate import Validator

log = logging.getLogger("InvAdapter.train")
PAPER_PARAMETERS = 48e6
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HOLDOUT_AUTO = 32  # validation.holdout = -1: this many images (at most a tenth of the shards) are held out


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step run here, mean over all processes
    adapter: Optional[torch.nn.Module] = None
    weights: Optional[Path] = None  # the exported weights file (rank 0)
    parameters: dict = field(default_factory=dict)
    heldout: list[dict] = field(default_factory=list)  # {step, loss[, loss_no_adapter]} per validation (rank 0)
    dropped_captions: int = 0  # training samples (this process) whose generation pass saw the empty prompt


class Interrupted(Exception):
    """Ctrl-C during training; ``resume_step`` is where the same command continues (None: from the start)."""

    def __init__(self, step: int, resume_step: Optional[int]):
        super().__init__(f"interrupted at step {step}")
        self.step, self.resume_step = step, resume_step


class Trainer:
    def __init__(self, cfg: Config, model, vae=None, clip=None, progress: bool = True, data=None, holdout=None,
                 recognizer=None, text_path=None):
        """``recognizer``: the identity loss's (``step.identity_loss``): a clean latent in sampler space ->
        embedding [B, E], differentiable; the identity loss is on when one is given and loss.identity is not 0
        (the command line builds it from loss.recognizer: ``train.identity.build_recognizer``). ``text_path``: how
        the identity token enters the prompt (``adapter.identity_token.TextPath``); needed when
        model.identity_tokens is not 0."""
        # the settings as this run resolves them (auto values made concrete; config.json records them): a copy,
        # so the caller's config is never changed
        cfg = copy.deepcopy(cfg)
        self.cfg, self.model, self.vae, self.progress = cfg, model, vae, progress
        self.choices: list[str] = []  # what the "on when possible" defaults chose, and why (announced)
        if cfg.loss.identity != 0 and recognizer is None:
            self.choices.append(f"identity loss off: no recognizer (set loss.recognizer to an InsightFace ArcFace "
                                f".onnx to turn it on at weight {cfg.loss.identity:g}; docs/training.md)")
            cfg.loss.identity = 0.0
        elif cfg.loss.identity != 0:
            self.choices.append(f"identity loss on, weight {cfg.loss.identity:g}")
        self.recognizer = recognizer
        self.out = Path(require(cfg.train.output_dir, "train.output_dir"))
        self.device = model.load_device
        self.info = distributed.setup(self.device)
        self.precision = resolve_precision(cfg.train.mixed_precision, self.device)
        if getattr(model.model, "concat_keys", ()):
            raise ConfigError(f"this {model_family(model)} checkpoint is an inpainting model: train the EAA on its "
                              f"base (non-inpainting) checkpoint; the weights then work with both")
        freeze(model)
        load_fully(model)
        t = cfg.train
        self.data, self.holdout = self._sources(data, holdout)
        self.empty_context = getattr(self.data, "empty_context", None)
        self.empty_adm = getattr(self.data, "empty_adm", None)
        if t.caption_dropout > 0 and self.empty_context is None:
            raise ConfigError("train.caption_dropout needs the empty prompt: give the data source an `empty_context` "
                              "attribute, or set train.caption_dropout = 0")
        self.ms = model.get_model_object("model_sampling")
        self.order = (SampleOrder(len(self.data), t.batch_size, self.info.rank, self.info.world_size, t.seed)
                      if is_map_style(self.data) else StreamOrder(t.batch_size, self.info.rank, self.info.world_size))
        self._warn_if_tokens_not_aggregated()
        adapter = build_adapter(model, cfg.data.resolution, cfg.model.tokens_m, cfg.model.init,
                                cfg.model.train_self, cfg.model.train_cross)
        if cfg.model.identity_tokens:
            try:
                attach_identity_token(adapter, model, cfg.model.identity_tokens, text_path)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.parameters = count_parameters(adapter)
        self.adapter = adapter.to(self.device)
        self.generation = generation_pass(self.adapter, model)
        self.generation.text_path = text_path
        self.net = distributed.wrap(self.generation, self.device, self.info)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.validator = None
        self.board = None
        if self.info.is_main:
            shown = self.holdout if self.holdout else self.data
            if vae is not None and is_joint(layout_of(model)):
                log.info("validation images are not drawn for %s models yet: the held-out loss only",
                         model_family(model))
                vae = None
            self.validator = Validator(cfg.validation, model, vae, shown, cfg.data.resolution, self.empty_context,
                                       self.out / "samples", self._prompt_contexts(clip))
            self.board = tensorboard_writer(self.out / "tensorboard") if t.tensorboard else None
        self.step = 0
        self.elapsed_before = 0.0  # seconds trained before a resume (elapsed_s goes on from there)
        self.dropped = 0
        self.loss_weights = {k: v for k, v in dataclasses.asdict(cfg.loss).items() if k in step.LOSS_TERMS}

    # ------------------------------------------------------------------------------------------ setup
    def _sources(self, data, holdout):
        """(training source, held-out samples or None): the given ones, or the shards with their last images held
        out (``validation.holdout``)."""
        if data is not None:
            self._choose_references(1, "a Python data source (set train.references for its more_references)")
            return data, (list(holdout) if holdout is not None else None)
        shards = ShardSet(require(self.cfg.data.cache_dir, "data.cache_dir"))
        self._check_layout(shards)
        self._choose_references(*auto_references(shards, self.cfg))
        n, wanted = len(shards), self.cfg.validation.holdout
        k = min(HOLDOUT_AUTO, n // 10) if wanted < 0 else wanted
        check_grouping(shards, self.cfg)
        if shards.grouped:  # photos grouped by person: references from the person's photos, whole people held out
            return identity_split(shards, self.cfg, k, self.cfg.train.batch_size * self.info.world_size,
                                  self.info.is_main)
        if k and n - k < self.cfg.train.batch_size * self.info.world_size:
            raise ConfigError(f"validation.holdout = {k} leaves {n - k} of {n} images to train on, fewer than one "
                              f"global batch: lower validation.holdout or add data")
        if not k:
            return shards, None
        return Subset(shards, range(n - k)), list(Subset(shards, range(n - k, n)))

    def _choose_references(self, k: int, why: str) -> None:
        """train.references = 0 (auto): K = ``k`` (``why``), or the K of the run this one resumes."""
        t = self.cfg.train
        if t.references != 0:
            return
        resumed = self._resumed_references()
        if resumed:  # auto never changes K in the middle of a run
            k, why = resumed, "as in the run it resumes"
        t.references = k
        self.choices.append(f"train.references = auto: {k} ({why})")

    def _resumed_references(self) -> int:
        """The K the run this one resumes trained with (its config.json, written with the resolved values); 0: no
        resume, or no record of it."""
        try:
            checkpoint = find_resume(self.cfg.train.resume, str(self.out))
        except FileNotFoundError:  # run() says so, with the fix
            return 0
        record = checkpoint.parent.parent / "config.json" if checkpoint is not None else None
        if record is None or not record.is_file():
            return 0
        return int(json.loads(record.read_text()).get("train", {}).get("references", 0))

    def _check_layout(self, shards: ShardSet) -> None:
        layout = shards.layout
        if layout["resolution"] != self.cfg.data.resolution:
            raise ConfigError(f"the shards in {self.cfg.data.cache_dir} were preprocessed at {layout['resolution']} "
                              f"px, data.resolution is {self.cfg.data.resolution}")
        if layout["family"] != model_family(self.model):
            raise ConfigError(f"the shards were made with a {layout['family']} model; this is "
                              f"{model_family(self.model)}")

    def _warn_if_tokens_not_aggregated(self) -> None:
        m = self.cfg.model.tokens_m
        if not self.cfg.model.train_cross or not self.info.is_main:
            return
        tokens = layout_of(self.model).tokens(self.cfg.data.resolution)
        small = sorted({n for n in tokens.values() if n <= m})
        if small:
            log.warning("model.tokens_m = %d is not below the reference's %s tokens in %d of %d blocks at "
                        "data.resolution %d px: token aggregation there keeps or expands the tokens instead of "
                        "aggregating them (the paper aggregates 4096 -> 256 at 512 px); lower model.tokens_m or "
                        "raise data.resolution", m, "/".join(map(str, small)),
                        sum(n <= m for n in tokens.values()), len(tokens), self.cfg.data.resolution)

    def _prompt_contexts(self, clip) -> Optional[list[tuple[torch.Tensor, dict]]]:
        prompts = self.cfg.validation.prompts
        if not prompts:
            return None
        if clip is None:
            raise ConfigError("validation.prompts needs the text encoder: pass clip (the CLI loads it)")
        from .preprocess import encode_caption, has_adm
        from .validate import prompt_options

        encoded = [encode_caption(clip, p) for p in prompts]
        return [(context[None], prompt_options(pooled if has_adm(self.model) else None))
                for context, pooled, _ in encoded]

    def autocast(self):
        if self.precision in ("bf16", "fp16"):
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------ one micro-batch
    def batch(self, samples: list[tuple[TrainingSample, int]], seed: int, dropout: float) -> step.Batch:
        t = self.cfg.train
        made = step.make_batch(samples, seed, dropout, self.ms, (t.min_timestep, t.max_timestep),
                               self.empty_context, self.empty_adm, self.device, t.references, t.reference_combine,
                               self.recognizer if self.loss_weights.get("identity") else None,
                               identity=bool(self.cfg.model.identity_tokens))
        self.dropped += made.dropped
        return made

    def loss_of(self, batch: step.Batch, net, adapter: bool = True) -> torch.Tensor:
        with self.autocast():
            pred = step.predict(batch, self.generation, net, adapter)
        return step.total_loss(batch, pred, self.loss_weights)

    def loss(self, micro_step: int) -> torch.Tensor:
        t = self.cfg.train
        return self.loss_of(self.batch(self.order.samples(self.data, micro_step), t.seed, t.caption_dropout),
                            self.net)

    @torch.no_grad()
    def heldout_loss(self, adapter: bool = True, samples: Optional[list[TrainingSample]] = None) -> float:
        """The loss on the held-out samples (or on ``samples``), sample i with the same timestep and noise at every
        validation (drawn from ``validation.seed``), no caption dropout; ``adapter=False``: the base model alone."""
        samples = self.holdout if samples is None else samples
        size, total = self.cfg.train.batch_size, 0.0
        for start in range(0, len(samples), size):
            chunk = [(s, start + j) for j, s in enumerate(samples[start:start + size])]
            batch = self.batch(chunk, self.cfg.validation.seed, 0.0)
            total += float(self.loss_of(batch, self.generation, adapter)) * len(chunk)
        return total / len(samples)

    # ------------------------------------------------------------------------------------------ one step
    def lr_at(self, step: int) -> float:
        warmup = self.cfg.optim.warmup_steps
        return self.cfg.optim.lr * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)

    def train_step(self) -> tuple[float, float]:
        accum = self.cfg.train.grad_accum
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        total = torch.zeros((), device=self.device)
        for a in range(accum):
            sync = a == accum - 1 or not self.info.enabled
            with (contextlib.nullcontext() if sync else self.net.no_sync()):
                loss = self.loss(self.step * accum + a) / accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), clip if clip > 0 else math.inf)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the step itself when the fp16 gradients overflowed
            self.scaler.update()
        elif torch.isfinite(norm):
            self.optimizer.step()
        else:
            log.warning("step %d: non-finite gradient norm, update skipped", self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(distributed.mean_over_ranks(total)), float(norm)

    # ------------------------------------------------------------------------------------------ the run
    def announce(self) -> None:
        p, t, info = self.parameters, self.cfg.train, self.info
        if info.is_main:
            print(f"Inv-Adapter training: {p['total']:,} EAA parameters (self W'k/W'v {p['self_kv']:,}, cross "
                  f"W''k/W''v {p['cross_kv']:,}, token aggregation W_agg {p['token_agg']:,}; paper: about "
                  f"{PAPER_PARAMETERS / 1e6:.0f}M); base model frozen", flush=True)
            size = f"{len(self.data)} images" if is_map_style(self.data) else "a streamed data source"
            held = f", {len(self.holdout)} held out" if self.holdout else ""
            print(f"  {size}{held}, {info.world_size} process(es) on {self.device}, precision {self.precision}, "
                  f"global batch {t.batch_size * t.grad_accum * info.world_size}, {t.max_steps} steps", flush=True)
            for choice in self.choices:
                print(f"  {choice}", flush=True)

    def run(self) -> TrainResult:
        from tqdm import tqdm

        cfg, t, info = self.cfg, self.cfg.train, self.info
        self.announce()
        self.out.mkdir(parents=True, exist_ok=True)
        resume = find_resume(t.resume, str(self.out))
        if resume is not None:
            self.step, self.elapsed_before = load_checkpoint(resume, self.adapter, self.optimizer, self.scaler, info)
        if info.is_main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        result = TrainResult(self.step, adapter=self.adapter, parameters=self.parameters)
        self.result = result
        if resume is None:
            self._validate_if_due()
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", disable=not (self.progress and info.is_main),
                   dynamic_ncols=True)
        window, window_seconds = [], 0.0  # throughput counts training steps only
        self.started = time.time()
        try:
            while self.step < t.max_steps:
                step_start = time.time()
                loss, norm = self.train_step()
                window_seconds += time.time() - step_start
                result.losses.append(loss)
                window.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self._log(bar, window, norm, window_seconds)
                    window, window_seconds = [], 0.0
                if t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0 and self.step < t.max_steps:
                    self._checkpoint()
                self._validate_if_due()
        except KeyboardInterrupt:
            if not info.enabled:  # with several processes the others would wait forever in a collective
                log.info("interrupted at step %d: saving a checkpoint to resume from", self.step)
                self._checkpoint()
                raise Interrupted(self.step, self.step) from None
            last = latest_checkpoint(str(self.out))
            raise Interrupted(self.step, int(last.name.split("-")[1]) if last else None) from None
        finally:
            bar.close()
        self._checkpoint()
        result.step = self.step
        result.dropped_captions = self.dropped
        if info.is_main:
            result.weights = self.out / "invadapter.safetensors"
            save_adapter(self.adapter, str(result.weights), EXPORT_DTYPES[t.export_dtype])
            print(f"weights: {result.weights}", flush=True)
            if self.board is not None:
                self.board.close()
        distributed.barrier()
        return result

    def elapsed(self) -> float:
        """Training seconds including those before a resume."""
        return self.elapsed_before + time.time() - self.started

    def _checkpoint(self) -> None:
        save_checkpoint(str(self.out), self.step, self.adapter, self.optimizer, self.scaler, self.cfg.to_dict(),
                        self.info, self.cfg.train.keep_checkpoints, self.elapsed() if self.step else 0.0)

    def _validate_if_due(self) -> None:
        if self.validator is not None and self.validator.due(self.step, self.cfg.train.max_steps):
            if self.holdout:
                self._validate_loss()
            self.validator.run(self.adapter, self.step)
        distributed.barrier()

    def _validate_loss(self) -> None:
        started = time.time()
        entry = {"step": self.step, "heldout_loss": self.heldout_loss()}
        if self.step == 0 or not self.result.heldout:
            entry["heldout_loss_no_adapter"] = self.heldout_loss(adapter=False)
        self.result.heldout.append(entry)
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        plain = entry.get("heldout_loss_no_adapter")
        print(f"validation at step {self.step}: held-out loss {entry['heldout_loss']:.4f} on {len(self.holdout)} "
              f"samples" + (f" (base model alone: {plain:.4f})" if plain is not None else "") +
              f", {time.time() - started:.1f} s", flush=True)
        if self.board is not None:
            for key in ("heldout_loss", "heldout_loss_no_adapter"):
                if key in entry:
                    self.board.add_scalar(f"validation/{key}", entry[key], self.step)

    def _log(self, bar, window: list[float], norm: float, seconds: float) -> None:
        if not self.info.is_main:
            return
        t = self.cfg.train
        images = len(window) * t.batch_size * t.grad_accum * self.info.world_size
        per_epoch = self.order.batches_per_epoch
        entry = {"step": self.step, "loss": sum(window) / len(window), "lr": self.lr_at(self.step - 1),
                 "grad_norm": norm, "images_per_s": images / max(seconds, 1e-9),
                 "s_per_step": seconds / len(window), "elapsed_s": round(self.elapsed(), 2),
                 "epoch": self.step * t.grad_accum / per_epoch if per_epoch else None}
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        bar.write(f"step {entry['step']}: loss {entry['loss']:.4f}, grad norm {norm:.3g}, "
                  f"{entry['images_per_s']:.2f} images/s, {entry['s_per_step']:.2f} s/step")
        if self.board is not None:
            for key in ("loss", "lr", "grad_norm", "images_per_s"):
                self.board.add_scalar(f"train/{key}", entry[key], self.step)


def tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter when the optional ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("TensorBoard logging off: `pip install tensorboard` to get it (train.tensorboard)")
        return None
    return SummaryWriter(str(folder))


def train(cfg: Config, model, vae=None, clip=None, progress: bool = True, data=None, holdout=None,
          recognizer=None, text_path=None) -> TrainResult:
    """Trains the EAA of ``model`` (a ComfyUI ModelPatcher) on ``data`` (an iterable of ``TrainingSample``s; by
    default the shards of ``cfg.data.cache_dir``), with ``holdout`` samples for the held-out loss (by default the
    last ``validation.holdout`` shard images); ``recognizer``: the identity loss's, ``text_path``: the identity
    token's (``Trainer``). Under torchrun
    every process calls this with its own model copy."""
    if cfg.train.export_dtype not in EXPORT_DTYPES:
        raise ConfigError(f"train.export_dtype must be one of {list(EXPORT_DTYPES)}")
    if cfg.train.grad_accum < 1 or cfg.train.batch_size < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be at least 1")
    return Trainer(cfg, model, vae, clip, progress, data, holdout, recognizer, text_path).run()
