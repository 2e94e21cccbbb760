"""Model folders of the pack, registered through folder_paths (paths from extra_model_paths.yaml are kept)."""
import os

import folder_paths

ADAPTERS = "invadapter"
REFERENCES = "invadapter_references"


def register() -> None:
    for name in (ADAPTERS, REFERENCES):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)
        folder_paths.folder_names_and_paths[name][1].add(".safetensors")


def searched(name: str) -> str:
    return ", ".join(folder_paths.get_folder_paths(name))


register()
