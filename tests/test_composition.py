"""The EAA under ComfyUI's core patches that change attention's token layout or batch (HyperTile, ToMe, PAG, SAG,
FreeU, chains of them), in either order, on the tiny in-process model at a latent large enough for them to act."""
import pytest
import torch

import comfy.sample
from comfy_extras.nodes_freelunch import FreeU, FreeU_V2
from comfy_extras.nodes_hypertile import HyperTile
from comfy_extras.nodes_pag import PerturbedAttentionGuidance
from comfy_extras.nodes_sag import SelfAttentionGuidance
from comfy_extras.nodes_tomesd import TomePatchModel
from invadapter_core.adapter.application import Application, install
from invadapter_core.reference.encode import invert_latent
from invadapter_core.adapter.injection import ADD, CALL, STASH, Call, EAAInjection, Step, ordered_patches
from invadapter_core.reference.capture import Features
from invadapter_core.arch.layout import layout_of
from invadapter_core.adapter.weights import init_from_model
from test_eaa import softmax_attention

SIDE = 32  # latent side: HyperTile (tile 64 px = 8 latent cells) and ToMe act on the 32x32 blocks
STEPS = 3


def first(node_output):
    return node_output[0]


PATCHES = {
    "HyperTile": lambda m: first(HyperTile.execute(m, 64, 2, 0, False)),
    "ToMe": lambda m: first(TomePatchModel.execute(m, 0.5)),
    "PAG": lambda m: first(PerturbedAttentionGuidance.execute(m, 2.0)),
    "SAG": lambda m: first(SelfAttentionGuidance.execute(m, 0.5, 2.0)),
    "FreeU": lambda m: first(FreeU.execute(m, 1.3, 1.4, 0.9, 0.2)),
    "FreeU_V2": lambda m: first(FreeU_V2.execute(m, 1.3, 1.4, 0.9, 0.2)),
    "HyperTile+ToMe+PAG": lambda m: PATCHES["PAG"](PATCHES["ToMe"](PATCHES["HyperTile"](m))),
}


@pytest.fixture(scope="module")
def reference(model, caption):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    return invert_latent(model, latent, caption, STEPS, "simple", (64, 64))


def sample(model, caption):
    torch.manual_seed(0)  # HyperTile and ToMe draw their tilings from torch's global generator
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 4, SIDE, SIDE, generator=g)
    return comfy.sample.sample(model, noise, STEPS, 4.0, "euler", "simple", [[caption, {}]],
                               [[torch.zeros_like(caption), {}]], torch.zeros(1, 4, SIDE, SIDE), disable_pbar=True,
                               seed=5)


def with_pack(model, patch, reference, order, **kw):
    """The patch node's model with Inv-Adapter installed before it (upstream) or after it (downstream)."""
    if order == "pack first":
        return patch(install(model, Application(init_from_model(""), reference, model, 1.0, 1.0, **kw)))
    patched = patch(model)
    return install(patched, Application(init_from_model(""), reference, patched, 1.0, 1.0, **kw))


@pytest.mark.parametrize("order", ["pack first", "patch first"])
@pytest.mark.parametrize("name", list(PATCHES))
def test_a_zero_contribution_leaves_the_patched_graph_bit_identical(model, caption, reference, name, order):
    """The pack's patches (stash, add, reordering) do nothing to another patch's result when the EAA term is zero
    (a zero mask: its K/V and attention still run), and act when it is not."""
    patch = PATCHES[name]
    plain = sample(patch(model), caption)
    zero = with_pack(model, patch, reference, order, mask=torch.zeros(1, 64, 64))
    assert torch.equal(sample(zero, caption), plain)
    acting = sample(with_pack(model, patch, reference, order), caption)
    assert torch.isfinite(acting).all() and not torch.equal(acting, plain)


def test_under_hypertile_the_eaa_term_is_the_untiled_one(model):
    """HyperTile tiles the tokens into the batch inside self-attention and untiles them in its output patch; with
    its patches installed either side of ours, the block's output is the frozen block with HyperTile's attention
    plus exactly the untiled EAA term (eq. 2-3), computed here independently."""
    layout = layout_of(model)
    name, tb = "input.1.0", layout.blocks["input.1.0"]
    tiled = first(HyperTile.execute(model, 64, 1, 0, False))  # swap_size 1: one tiling, no randomness
    patches = tiled.model_options["transformer_options"]["patches"]
    ht_in, ht_out = patches["attn1_patch"][0], patches["attn1_output_patch"][0]
    g = torch.Generator().manual_seed(3)
    dim = tb.attn1.to_q.in_features
    x = torch.randn(1, SIDE * SIDE, dim, generator=g)
    text = torch.randn(1, 77, 768, generator=g)
    f_s = torch.randn(1, 64, dim, generator=g)
    injection = EAAInjection(layout, 0.8, 0.0)
    kv = injection.project_kv(init_from_model(""), Features({name: f_s}), "concat")
    extra = {"block": ("input", 1), "block_index": 0, "cond_or_uncond": [0], "original_shape": [1, 4, SIDE, SIDE],
             "activations_shape": [1, dim, SIDE, SIDE], "n_heads": tb.attn1.heads}
    # as installed with the pack upstream of HyperTile: our add would run before HyperTile untiles
    installed = {"attn1_patch": [STASH["self"], ht_in], "attn1_output_patch": [ADD["self"], ht_out]}
    options = dict(extra, patches=ordered_patches(installed), **{CALL: Call([Step(injection, kv)])})
    with torch.no_grad():
        got = tb(x, context=text, transformer_options=options)
        a1 = tb.attn1
        n = tb.norm1(x)
        q, k, v = ht_in(n, n, n, extra)
        A = ht_out(a1(q, context=k, value=v), extra)
        E = softmax_attention(n @ a1.to_q.weight.T, f_s @ a1.to_k.weight.T, f_s @ a1.to_v.weight.T,
                              heads=a1.heads)
        h = x + A + 0.8 * E @ a1.to_out[0].weight.T
        h = h + tb.attn2(tb.norm2(h), context=text)
        expected = h + tb.ff(tb.norm3(h))
    assert torch.allclose(got, expected, atol=5e-5, rtol=1e-4), (got - expected).abs().max()
    assert q.shape[0] == 16  # HyperTile really tiled: 4 x 4 tiles in the batch
