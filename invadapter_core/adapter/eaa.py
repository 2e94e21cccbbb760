"""The Embedded Attention Adapter (docs/method.md §4, eq. 1-5) as plain torch modules.

Per transformer block the adapter owns at most:
- self-attention EAA: ``to_k``/``to_v`` (W'k, W'v) applied to the reference's self-attention input f_s; with no
  own layers it borrows the base model's attn1.to_k/to_v (the training-free "init from model" adapter);
- cross-attention EAA: ``token_agg`` (W_agg, N -> M along the token axis) then ``to_k``/``to_v`` (W''k, W''v).
The query always comes from the pretrained attention's own to_q, and the result is added to the frozen
attention's output before ``to_out``: ``out = to_out(A + lambda * E)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads * d] -> [B, heads, N, d], the layout attention kernels take (how reference K/V are kept)."""
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


def reference_attention(q: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor, heads: int) -> torch.Tensor:
    """E = softmax(q k_ref^T / sqrt(d)) v_ref with q [B, Nq, heads * d] and the reference's K/V already split into
    heads ([1 or B, heads, N, d]). torch's scaled-dot-product attention (what ComfyUI itself picks by default on
    CPUs and current GPUs) is called directly on them: five operators around the kernel, which a launch-bound GPU
    pays on every call. One reference for every sample folds the batch into the query tokens (attention is
    row-wise in the queries): one call, no per-sample copies of K/V."""
    b, nq, inner = q.shape
    d = inner // heads
    if k_ref.dtype != q.dtype:
        k_ref, v_ref = k_ref.to(q.dtype), v_ref.to(q.dtype)
    rows = 1 if k_ref.shape[0] == 1 else b
    qh = q.reshape(rows, b * nq // rows, heads, d).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(qh, k_ref, v_ref)
    return out.transpose(1, 2).reshape(b, nq, inner)


def aggregate_tokens(f: torch.Tensor, token_agg: nn.Linear) -> torch.Tensor:
    """Eq. 4: g = W_agg f, a linear map along the token axis ([B, N, C] -> [B, M, C])."""
    return token_agg(f.transpose(1, 2).to(token_agg.weight.dtype)).transpose(1, 2)


class SelfEAA(nn.Module):
    """W'k, W'v of one block's self-attention EAA; ``None`` layers mean "use the base model's own"."""

    def __init__(self, dim: int = 0, inner_dim: int = 0, own_layers: bool = True):
        super().__init__()
        self.to_k = nn.Linear(dim, inner_dim, bias=False) if own_layers else None
        self.to_v = nn.Linear(dim, inner_dim, bias=False) if own_layers else None

    def project(self, f_s: torch.Tensor, base_attn: Optional[nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.to_k is None:
            if base_attn is None:
                raise ValueError("an init-from-model self EAA needs the base attention to project with")
            return base_attn.to_k(f_s), base_attn.to_v(f_s)
        f = f_s.to(self.to_k.weight.dtype)
        return self.to_k(f), self.to_v(f)


class CrossEAA(nn.Module):
    """W_agg (N -> M tokens), W''k, W''v of one block's cross-attention EAA."""

    def __init__(self, dim: int, inner_dim: int, tokens_n: int, tokens_m: int):
        super().__init__()
        self.token_agg = nn.Linear(tokens_n, tokens_m)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)

    def project(self, f_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if f_c.shape[1] != self.token_agg.in_features:
            raise ValueError(f"cross-attention EAA expects {self.token_agg.in_features} reference tokens, got "
                             f"{f_c.shape[1]}: encode the reference at the adapter's reference resolution")
        g = aggregate_tokens(f_c, self.token_agg)
        return self.to_k(g), self.to_v(g)


class InvAdapter(nn.Module):
    """All EAA layers of one adapter, keyed by block name ("input.1.0", ...), plus what the file format records."""

    def __init__(self, family: str, reference_resolution: Optional[int], tokens_m: Optional[int],
                 self_eaa: dict[str, SelfEAA], cross_eaa: dict[str, CrossEAA], name: str = "",
                 self_from_base: bool = False, architecture: str = "UNet",
                 identity_token: Optional[nn.Module] = None):
        super().__init__()
        # IDAdapter's identity token (adapter.identity_token.IdentityTokenMap): the reference's features -> k token
        # embeddings for the prompt; None: the adapter has none
        self.identity_token = identity_token
        # the layout the layers are for (files.format.DEFAULT_ARCHITECTURE): on an MM-DiT (adapter.joint) a self
        # EAA's to_k / to_v map the reference's joint-attention K and V, not the block's input
        self.architecture = architecture
        self.self_from_base = self_from_base  # training-free default: W'k, W'v are the base model's own
        self.family = family
        self.reference_resolution = reference_resolution  # None: any resolution (no token aggregation)
        self.tokens_m = tokens_m
        # nn.ModuleDict keys cannot contain ".": blocks are stored as "input_1_0", exposed as "input.1.0"
        self.self_eaa = nn.ModuleDict({k.replace(".", "_"): v for k, v in self_eaa.items()})
        self.cross_eaa = nn.ModuleDict({k.replace(".", "_"): v for k, v in cross_eaa.items()})
        self.name = name

    @property
    def has_cross(self) -> bool:
        return len(self.cross_eaa) > 0

    def self_layer(self, block: str) -> Optional[SelfEAA]:
        """The self EAA of a block ("input.1.0"); the base model's own projections for the training-free adapter."""
        if self.self_from_base:
            return _BASE_SELF_EAA
        return self.self_eaa[_module_key(block)] if _module_key(block) in self.self_eaa else None

    def cross_layer(self, block: str) -> Optional[CrossEAA]:
        return self.cross_eaa[_module_key(block)] if _module_key(block) in self.cross_eaa else None

    def self_layers(self) -> dict[str, SelfEAA]:
        return {k.replace("_", "."): v for k, v in self.self_eaa.items()}

    def cross_layers(self) -> dict[str, CrossEAA]:
        return {k.replace("_", "."): v for k, v in self.cross_eaa.items()}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _module_key(block: str) -> str:
    return block.replace(".", "_")


_BASE_SELF_EAA = SelfEAA(own_layers=False)
