"""One code path for CPU, one GPU and torchrun (many GPUs, many nodes).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them this is a single process and
no process group is created. gloo on CPU, nccl on CUDA. The process group itself is ``comfyui.torchrun``'s (the
evaluation uses it too); this module adds what training needs on top.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..comfyui.torchrun import DistInfo, barrier, cleanup, env_info, setup  # noqa: F401  (the trainer's names)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all processes (for logging: every rank's loss counts)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def wrap(module: torch.nn.Module, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """DDP around the module holding only the trainable EAA parameters (the frozen UNet is not a submodule)."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids: Optional[list] = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
