"""`train`: method.md §5 on preprocessed shards.

One micro-batch (per process):
1. per sample, from its own seeded generator (see ``data.SampleOrder``): a timestep t ~ U[min_t, max_t] -> sigma,
   noise eps, and whether its caption is dropped (replaced by the empty prompt, for CFG);
2. reference pass, no gradient: the reference latent at sigma read off the cached inversion trajectory
   (``ddim.latent_at``), the frozen UNet with the caption, every block's f_s / f_c captured;
3. generation pass with the EAA: x = x0 + sigma * eps of the same image, D = apply_model(x, sigma, caption');
4. loss = ||eps_hat - eps||^2 with eps_hat = (x - D) / sigma: the standard epsilon-prediction MSE (eq. 6) written
   through ComfyUI's x0 output (equivalently an x0 loss weighted by 1 / sigma^2).
AdamW on the EAA parameters only; gradient accumulation, clipping, autocast on CUDA, DDP under torchrun.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..ddim import latent_at
from ..weights import save_adapter
from . import distributed
from .checkpoint import find_resume, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, require
from .data import SampleOrder, ShardSet
from .model import GenerationPass, build_adapter, count_parameters, freeze, load_fully, resolve_precision
from .validate import Validator

log = logging.getLogger("InvAdapter.train")
PAPER_PARAMETERS = 48e6
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step run here, mean over all processes
    adapter: Optional[torch.nn.Module] = None
    weights: Optional[Path] = None  # the exported weights file (rank 0)
    parameters: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: Config, model, vae=None, clip=None, progress: bool = True):
        self.cfg, self.model, self.vae, self.progress = cfg, model, vae, progress
        self.out = Path(require(cfg.train.output_dir, "train.output_dir"))
        self.device = model.load_device
        self.info = distributed.setup(self.device)
        self.precision = resolve_precision(cfg.train.mixed_precision, self.device)
        freeze(model)
        load_fully(model)
        self.shards = ShardSet(require(cfg.data.cache_dir, "data.cache_dir"))
        self._check_layout()
        self.ms = model.get_model_object("model_sampling")
        t = cfg.train
        self.order = SampleOrder(len(self.shards), t.batch_size, self.info.rank, self.info.world_size, t.seed)
        adapter = build_adapter(model, cfg.data.resolution, cfg.model.tokens_m, cfg.model.init,
                                cfg.model.train_self, cfg.model.train_cross)
        self.parameters = count_parameters(adapter)
        self.adapter = adapter.to(self.device)
        self.generation = GenerationPass(self.adapter, model)
        self.net = distributed.wrap(self.generation, self.device, self.info)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.validator = Validator(cfg.validation, model, vae, self.shards, self.out / "samples",
                                   self._prompt_contexts(clip)) if self.info.is_main else None
        self.step = 0

    # ------------------------------------------------------------------------------------------ setup
    def _check_layout(self) -> None:
        layout = self.shards.layout
        if layout["resolution"] != self.cfg.data.resolution:
            raise ConfigError(f"the shards in {self.cfg.data.cache_dir} were preprocessed at {layout['resolution']} "
                              f"px, data.resolution is {self.cfg.data.resolution}")
        from ..unet import model_family

        if layout["family"] != model_family(self.model):
            raise ConfigError(f"the shards were made with a {layout['family']} model; this is "
                              f"{model_family(self.model)}")

    def _prompt_contexts(self, clip) -> Optional[list[torch.Tensor]]:
        prompts = self.cfg.validation.prompts
        if not prompts:
            return None
        if clip is None:
            raise ConfigError("validation.prompts needs the text encoder: pass clip (the CLI loads it)")
        from .preprocess import encode_caption

        return [encode_caption(clip, p)[0][None] for p in prompts]

    def autocast(self):
        if self.precision in ("bf16", "fp16"):
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------ one micro-batch
    def draw(self, draw_id: int, latent_shape) -> tuple[int, torch.Tensor, bool]:
        """This sample's timestep, noise and caption dropout: from its own generator, so they depend on neither
        the process count nor anything run before (exact resume, DDP == one process with the global batch)."""
        g = torch.Generator().manual_seed((self.cfg.train.seed * 0x9E3779B97F4A7C15 + draw_id) % (2 ** 63))
        t = int(torch.randint(self.cfg.train.min_timestep, self.cfg.train.max_timestep + 1, (1,), generator=g))
        eps = torch.randn(latent_shape, generator=g)
        drop = bool(torch.rand((), generator=g) < self.cfg.train.caption_dropout)
        return t, eps, drop

    def micro_batch(self, micro_step: int):
        xs_ref, x0s, epss, sigmas, captions, contexts = [], [], [], [], [], []
        for index, draw_id in self.order.draw(micro_step):
            sample = self.shards[index]
            t, eps, drop = self.draw(draw_id, sample.states.shape[1:])
            sigma = float(self.ms.sigma(torch.tensor(float(t))))
            xs_ref.append(latent_at(self.shards.sigmas, sample.states, sigma))
            x0s.append(sample.states[0])
            epss.append(eps)
            sigmas.append(sigma)
            captions.append(sample.context)
            contexts.append(self.shards.empty_context[0] if drop else sample.context)
        on = lambda xs: torch.stack(xs).to(self.device, torch.float32)  # noqa: E731
        return on(xs_ref), on(x0s), on(epss), torch.tensor(sigmas, device=self.device), on(captions), on(contexts)

    def loss(self, micro_step: int) -> torch.Tensor:
        x_ref, x0, eps, sigmas, caption, context = self.micro_batch(micro_step)
        with self.autocast():
            # the reference branch always sees the caption it was inverted with; only the generation's is dropped
            features = self.generation.reference_features(x_ref, sigmas, {"c_crossattn": caption})
            x = x0 + sigmas[:, None, None, None] * eps
            denoised = self.net(x, sigmas, context, features.self_attn, features.cross_attn)
        eps_hat = (x - denoised.float()) / sigmas[:, None, None, None]
        return F.mse_loss(eps_hat, eps)

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
            print(f"  {len(self.shards)} images, {info.world_size} process(es) on {self.device}, precision "
                  f"{self.precision}, global batch {t.batch_size * t.grad_accum * info.world_size}, "
                  f"{t.max_steps} steps", flush=True)

    def run(self) -> TrainResult:
        from tqdm import tqdm

        cfg, t, info = self.cfg, self.cfg.train, self.info
        self.announce()
        self.out.mkdir(parents=True, exist_ok=True)
        resume = find_resume(t.resume, str(self.out))
        if resume is not None:
            self.step = load_checkpoint(resume, self.adapter, self.optimizer, self.scaler, info)
        if info.is_main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        result = TrainResult(self.step, adapter=self.adapter, parameters=self.parameters)
        self._validate_if_due()
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", disable=not (self.progress and info.is_main),
                   dynamic_ncols=True)
        window, started, window_seconds = [], time.time(), 0.0  # throughput counts training steps only
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
                    self._log(bar, window, norm, window_seconds, time.time() - started)
                    window, window_seconds = [], 0.0
                if t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0 and self.step < t.max_steps:
                    self._checkpoint()
                self._validate_if_due()
        except KeyboardInterrupt:
            if not info.enabled:  # with several processes the others would wait forever in a collective
                log.warning("interrupted at step %d: saving a checkpoint to resume from", self.step)
                self._checkpoint()
            raise
        finally:
            bar.close()
        self._checkpoint()
        result.step = self.step
        if info.is_main:
            result.weights = self.out / "invadapter.safetensors"
            save_adapter(self.adapter, str(result.weights), EXPORT_DTYPES[t.export_dtype])
            print(f"weights: {result.weights}", flush=True)
        distributed.barrier()
        return result

    def _checkpoint(self) -> None:
        save_checkpoint(str(self.out), self.step, self.adapter, self.optimizer, self.scaler, self.cfg.to_dict(),
                        self.info, self.cfg.train.keep_checkpoints)

    def _validate_if_due(self) -> None:
        if self.validator is not None and self.validator.due(self.step, self.cfg.train.max_steps):
            self.validator.run(self.adapter, self.step)
        distributed.barrier()

    def _log(self, bar, window: list[float], norm: float, seconds: float, elapsed: float) -> None:
        if not self.info.is_main:
            return
        t = self.cfg.train
        images = len(window) * t.batch_size * t.grad_accum * self.info.world_size
        entry = {"step": self.step, "loss": sum(window) / len(window), "lr": self.lr_at(self.step - 1),
                 "grad_norm": norm, "images_per_s": images / max(seconds, 1e-9),
                 "s_per_step": seconds / len(window), "elapsed_s": round(elapsed, 2),
                 "epoch": self.step * t.grad_accum / self.order.batches_per_epoch}
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        bar.write(f"step {entry['step']}: loss {entry['loss']:.4f}, grad norm {norm:.3g}, "
                  f"{entry['images_per_s']:.2f} images/s, {entry['s_per_step']:.2f} s/step")


def train(cfg: Config, model, vae=None, clip=None, progress: bool = True) -> TrainResult:
    """Trains on ``cfg.data.cache_dir``; under torchrun every process calls this with its own model copy."""
    if cfg.train.export_dtype not in EXPORT_DTYPES:
        raise ConfigError(f"train.export_dtype must be one of {list(EXPORT_DTYPES)}")
    if cfg.train.grad_accum < 1 or cfg.train.batch_size < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be at least 1")
    return Trainer(cfg, model, vae, clip, progress).run()
