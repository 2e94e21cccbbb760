"""The example workflows' input images, copied into ComfyUI's input folder when the pack loads.

LoadImage only offers files from that folder, so this is what lets every shipped workflow run after the user picks a
checkpoint. The names carry the pack's prefix, and an existing file is never replaced (a user may have put their own
photo there under that name).
"""
from __future__ import annotations

import logging
import os
import shutil

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# name in the input folder -> file in assets/ (see assets/README.md for where each comes from)
EXAMPLE_INPUTS = {"invadapter_example_face.png": "face.png", "invadapter_example_face_2.png": "face2.png",
                  "invadapter_example_pose.png": "pose.png"}


def install_example_inputs(input_dir: str | None = None) -> list[str]:
    """Copy the missing example images into ``input_dir`` (default: ComfyUI's input folder); returns what was
    copied. A read-only folder only costs a warning: the user can upload the images from assets/ instead."""
    if input_dir is None:
        import folder_paths

        input_dir = folder_paths.get_input_directory()
    copied = []
    try:
        os.makedirs(input_dir, exist_ok=True)
        for name, asset in EXAMPLE_INPUTS.items():
            target = os.path.join(input_dir, name)
            if not os.path.exists(target):
                shutil.copyfile(os.path.join(ASSETS, asset), target)
                copied.append(target)
    except OSError as error:
        logging.warning("[InvAdapter] could not copy the example images into %s (%s): upload %s from %s to run the "
                        "example workflows", input_dir, error, ", ".join(EXAMPLE_INPUTS.values()), ASSETS)
    return copied
