"""Real labelled face photos for the identity tests, fetched at test time (never committed).

The ``face_recognition`` 1.3.0 source distribution on PyPI carries test photos of two people
(``tests/test_images/``: obama.jpg, obama2.jpg, obama3.jpg of one man, biden.jpg of another). They are official
White House photographs whose embedded rights notice forbids reproducing them without permission, so the repo never
ships them: ``pip download`` fetches the sdist (sha256-checked) into ``~/.cache/invadapter-comfyui/`` and the four
photos are extracted beside it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "face_recognition-1.3.0.tar.gz"
SDIST_SHA256 = "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec"
PHOTOS = {"obama": "obama.jpg", "obama2": "obama2.jpg", "obama3": "obama3.jpg", "biden": "biden.jpg"}
SAME_PERSON = ["obama", "obama2", "obama3"]
OTHER_PERSON = "biden"


def cache_dir() -> Path:
    return Path(os.environ.get("INVADAPTER_CACHE") or "~/.cache/invadapter-comfyui").expanduser()


def labelled_photos() -> dict[str, Path]:
    """name -> path of the four photos (downloaded and extracted once)."""
    folder = cache_dir() / "face-recognition-1.3.0-photos"
    paths = {name: folder / file for name, file in PHOTOS.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    dl = cache_dir() / "dl"
    sdist = dl / SDIST
    if not sdist.is_file():
        dl.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:all:",
                              "face-recognition==1.3.0", "-d", str(dl)], capture_output=True, text=True, timeout=300)
        if out.returncode != 0 or not sdist.is_file():
            raise RuntimeError(f"could not download the face_recognition 1.3.0 sdist (its test photos are the "
                               f"labelled faces these tests need): {out.stderr[-2000:]}")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}: delete it and rerun")
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for name, file in PHOTOS.items():
            member = tar.extractfile(f"face_recognition-1.3.0/tests/test_images/{file}")
            tmp = paths[name].with_suffix(".tmp")
            tmp.write_bytes(member.read())
            os.replace(tmp, paths[name])
    return paths


def load(path: Path):
    """IMAGE [1, H, W, 3] float."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]
