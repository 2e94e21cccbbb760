"""The identity toy's small weights shipped in the repository (benchmarks/identity_toy_demo/), which `make demo`
runs from: the toy base (UNet + pose encoder, float16), the judges (identity and attribute classifiers, float16)
and the adapter trained by the pack's trainer (its weights file as the trainer wrote it). PROVENANCE.md beside them
names the command and seed that made them; ``benchmarks/identity_toy.py --closed-set --export-demo-weights DIR``
rewrites all four when the toy changes.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from invadapter_core.comfyui.host import REPO
from invadapter_core.files.safetensors_io import read_checked

from . import base as toy_base
from . import classifiers, store

FOLDER = REPO / "benchmarks" / "identity_toy_demo"
BASE, JUDGES = "toy_base.safetensors", "toy_judges.safetensors"
ADAPTER = "identity_toy_adapter.safetensors"  # a name no user's models/invadapter file is likely to have
PROVENANCE = "PROVENANCE.md"
MAX_BYTES = 4 * 2 ** 20  # the repository's limit for a shipped weights file
REGENERATE = "regenerate them: .venv/bin/python benchmarks/identity_toy.py --closed-set --export-demo-weights " \
             "benchmarks/identity_toy_demo (see its PROVENANCE.md)"


@dataclass
class Shipped:
    base: toy_base.ToyBase
    judges: classifiers.Judges
    adapter: Path  # the trained weights file, for InvAdapterLoader


def half(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}


def export(folder: Path, base: toy_base.ToyBase, judges: classifiers.Judges, adapter: Path, command: str,
           seed: int, details: dict) -> list[Path]:
    """Writes the three weights files and PROVENANCE.md into ``folder``; refuses a file over MAX_BYTES."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"identities": str(len(base.identities)), "command": command, "seed": str(seed)}
    store.save(folder / BASE, half(toy_base.to_tensors(base.model.model, base.encoder)), meta)
    store.save(folder / JUDGES, half(classifiers.to_tensors(judges)), meta)
    shutil.copyfile(adapter, folder / ADAPTER)
    paths = [folder / name for name in (BASE, JUDGES, ADAPTER)]
    for path in paths:
        if path.stat().st_size > MAX_BYTES:
            raise RuntimeError(f"{path} is {path.stat().st_size / 2 ** 20:.1f} MB, over the {MAX_BYTES / 2 ** 20:.0f} MB "
                               f"limit for weights in the repository: export a smaller toy")
    (folder / PROVENANCE).write_text(provenance(paths, command, seed, details))
    return paths


def provenance(paths: list[Path], command: str, seed: int, details: dict) -> str:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    rows = "\n".join(f"| `{p.name}` | {p.stat().st_size / 1024:.0f} KB | `{sha256(p)[:16]}` |" for p in paths)
    facts = "\n".join(f"- {k}: {v}" for k, v in details.items())
    return f"""# Provenance of the identity toy's demo weights

Made by this command, run from the repository root (at commit {commit}, {time.strftime('%Y-%m-%d')}; training seed
{seed}; the base, the classifiers and the reference pool come from the toy's cache or are trained first with the
command's settings, each with its own fixed seed: base 0, classifiers 0 and 10, pool seed + 2):

```sh
{command}
```

It runs the identity benchmark (`benchmarks/identity_toy.py`: a toy base pretrained on 16 synthetic cartoon
identities, the judges, then the pack's trainer trains the adapter) and writes these files (float16 for the base and
the judges; the adapter is the trainer's weights file as written). Run the same command again to regenerate them
whenever the toy changes. `make demo` (`scripts/identity_demo.py`) runs from them.

| file | size | sha256 |
|---|---|---|
{rows}

{facts}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_base(path: Path) -> tuple[toy_base.ToyBase, dict]:
    """A base file as ``export`` writes it, and what the benchmark records about it: its path, and a name for the
    caches derived from it (the reference pool) that changes whenever the file does."""
    if not path.is_file():
        raise FileNotFoundError(f"the identity toy's shipped base is missing: {path}; {REGENERATE}")
    tensors, meta = read_checked(str(path), "the identity toy's shipped base", RuntimeError, REGENERATE)
    identities = toy_base.identity_set(int(meta.get("identities", toy_base.IDENTITIES)))
    model, encoder = toy_base.from_tensors(tensors)
    base = toy_base.ToyBase(toy_base.patcher(model), encoder.eval(), toy_base.PixelUnshuffleVAE(), identities)
    info = {"path": str(path), "cached": True, "seconds": 0.0, "cache_name": f"shipped-{sha256(path)[:12]}",
            "command": meta.get("command", "")}
    return base, info


def load(folder: Path = FOLDER) -> Shipped:
    """The shipped toy; a missing or damaged file raises an error that says how to regenerate it."""
    base, _ = load_base(folder / BASE)
    identities = base.identities
    if not (folder / JUDGES).is_file():
        raise FileNotFoundError(f"the identity toy's shipped judges are missing: {folder / JUDGES}; {REGENERATE}")
    judge_tensors, _ = read_checked(str(folder / JUDGES), "the identity toy's shipped judges", RuntimeError,
                                    REGENERATE)
    adapter = folder / ADAPTER
    if not adapter.is_file():
        raise FileNotFoundError(f"the identity toy's shipped adapter is missing: {adapter}; {REGENERATE}")
    return Shipped(base, classifiers.from_tensors(judge_tensors, identities), adapter)
