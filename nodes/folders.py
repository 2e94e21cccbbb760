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


def file_fingerprint(folder: str, name: str):
    """What ComfyUI's cache compares for a loader (V3 ``fingerprint_inputs``): a file replaced under the same name
    changes it, so the next prompt reads the new file. The resolved path (a file of that name may appear in an
    earlier folder), size, modification time and inode/ctime (an atomic replace or a copy that keeps the old mtime
    still changes these); no hash: a reference file can be gigabytes."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        return None  # execute() says the file is missing
    try:
        st = os.stat(path)
    except OSError:
        return path
    return path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
