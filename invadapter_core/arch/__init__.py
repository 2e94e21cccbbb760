"""What the pack knows of a network: one layout object per architecture (``layout``: blocks, ids, levels, dims, token
grids, where the patches attach), the block levels, and which models are served (``fit``)."""
from . import unet  # noqa: F401 - registers the UNet layout with layout.ARCHITECTURES
from . import flux  # noqa: F401 - registers the Flux layout (Flux.1, Chroma)
from . import qwen_image  # noqa: F401 - registers the Qwen-Image layout (served like Flux)
