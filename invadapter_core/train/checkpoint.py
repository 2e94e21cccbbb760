"""Checkpoints: everything a resumed run needs to continue exactly where the interrupted one stopped.

``<output_dir>/checkpoints/step-<N>/``:
    adapter.safetensors  the EAA weights in the loader's format (usable in ComfyUI as they are)
    trainer.pt           step, training seconds so far, adapter state_dict (float32), optimizer, grad scaler, config
    rng-r<rank>.pt       torch / numpy / python (/ CUDA) RNG states of every process
    COMPLETE             written last: a checkpoint without it was interrupted and is ignored
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..adapter.weights import save_adapter
from .data import rng_state, set_rng_state
from .distributed import DistInfo, barrier

log = logging.getLogger("InvAdapter.train")
MARKER = "COMPLETE"


def checkpoint_dir(output_dir: str, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(output_dir: str, step: int, adapter, optimizer, scaler, config: dict, info: DistInfo,
                    keep: int, elapsed_s: float = 0.0) -> Path:
    path = checkpoint_dir(output_dir, step)
    if info.is_main:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        save_adapter(adapter, str(path / "adapter.safetensors"))
        torch.save({"step": step, "elapsed_s": elapsed_s,
                    "adapter": {k: v.detach().cpu() for k, v in adapter.state_dict().items()},
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "config": config, "world_size": info.world_size}, path / "trainer.pt")
    barrier()  # the folder exists for every rank
    torch.save(rng_state(), path / f"rng-r{info.rank:03d}.pt")
    barrier()  # every rank's RNG file is written
    if info.is_main:
        (path / MARKER).write_text(str(step))
        _prune(Path(output_dir) / "checkpoints", keep)
    return path


def _prune(folder: Path, keep: int) -> None:
    done = sorted(p for p in folder.glob("step-*") if (p / MARKER).exists())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str) -> Optional[Path]:
    done = sorted(p for p in (Path(output_dir) / "checkpoints").glob("step-*") if (p / MARKER).exists())
    return done[-1] if done else None


def find_resume(resume: str, output_dir: str) -> Optional[Path]:
    if resume == "no":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint folder (no {MARKER} file)")
    return path


def load_checkpoint(path: Path, adapter, optimizer, scaler, info: DistInfo) -> tuple[int, float]:
    """Restores the state in place; returns the step to continue from and the training seconds before it."""
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    adapter.load_state_dict(state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = path / f"rng-r{info.rank:03d}.pt"
    if rng.exists() and state.get("world_size") == info.world_size:
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    else:  # the data order and noise do not depend on these (see SampleOrder); only other randomness would differ
        log.warning("resuming with %d processes from a %s-process checkpoint: global RNG states not restored",
                    info.world_size, state.get("world_size"))
    log.info("resumed from %s (step %d)", path, state["step"])
    return int(state["step"]), float(state.get("elapsed_s", 0.0))
