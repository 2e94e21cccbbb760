"""The pack's custom ComfyUI types (their names are part of the public API)."""
from comfy_api.latest import io

InvAdapterType = io.Custom("INVADAPTER")
ReferenceType = io.Custom("INVADAPTER_REFERENCE")
CATEGORY = "InvAdapter"
BlockWeightsType = io.Custom("INVADAPTER_BLOCK_WEIGHTS")
