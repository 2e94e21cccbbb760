"""The toy's text path for IDAdapter's identity token (``invadapter_core.adapter.identity_token.TextPath``).

The toy's "text encoder" (``base.PoseEncoder``) turns the prompt, a pose, straight into context tokens [start, pose]
that the frozen cross-attention reads; it has no word embeddings to put a placeholder among. The identity token
enters the same way a prompt's tokens do here: its k embeddings (32-d, the context width) are appended to the pose
context, so the frozen cross-attention reads them beside the pose. They start as the null token (the empty prompt's
pose token, a token the base knows), as a real checkpoint's start as the placeholder word's embedding.
"""
from __future__ import annotations

import torch

from .base import CONTEXT_DIM, ToyBase


class ToyTextPath:
    width = CONTEXT_DIM

    def __init__(self, base: ToyBase):
        self.start = base.encoder.null.detach().clone()

    def __call__(self, captions: list[str], contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([contexts, tokens.to(contexts.dtype)], dim=1)

    def context(self, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """At sampling: the target poses' contexts [B, 2, 32] with one reference's tokens [1, k, 32]."""
        return self([""] * len(contexts), contexts, tokens.expand(len(contexts), -1, -1))
