"""Thin V3 node definitions. Every module in this package lists its nodes in ``NODES``."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import loader, encode, apply, reference_io, face_crop, control, attention_maps, face_similarity, identity_prompt

_NODE_MODULES = [loader, encode, apply, reference_io, face_crop, control, attention_maps, face_similarity,
                 identity_prompt]


def all_nodes() -> list[type[io.ComfyNode]]:
    nodes = []
    for module in _NODE_MODULES:
        nodes.extend(module.NODES)
    return nodes


class InvAdapterExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> InvAdapterExtension:
    return InvAdapterExtension()
