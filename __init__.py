"""ComfyUI-InvAdapter: identity customization by DDIM inversion + Embedded Attention Adapter.

ComfyUI imports this file as the custom node pack's entry point (V3 ``comfy_entrypoint``).
"""
import os
import sys

# invadapter_core is plain torch that also runs outside ComfyUI (the trainer, the benchmark), so it is imported by
# its absolute name everywhere; appending (not prepending) keeps ComfyUI's own top-level `nodes` module first.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

WEB_DIRECTORY = "./web"

# ComfyUI imports this folder as a package. A test runner may execute this file as a plain module (pytest collects a
# repository root that holds an __init__.py, and a clone named "ComfyUI-InvAdapter" is not a valid package name):
# there is then no package to import the nodes from, and nothing to register.
if __package__:
    from .nodes import comfy_entrypoint, InvAdapterExtension  # noqa: F401
    from .example_inputs import install_example_inputs

    install_example_inputs()
    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
