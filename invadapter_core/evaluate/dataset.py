"""Identities x prompts: a folder (one sub-folder of photos per identity) or a JSONL manifest (one identity a line).

Folder::

    DATA/prompts.txt               one prompt a line, for every identity (or --prompt / --prompts)
    DATA/<identity>/*.jpg|png|...  photos of the person: the first by name is the reference, the others measure
                                   the copy-paste indicator
    DATA/<identity>/prompts.txt    optional: this identity's own prompts
    DATA/<identity>/caption.txt    optional: the reference photo's caption (default --caption)

Manifest line: ``{"identity": "ada", "photos": ["ada/1.jpg", "ada/2.jpg"], "prompts": ["..."], "caption": "..."}``
(paths relative to the manifest; ``prompts`` and ``caption`` optional as above).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..manifest import IMAGE_EXTENSIONS, manifest_entries

PROMPTS_FILE = "prompts.txt"
CAPTION_FILE = "caption.txt"


class DatasetError(ValueError):
    """A data set that cannot be evaluated (the message says which file and what to fix)."""


@dataclass
class Identity:
    name: str
    photos: list[str]      # photos[0] is the reference
    prompts: list[str]
    caption: str

    @property
    def reference(self) -> str:
        return self.photos[0]

    @property
    def other_photos(self) -> list[str]:
        return self.photos[1:]


def read_prompts(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def slug(text: str) -> str:
    """A file-system-safe name (letters, digits, . _ - kept)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def load_identities(source: str, prompts: list[str] | None = None, caption: str = "a photo of a face"
                    ) -> list[Identity]:
    """``prompts`` (from the command line) replace any prompts in the data."""
    path = Path(source)
    if path.is_dir():
        identities = _from_folder(path, caption)
    elif path.is_file() and path.suffix in (".jsonl", ".json"):
        identities = _from_manifest(path, caption)
    else:
        raise DatasetError(f"{source} is neither a folder (one sub-folder of photos per identity) nor a .jsonl "
                           f"manifest")
    for identity in identities:
        if prompts:
            identity.prompts = list(prompts)
        if not identity.prompts:
            raise DatasetError(f"identity '{identity.name}' has no prompts: put them in {path / PROMPTS_FILE} "
                               f"(one a line), in its own {PROMPTS_FILE}, or pass --prompt / --prompts")
    names = [i.name for i in identities]
    if len(set(names)) != len(names):
        raise DatasetError(f"identity names repeat in {source}: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return identities


def _photos(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def _from_folder(folder: Path, caption: str) -> list[Identity]:
    shared = read_prompts(folder / PROMPTS_FILE) if (folder / PROMPTS_FILE).is_file() else []
    identities = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        photos = _photos(sub)
        if not photos:
            continue
        own = read_prompts(sub / PROMPTS_FILE) if (sub / PROMPTS_FILE).is_file() else shared
        cap = (sub / CAPTION_FILE).read_text(encoding="utf-8").strip() if (sub / CAPTION_FILE).is_file() else caption
        identities.append(Identity(sub.name, photos, own, cap or caption))
    if not identities:
        raise DatasetError(f"no identity found in {folder}: expected one sub-folder of photos "
                           f"({', '.join(IMAGE_EXTENSIONS)}) per person")
    return identities


def _from_manifest(manifest: Path, caption: str) -> list[Identity]:
    identities = []
    for number, entry in manifest_entries(manifest):
        where = f"{manifest} line {number}"
        if isinstance(entry, json.JSONDecodeError):
            raise DatasetError(f"{where} is not JSON ({entry})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("photos"), list) or not entry["photos"]:
            raise DatasetError(f'{where}: expected {{"identity": "...", "photos": ["a.jpg", ...], "prompts": '
                               f'[...]}} with at least one photo')
        photos = [str(manifest.parent / p) for p in entry["photos"]]
        missing = [p for p in photos if not Path(p).is_file()]
        if missing:
            raise DatasetError(f"{where}: photo(s) not found: {', '.join(missing)}")
        prompts = entry.get("prompts") or []
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise DatasetError(f'{where}: "prompts" must be a list of strings')
        name = str(entry.get("identity") or Path(photos[0]).stem)
        identities.append(Identity(name, photos, [p.strip() for p in prompts if p.strip()],
                                   str(entry.get("caption") or caption)))
    if not identities:
        raise DatasetError(f"the manifest {manifest} lists no identity")
    return identities
