"""IDAdapter's textual injection: a learned map from the reference's diffusion features to k token embeddings that
enter the prompt through the text encoder, as textual-inversion embeddings do (the "identity token").

What the map reads (``SUMMARY``): the frozen UNet's self-attention inputs f_s of the coarsest blocks (levels
``DEEP_LEVELS``: the lowest-resolution input/output blocks and the middle block), averaged over their tokens and
concatenated block by block, from one reference pass at the lowest positive sigma of the reference's inversion
trajectory. Why: a prompt is one conditioning for the whole sampling run, so the token must not depend on the
generation's step (one fixed reference pass, not the per-step features the EAA reads); the lowest sigma is the
cleanest view of the face the trajectory holds; the coarse blocks carry face shape rather than texture
(``arch.levels``); and the token mean drops where things are in the image (the pose), keeping what they are.
Several photos of the identity (MFF, or a reference of R images): their summaries are averaged.

The map (``IdentityTokenMap``): LayerNorm (block widths and scales differ) -> Linear -> GELU -> Linear to k x width,
the width of the text encoder's token embeddings. It starts at the placeholder word's own embedding (last layer's
weight 0, its bias the embedding k times): at step 0 the identity token is the word it replaces.

In the weights file: tensors ``identity_token.<norm|fc1|fc2>.<weight|bias>``; metadata ``identity_tokens`` (k),
``identity_token_width``, ``identity_token_blocks`` (JSON list of the summarised blocks, in order) and
``identity_token_features`` (``SUMMARY``); checked by ``files.validation.check_identity_token``.
"""
from __future__ import annotations

import json
from typing import Optional, Protocol

import torch
from torch import nn

from ..arch.layout import Layout, layout_of
from ..files.format import META
from ..reference.capture import reference_pass

SUMMARY = "self-attention input, token mean, coarsest blocks, lowest sigma"
DEEP_LEVELS = ("input_low", "middle", "output_low")
PREFIX = "identity_token."


class TextPath(Protocol):
    """How identity tokens enter the prompt: ``(captions, contexts [B, T, D], tokens [B, k, width]) -> the
    generation's context``, differentiable in ``tokens``. ``width``: the token-embedding width it takes; ``start``:
    the embedding the map starts from ([width], the placeholder word's). The identity toy's appends the tokens to its
    pose context; a real checkpoint's re-encodes the caption with the tokens in place of the placeholder word."""
    width: int
    start: torch.Tensor

    def __call__(self, captions: list[str], contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...


class IdentityTokenMap(nn.Module):
    """Summary [B, F] of the reference's features -> k token embeddings [B, k, width]."""

    def __init__(self, in_dim: int, tokens: int, width: int, hidden: int, blocks: list[str]):
        super().__init__()
        self.tokens, self.width, self.blocks = tokens, width, list(blocks)
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, tokens * width)

    def start_from(self, embedding: torch.Tensor) -> "IdentityTokenMap":
        """Every token starts as ``embedding`` (the placeholder word's), whatever the reference."""
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.bias.copy_(embedding.detach().float().reshape(-1).repeat(self.tokens))
        return self

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.fc1(self.norm(summary.to(self.fc1.weight.dtype))))
        return self.fc2(h).reshape(summary.shape[0], self.tokens, self.width)


def summary_blocks(layout: Layout) -> list[str]:
    """The blocks whose features the map reads (``DEEP_LEVELS``), in the layout's order."""
    blocks = [name for name in layout.blocks if layout.levels.get(name) in DEEP_LEVELS]
    if not blocks:
        raise ValueError("this network has no blocks at the coarsest levels to read an identity token from")
    return blocks


def summary_width(layout: Layout, blocks: list[str]) -> int:
    return sum(layout.feature_width(name) for name in blocks)


def build_map(layout: Layout, tokens: int, text_path: TextPath) -> IdentityTokenMap:
    """A fresh map for this network and text path, starting at the text path's placeholder embedding."""
    blocks = summary_blocks(layout)
    width = int(text_path.width)
    return IdentityTokenMap(summary_width(layout, blocks), tokens, width, max(64, width), blocks) \
        .start_from(text_path.start)


def summarize(self_attn: dict[str, torch.Tensor], blocks: list[str], references: int = 1) -> torch.Tensor:
    """[B x K, N, C] features per block -> [B, F]: token means, blocks side by side, the K photos averaged."""
    summary = torch.cat([self_attn[name].float().mean(dim=1) for name in blocks], dim=-1)
    return summary.reshape(-1, references, summary.shape[-1]).mean(dim=1)


def lowest_index(sigmas: torch.Tensor) -> int:
    """The trajectory index of the lowest positive sigma (ascending sigmas; index 0 is the clean latent at 0)."""
    positive = (sigmas > 0).nonzero()
    if not len(positive):
        raise ValueError("the reference's trajectory has no positive sigma to read an identity token at")
    return int(positive[0])


def summary_pass(base_model, layout: Layout, blocks: list[str], x: torch.Tensor, sigmas: torch.Tensor,
                 conds: dict, references: int = 1) -> torch.Tensor:
    """One frozen reference pass (no gradient) of the states ``x`` at ``sigmas``, summarised: [B, F]."""
    _, features = reference_pass(base_model, x, sigmas, conds, layout, cross=False, keep=set(blocks),
                                 features_only=True)
    return summarize(features.self_attn, blocks, references)


def reference_tokens(model, identity_map: IdentityTokenMap, reference) -> torch.Tensor:
    """The identity token embeddings [1, k, width] of a ``reference.Reference`` (its R photos averaged) under
    ``model`` (a ModelPatcher of the family it was encoded with)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    layout = layout_of(model)
    check_map_fits(identity_map, layout)
    device = model.load_device
    i = lowest_index(reference.sigmas)
    x = reference.states[i].to(device, torch.float32)  # [R, C, h, w]
    conds = {k: v.to(device) for k, v in reference.conds.items()}
    sigmas = torch.full((x.shape[0],), float(reference.sigmas[i]), device=device)
    summary = summary_pass(model.model, layout, identity_map.blocks, x, sigmas, conds, references=x.shape[0])
    with torch.no_grad():
        return identity_map.to(device)(summary).float()


def check_map_fits(identity_map: IdentityTokenMap, layout: Layout, name: str = "the adapter") -> None:
    """The map's blocks exist in this network and their widths add up to what it reads; one line otherwise."""
    missing = [b for b in identity_map.blocks if b not in layout.dims]
    if missing:
        raise ValueError(f"{name}'s identity token reads blocks {missing} that this model does not have: load an "
                         f"adapter trained for this checkpoint's family")
    width = summary_width(layout, identity_map.blocks)
    if width != identity_map.norm.normalized_shape[0]:
        raise ValueError(f"{name}'s identity token reads {identity_map.norm.normalized_shape[0]} feature values, "
                         f"this model's blocks give {width}: load an adapter trained for this checkpoint")


def check_width(identity_map: IdentityTokenMap, width: int, name: str = "the adapter") -> None:
    """The text encoder's token embeddings are as wide as the map's tokens; one line otherwise."""
    if identity_map.width != width:
        raise ValueError(f"{name}'s identity token is {identity_map.width}-d, this text encoder's token embeddings "
                         f"are {width}-d: use the CLIP of the checkpoint the adapter was trained for")


# ------------------------------------------------------------------------------------------------ file format
def token_state(identity_map: IdentityTokenMap) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {PREFIX + k: v for k, v in identity_map.state_dict().items()}
    meta = {META + "identity_tokens": str(identity_map.tokens), META + "identity_token_width": str(identity_map.width),
            META + "identity_token_blocks": json.dumps(identity_map.blocks),
            META + "identity_token_features": SUMMARY}
    return tensors, meta


def map_from_state(parsed: Optional[dict]) -> Optional[IdentityTokenMap]:
    """The map of ``files.validation.check_identity_token``'s result (None: the file has none)."""
    if parsed is None:
        return None
    t = parsed["tensors"]
    identity_map = IdentityTokenMap(t["norm.weight"].shape[0], parsed["tokens"], parsed["width"],
                                    t["fc1.weight"].shape[0], parsed["blocks"])
    identity_map.load_state_dict({k: v.float() for k, v in t.items()})
    return identity_map
