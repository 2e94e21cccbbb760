import os
import re
import unicodedata

from comfy_api.latest import io

import folder_paths
from invadapter_core.reference.reference import load_reference, save_reference

from . import folders
from .types import CATEGORY, ReferenceType


SAVED_UI_KEY = "invadapter_saved_reference"  # in Save Reference's UI output: the file it wrote
MAX_NAME_BYTES = 200  # file systems allow 255 bytes per name; room for ".safetensors" and ".partial"


def reference_file_name(name: str) -> str:
    """A save name as a file name: any language's letters kept (NFC-normalised, so "Émilie" is one name however it
    was typed), only what no file system accepts replaced, length checked."""
    stem = unicodedata.normalize("NFC", name).strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[:-len(".safetensors")]
    stem = re.sub(r'[\x00-\x1f\x7f<>:"/\\|?*]+', "_", stem).strip(" ._")
    if not stem:
        raise ValueError(f"{name!r} is not usable as a file name: give the identity a name with letters or digits")
    size = len(stem.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise ValueError(f"the name is {size} bytes long in UTF-8; file systems take {MAX_NAME_BYTES} here: shorten "
                         f"it (to about {MAX_NAME_BYTES // max(1, size // max(1, len(stem)))} characters)")
    return stem + ".safetensors"


class InvAdapterSaveReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterSaveReference",
            display_name="Inv-Adapter Save Reference",
            category=CATEGORY,
            search_aliases=["save identity", "save reference", "save face", "identity", "reference",
                            "inv-adapter"],
            description="Saves an encoded identity (trajectory, caption, features) to models/invadapter_references "
                        "so later graphs can use it without inverting again.",
            inputs=[
                ReferenceType.Input("reference", tooltip="The identity to save (from Encode Reference)."),
                io.String.Input("name", default="identity",
                                tooltip="File name in models/invadapter_references (.safetensors is added)."),
                io.Boolean.Input("with_features", default=True,
                                 tooltip="Store the captured features too (bigger file, no recomputation)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of the same name (otherwise the node stops with an error)."),
            ],
            outputs=[ReferenceType.Output(display_name="reference", tooltip="The same reference, passed through."),
                     io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, reference, name, with_features, overwrite) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths(folders.REFERENCES)[0]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, reference_file_name(name))
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists: choose another name or enable overwrite")
        save_reference(reference, path, with_features=with_features)
        # SAVED_UI_KEY tells the web extension to refresh the reference lists (web/js/invadapter.js)
        return io.NodeOutput(reference, path, ui={"text": [path], SAVED_UI_KEY: [os.path.basename(path)]})


class InvAdapterLoadReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterLoadReference",
            display_name="Inv-Adapter Load Reference",
            category=CATEGORY,
            search_aliases=["load identity", "load reference", "load face", "identity", "reference",
                            "inv-adapter"],
            description="Loads an identity saved by Inv-Adapter Save Reference from models/invadapter_references: "
                        "no face photo and no inversion needed. Use the same model family it was encoded with.",
            inputs=[io.Combo.Input("reference_name", options=folder_paths.get_filename_list(folders.REFERENCES),
                                   tooltip="A file in models/invadapter_references (written by Save Reference).")],
            outputs=[ReferenceType.Output(display_name="reference",
                                          tooltip="The identity: connect to Inv-Adapter Apply.")],
        )

    @classmethod
    def validate_inputs(cls, reference_name) -> bool | str:
        # replaces ComfyUI's "Value not in list: ... not in []", which does not say where the file comes from
        problem = missing_reference(reference_name)
        return problem or True

    @classmethod
    def fingerprint_inputs(cls, reference_name):
        # a file replaced under the same name is read again (ComfyUI's cache keys on the inputs otherwise)
        return folders.file_fingerprint(folders.REFERENCES, reference_name)

    @classmethod
    def execute(cls, reference_name) -> io.NodeOutput:
        problem = missing_reference(reference_name)
        if problem:
            raise FileNotFoundError(problem)
        return io.NodeOutput(load_reference(folder_paths.get_full_path(folders.REFERENCES, reference_name)))


def missing_reference(name) -> str | None:
    """Why a saved reference cannot be loaded (what to run first, the folders searched), or None when it can."""
    if isinstance(name, str) and name and folder_paths.get_full_path(folders.REFERENCES, name) is not None:
        return None
    saved = folder_paths.get_filename_list(folders.REFERENCES)
    what = f"no saved reference '{name}'" if name else "no saved reference chosen"
    listing = f"saved there: {', '.join(saved)}" if saved else "none is saved there yet"
    return (f"{what} in {folders.searched(folders.REFERENCES)} ({listing}): run a graph with Inv-Adapter Save "
            f"Reference first (e.g. the template '03 - Save an identity'), then pick its file here (the list "
            f"refreshes after the save; press R to refresh it by hand)")


NODES = [InvAdapterSaveReference, InvAdapterLoadReference]
