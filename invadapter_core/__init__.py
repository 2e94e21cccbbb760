"""Inv-Adapter as plain torch: EAA math, DDIM in sigma space, reference features, weight format.

Only ``comfy_model`` and ``encode`` talk to ComfyUI; everything else runs on bare tensors.
"""
FORMAT_VERSION = 1
