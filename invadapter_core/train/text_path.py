"""The identity token's text path for a real checkpoint (``adapter.identity_token.TextPath``): ComfyUI's CLIP."""
from __future__ import annotations

import torch

from ..adapter.identity_prompt import PLACEHOLDER, insert_tokens, placeholder_embedding, token_width
from .model import differentiable_ops


class ClipTextPath:
    """The trainer's text path for a real checkpoint (``identity_token.TextPath``): each caption re-encoded by
    ComfyUI's CLIP with the identity tokens in place of the placeholder (prepended to captions without it),
    differentiable in the tokens. Costs one text-encoder pass (with its backward) per caption and step."""

    def __init__(self, clip, placeholder: str = PLACEHOLDER):
        self.clip, self.placeholder = clip, placeholder
        self.width = token_width(clip)
        self.start = placeholder_embedding(clip, placeholder)

    def caption(self, text: str) -> str:
        words = text.replace(",", " ").split()
        return text if self.placeholder in words else f"{self.placeholder} {text}".strip()

    def __call__(self, captions: list[str], contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        out = []
        for text, rows in zip(captions, tokens):
            with differentiable_ops():  # CLIP's residual adds are in place, into tensors its backward needs
                encoded = self.clip.encode_from_tokens(insert_tokens(self.clip, self.caption(text), rows,
                                                                     self.placeholder))
            out.append(encoded.to(contexts.device, contexts.dtype))
        return torch.cat(out)
