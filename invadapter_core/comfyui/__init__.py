"""Glue to the ComfyUI host that is not a node: memory management, finding the host, user notices."""
