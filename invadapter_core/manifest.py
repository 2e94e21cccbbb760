"""Data-set files shared by the trainer and the evaluation: the image file types they read and JSONL manifests."""
from __future__ import annotations

import json
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def manifest_entries(manifest: Path):
    """(line number, parsed JSON or the JSONDecodeError) for each non-blank line of a JSONL manifest: the caller
    decides whether a bad line stops everything or only skips itself."""
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, e
