"""Writing and reading the pack's safetensors files: atomic writes, and reads that say what was wrong."""
from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def save_atomic(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """A crash mid-write never leaves a truncated file under the real name. The file gets the permissions of any
    file the process creates (0o666 less the umask, as ComfyUI's own outputs), not the writer's owner-only ones."""
    tmp = path + ".partial"
    save_file(tensors, tmp, metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_checked(path: str, what: str, error: type[Exception], fix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of ``path``; a missing, empty, truncated or non-safetensors file raises ``error`` naming
    ``what`` it should have been and ``fix``."""
    if not os.path.isfile(path):
        raise error(f"{what} not found: {path}")
    if os.path.getsize(path) == 0:
        raise error(f"{what} {path} is empty (0 bytes): {fix}")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise error(f"{what} {path} is truncated or not a safetensors file ({e}): {fix}") from None
