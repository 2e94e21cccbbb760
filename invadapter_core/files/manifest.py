"""JSONL manifests (one JSON object a line), read by the trainer's preprocessing and the evaluation CLI."""
from __future__ import annotations

import json
from pathlib import Path


def manifest_entries(manifest: Path):
    """(line number, parsed JSON or the JSONDecodeError) for each non-blank line of a JSONL manifest: the caller
    decides whether a bad line stops everything or only skips itself."""
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, e
