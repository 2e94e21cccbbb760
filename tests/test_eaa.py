"""The EAA inside a real ComfyUI transformer block equals an independent implementation of eq. 1-5."""
import pytest
import torch

import comfy.ops
from comfy.ldm.modules.attention import BasicTransformerBlock
from invadapter_core.adapter.eaa import CrossEAA, InvAdapter, SelfEAA
from invadapter_core.adapter.injection import CALL, Call, EAAInjection, Step, patch_lists
from invadapter_core.arch.layout import Layout
from invadapter_core.reference.capture import Features

DIM, HEADS, D_HEAD, CTX, N, NREF, M = 64, 4, 16, 768, 36, 49, 8


def softmax_attention(q, k, v, heads=HEADS):
    """Per-head softmax(q k^T / sqrt(d)) v written out: [B, tokens, heads*d]."""
    b, nq, inner = q.shape
    d = inner // heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)  # noqa: E731
    qh, kh, vh = split(q), split(k).expand(b, -1, -1, -1), split(v).expand(b, -1, -1, -1)
    w = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, dim=-1)
    return (w @ vh).permute(0, 2, 1, 3).reshape(b, nq, inner)


def seeded(module, seed):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5
    return module


@pytest.fixture
def block():
    tb = BasicTransformerBlock(DIM, HEADS, D_HEAD, context_dim=CTX, operations=comfy.ops.disable_weight_init)
    return seeded(tb, 0).eval()


def injected(tb, weight_self, weight_cross, **kw):
    layout = Layout({"input.1.0": tb}, {(("input", 1), 0): "input.1.0"}, {"input.1.0": "input_high"})
    return EAAInjection(layout, weight_self, weight_cross, **kw)


def run_block(tb, injection, adapter, features, x, text):
    """One transformer block called as the UNet calls it, with the EAA's patches and one step of K/V."""
    kv = injection.project_kv(adapter, features, "concat")
    options = {"patches": patch_lists(), "block": ("input", 1), "block_index": 0, "cond_or_uncond": [0],
               "activations_shape": [2, DIM, 6, 6], "original_shape": [2, 4, 6, 6], CALL: Call([Step(injection, kv)])}
    return tb(x, context=text, transformer_options=options)


def test_block_with_eaa_equals_equations_2_to_5(block):
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, N, DIM, generator=g), torch.randn(2, 77, CTX, generator=g)
    f_s, f_c = torch.randn(1, NREF, DIM, generator=g), torch.randn(1, NREF, DIM, generator=g)
    adapter = InvAdapter("SD15", 56, M, {"input.1.0": seeded(SelfEAA(DIM, DIM), 2)},
                         {"input.1.0": seeded(CrossEAA(DIM, DIM, NREF, M), 3)})
    lam_s, lam_c = 0.7, 1.3
    with torch.no_grad():
        got = run_block(block, injected(block, lam_s, lam_c), adapter, Features({"input.1.0": f_s}, {"input.1.0": f_c}),
                        x, text)

        # independent: eq. 1-3 (self), eq. 4-5 (cross), residuals and feed-forward as in the frozen block
        a1, a2 = block.attn1, block.attn2
        n = block.norm1(x)
        A = softmax_attention(n @ a1.to_q.weight.T, n @ a1.to_k.weight.T, n @ a1.to_v.weight.T)
        sl = adapter.self_layers()["input.1.0"]
        E = softmax_attention(n @ a1.to_q.weight.T, f_s @ sl.to_k.weight.T, f_s @ sl.to_v.weight.T)
        h = (A + lam_s * E) @ a1.to_out[0].weight.T + a1.to_out[0].bias + x
        n2 = block.norm2(h)
        At = softmax_attention(n2 @ a2.to_q.weight.T, text @ a2.to_k.weight.T, text @ a2.to_v.weight.T)
        cl = adapter.cross_layers()["input.1.0"]
        gagg = torch.einsum("mn,bnc->bmc", cl.token_agg.weight, f_c) + cl.token_agg.bias[None, :, None]
        Ec = softmax_attention(n2 @ a2.to_q.weight.T, gagg @ cl.to_k.weight.T, gagg @ cl.to_v.weight.T)
        h = (At + lam_c * Ec) @ a2.to_out[0].weight.T + a2.to_out[0].bias + h
        expected = block.ff(block.norm3(h)) + h
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), (got - expected).abs().max()


def test_zero_weights_leave_the_block_bit_identical(block):
    g = torch.Generator().manual_seed(4)
    x, text = torch.randn(2, N, DIM, generator=g), torch.randn(2, 77, CTX, generator=g)
    adapter = InvAdapter("SD15", None, None, {}, {}, self_from_base=True)
    features = Features({"input.1.0": torch.randn(1, NREF, DIM, generator=g)})
    with torch.no_grad():
        got = run_block(block, injected(block, 0.0, 0.0), adapter, features, x, text)
        assert torch.equal(got, block(x, context=text, transformer_options={}))


def test_init_from_model_uses_the_base_projections(block):
    g = torch.Generator().manual_seed(5)
    x, text = torch.randn(1, N, DIM, generator=g), torch.randn(1, 77, CTX, generator=g)
    f_s = torch.randn(1, NREF, DIM, generator=g)
    adapter = InvAdapter("", None, None, {}, {}, self_from_base=True)
    with torch.no_grad():
        got = run_block(block, injected(block, 1.0, 1.0), adapter, Features({"input.1.0": f_s}), x, text)
        a1 = block.attn1
        n = block.norm1(x)
        q = n @ a1.to_q.weight.T
        A = softmax_attention(q, n @ a1.to_k.weight.T, n @ a1.to_v.weight.T)
        E = softmax_attention(q, f_s @ a1.to_k.weight.T, f_s @ a1.to_v.weight.T)
        h = (A + E) @ a1.to_out[0].weight.T + a1.to_out[0].bias + x
        h = block.attn2(block.norm2(h), context=text) + h
        expected = block.ff(block.norm3(h)) + h
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4)
