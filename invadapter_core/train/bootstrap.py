"""Make ComfyUI importable for the trainer: ``invadapter_core.bootstrap`` (shared with the evaluation), kept here
under its old name for the trainer's imports."""
from __future__ import annotations

from ..bootstrap import setup_comfy

__all__ = ["setup_comfy"]
