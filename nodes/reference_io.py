import os
import re

from comfy_api.latest import io

import folder_paths
from invadapter_core.reference import load_reference, save_reference

from . import folders
from .types import CATEGORY, ReferenceType


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
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
        if not stem:
            raise ValueError(f"'{name}' is not usable as a file name: use letters, digits, '-', '_' or '.'")
        folder = folder_paths.get_folder_paths(folders.REFERENCES)[0]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, stem if stem.endswith(".safetensors") else stem + ".safetensors")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists: choose another name or enable overwrite")
        save_reference(reference, path, with_features=with_features)
        return io.NodeOutput(reference, path, ui={"text": [path]})


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
    def execute(cls, reference_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(folders.REFERENCES, reference_name)
        if path is None:
            raise FileNotFoundError(f"reference '{reference_name}' not found; searched: "
                                    f"{folders.searched(folders.REFERENCES)}")
        return io.NodeOutput(load_reference(path))


NODES = [InvAdapterSaveReference, InvAdapterLoadReference]
