"""Glue to the ComfyUI host that is not a node: memory management, finding the host, user notices, the command-line
tools' torchrun processes."""
