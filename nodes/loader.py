from comfy_api.latest import io

import folder_paths
from invadapter_core.adapter.weights import INIT_FROM_MODEL, init_from_model, load_adapter

from . import folders
from .types import CATEGORY, InvAdapterType


class InvAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterLoader",
            display_name="Inv-Adapter Loader",
            category=CATEGORY,
            search_aliases=["load adapter", "identity", "face id", "faceid", "instantid", "pulid", "ipadapter",
                            "eaa", "inv-adapter"],
            description="Loads Embedded Attention Adapter weights from models/invadapter, or the training-free "
                        "default that reuses the model's own self-attention projections.",
            inputs=[io.Combo.Input("adapter_name",
                                   options=[INIT_FROM_MODEL] + folder_paths.get_filename_list(folders.ADAPTERS),
                                   default=INIT_FROM_MODEL,
                                   tooltip="A .safetensors file in models/invadapter, or 'init from model'.")],
            outputs=[InvAdapterType.Output(display_name="invadapter",
                                           tooltip="The adapter: connect to Inv-Adapter Apply (and optionally "
                                                   "Encode Reference).")],
        )

    @classmethod
    def fingerprint_inputs(cls, adapter_name: str):
        return None if adapter_name == INIT_FROM_MODEL else folders.file_fingerprint(folders.ADAPTERS, adapter_name)

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        if adapter_name == INIT_FROM_MODEL:
            return io.NodeOutput(init_from_model(family=""))
        path = folder_paths.get_full_path(folders.ADAPTERS, adapter_name)
        if path is None:
            raise FileNotFoundError(f"Inv-Adapter weights '{adapter_name}' not found; searched: "
                                    f"{folders.searched(folders.ADAPTERS)}")
        return io.NodeOutput(load_adapter(path))


NODES = [InvAdapterLoader]
