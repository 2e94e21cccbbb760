"""The command-line tools under torchrun (the trainer, the evaluation): one code path for one process and many.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them this is a single process and
no process group is created. Each process's GPU (LOCAL_RANK) is selected by ``host.setup_comfy`` before ComfyUI picks
its device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank and world size from the environment (torchrun's variables), without starting anything."""
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device | None = None, backend: str | None = None,
          timeout: timedelta | None = None) -> DistInfo:
    """The process group under torchrun: ``backend`` gloo or nccl, by default nccl on CUDA, else gloo; ``timeout``
    how long a collective waits for the other processes (None: torch's default)."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        backend = backend or ("nccl" if device is not None and device.type == "cuda" else "gloo")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size, **kwargs)
    return info


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(value) -> list:
    """Every process's ``value`` (any picklable object), in rank order, on every process; [value] alone."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
