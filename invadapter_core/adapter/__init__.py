"""Adapter stage: the EAA weights and math, its injection into the network's attention, the ComfyUI application
that feeds it per sampling step, whether a reference and an adapter fit a model, block weights and attention maps."""
