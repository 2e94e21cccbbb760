"""The pack beyond SD1.5 (tiny in-process models of each layout): SDXL with its ADM input and transformer depth above
one, SD2.x v-prediction, inpainting UNets (c_concat), and a clear refusal of families it cannot serve."""
import pytest
import torch

import comfy.sample
import comfy.supported_models
from invadapter_core.adapter.application import Application, install
from invadapter_core.reference.encode import CAPTURE, invert_latent, reference_conds
from invadapter_core.arch.fit import check_served, default_resolution
from invadapter_core.adapter.injection import CALL, Call, Step, patch_lists
from invadapter_core.reference.capture import Features
from invadapter_core.arch.layout import ModelFamilyError, layout_of
from invadapter_core.adapter.weights import init_from_model
from support import models
from support.sdxl_models import sdxl_pooled_output, sdxl_text_context, tiny_sdxl_model
from test_eaa import softmax_attention

STEPS = 4


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_model()


def conds_for(model, context, options, side=8):
    x0 = torch.zeros(1, 4, side, side)
    return reference_conds(model, context, options, x0, (side * 8, side * 8))


def encode(model, context, options=None, keep=True, **kw):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    x0 = model.model.process_latent_in(latent)
    conds = reference_conds(model, context, options or {}, x0, (64, 64))
    return invert_latent(model, latent, conds, STEPS, "simple", (64, 64), keep_features=keep, **kw)


def sample(model, positive, negative, channels=4, **kw):
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, channels, 8, 8, generator=g)
    return comfy.sample.sample(model, noise, STEPS, 4.0, "euler", "simple", positive, negative,
                               torch.zeros(2, channels, 8, 8), disable_pbar=True, seed=5, **kw)


def applied(model, ref, weight=1.0, **kw):
    return install(model, Application(init_from_model(""), ref, model, weight, 1.0, **kw))


# --------------------------------------------------------------------------------------------------- SDXL
def sdxl_prompts():
    pos = [[sdxl_text_context(1), {"pooled_output": sdxl_pooled_output(1), "width": 64, "height": 64}]]
    neg = [[sdxl_text_context(2), {"pooled_output": sdxl_pooled_output(2), "width": 64, "height": 64}]]
    return pos, neg


def test_sdxl_reference_gets_its_adm_vector_with_its_own_size(sdxl):
    conds = conds_for(sdxl, sdxl_text_context(0), {"pooled_output": sdxl_pooled_output(0)})
    assert set(conds) == {"c_crossattn", "y"} and conds["y"].shape == (1, 2816)
    assert torch.equal(conds["y"][:, :1280], sdxl_pooled_output(0))  # the caption's pooled output leads the vector
    other = conds_for(sdxl, sdxl_text_context(0), {"pooled_output": sdxl_pooled_output(0)}, side=16)
    assert not torch.equal(conds["y"][:, 1280:], other["y"][:, 1280:])  # the size conditioning is the reference's


def test_sdxl_depth_above_one_names_levels_and_defaults(sdxl):
    blocks = layout_of(sdxl).blocks
    assert any(name.endswith(".2") for name in blocks)  # depth 3 at the lowest level
    levels = layout_of(sdxl).levels
    assert {levels[n] for n in blocks if n.startswith("input")} == {"input_high", "input_low"}
    assert default_resolution(sdxl) == 1024


def test_sdxl_parity_zero_warm_cold_and_capture(sdxl):
    pos, neg = sdxl_prompts()
    options = {"pooled_output": sdxl_pooled_output(0)}
    warm, cold = encode(sdxl, sdxl_text_context(0), options), encode(sdxl, sdxl_text_context(0), options, keep=False)
    base = sample(sdxl, pos, neg)
    assert torch.equal(sample(applied(sdxl, warm, mask=torch.zeros(1, 64, 64)), pos, neg), base)
    with_warm = sample(applied(sdxl, warm), pos, neg)
    assert torch.equal(with_warm, sample(applied(sdxl, cold), pos, neg))
    assert torch.isfinite(with_warm).all() and not torch.equal(with_warm, base)
    coarse = encode(sdxl, sdxl_text_context(0), options, levels=CAPTURE["coarse levels"])
    kept = {name for _, name in coarse.features.shapes()}
    assert kept and all(layout_of(sdxl).levels[n] in CAPTURE["coarse levels"] for n in kept)
    assert torch.isfinite(sample(applied(sdxl, coarse), pos, neg)).all()


def test_sdxl_eaa_delta_of_a_deep_block_equals_an_independent_recomputation(sdxl):
    blocks = layout_of(sdxl).blocks
    name = next(n for n in blocks if n.endswith(".1"))  # the second transformer of a depth > 1 stage
    stage, number, index = name.split(".")
    tb = blocks[name]
    dim = tb.attn1.to_q.in_features
    g = torch.Generator().manual_seed(2)
    x, f_s = torch.randn(2, 16, dim, generator=g), torch.randn(1, 25, dim, generator=g)
    text = sdxl_text_context(3, batch=2)
    app = Application(init_from_model(""), encode(sdxl, sdxl_text_context(0), {"pooled_output": sdxl_pooled_output(0)}),
                      sdxl, 0.6, 0.0)
    kv = app.injection.project_kv(app.adapter, Features({name: f_s}), "concat")
    options = {"patches": patch_lists(), "block": (stage, int(number)), "block_index": int(index),
               "cond_or_uncond": [0, 1], "activations_shape": [2, dim, 4, 4], "original_shape": [2, 4, 8, 8],
               CALL: Call([Step(app.injection, kv)])}
    with torch.no_grad():
        got = tb(x, context=text, transformer_options=options)
        a1 = tb.attn1
        n = tb.norm1(x)
        A = softmax_attention(n @ a1.to_q.weight.T, n @ a1.to_k.weight.T, n @ a1.to_v.weight.T, heads=a1.heads)
        E = softmax_attention(n @ a1.to_q.weight.T, f_s @ a1.to_k.weight.T, f_s @ a1.to_v.weight.T, heads=a1.heads)
        h = (A + 0.6 * E) @ a1.to_out[0].weight.T + a1.to_out[0].bias + x
        h = h + tb.attn2(tb.norm2(h), context=text)
        expected = h + tb.ff(tb.norm3(h))
    assert torch.allclose(got, expected, atol=5e-5, rtol=1e-4), (got - expected).abs().max()


# --------------------------------------------------------------------------------------------------- SD2.x, inpaint
def test_sd2_v_prediction_runs_the_whole_pack():
    model = models.tiny_sd21v_model()
    assert model.model.model_type.name == "V_PREDICTION" and default_resolution(model) == 768
    ctx = models.text_context(1, width=1024)
    ref = encode(model, ctx)
    pos, neg = [[ctx, {}]], [[torch.zeros_like(ctx), {}]]
    passes = ref.features.passes
    out = sample(applied(model, ref), pos, neg)
    assert ref.features.passes - passes == 1  # sigma_max only: every other step reuses the inversion's features
    assert torch.isfinite(out).all() and not torch.equal(out, sample(model, pos, neg))


@pytest.mark.parametrize("make", [models.tiny_sd15_inpaint_model, lambda: tiny_sdxl_model(in_channels=9)],
                         ids=["sd15", "sdxl"])
def test_inpainting_unets_get_a_concat_input_in_the_reference_pass(make):
    model = make()
    xl = isinstance(model.model.model_config, comfy.supported_models.SDXL)
    ctx = sdxl_text_context(1) if xl else models.text_context(1)
    options = {"pooled_output": sdxl_pooled_output(1)} if xl else {}
    conds = conds_for(model, ctx, options)
    # ComfyUI's own concat for a generation without an image to inpaint: a full mask and a blank image
    assert conds["c_concat"].shape == (1, 5, 8, 8) and torch.equal(conds["c_concat"][:, :1], torch.ones(1, 1, 8, 8))
    ref = encode(model, ctx, options)
    pos, neg = [[ctx, dict(options)]], [[torch.zeros_like(ctx), dict(options)]]
    out = sample(applied(model, ref), pos, neg)
    assert torch.isfinite(out).all() and not torch.equal(out, sample(model, pos, neg))


# --------------------------------------------------------------------------------------------------- refusals
def test_families_the_pack_cannot_serve_get_one_clear_error():
    """Chroma Radiance: Flux's blocks on pixels with a head of its own (a Flux subclass the pack has no layout for)."""
    from support.flux_models import tiny_chroma_radiance_model

    with pytest.raises(ModelFamilyError) as refused:
        check_served(tiny_chroma_radiance_model())
    message = str(refused.value)
    assert "cannot use this ChromaRadiance model" in message and "SD1.x, SD2.x" in message and "SDXL" in message
    assert "Flux.1" in message and "Chroma" in message.split("it serves")[1]
    assert "\n" not in message
