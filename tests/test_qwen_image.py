"""Qwen-Image in the core (issue 20's second MM-DiT family; the nodes on it: tests/test_qwen_nodes.py): the layout as ComfyUI's patches
see it, flow inversion on a tiny random Qwen-Image, the reference's K/V capture, and the EAA added in the attention
override slot, checked against an independent recomputation through the block's own projections, QK-norm and a RoPE
written out (``test_flux.rope``)."""
import math

import pytest
import torch

import comfy.sample
from invadapter_core.adapter.joint import JointApplication, install_joint
from invadapter_core.arch.fit import check_served, default_resolution, is_joint
from invadapter_core.arch.layout import ModelFamilyError, layout_of
from invadapter_core.arch.levels import DIT_LEVELS
from invadapter_core.arch.qwen_image import QwenImageLayout
from invadapter_core.reference.encode import invert_latent, reference_conds
from support.qwen_models import qwen_text, tiny_qwen_image_model
from test_flux import check_reference_pass_keeps_image_k_and_v, rope, round_trip_errors

SIDE = 8  # latent side: a 4x4 token grid
TXT = 7
SHAPE = (1, 16, 1, SIDE, SIDE)


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen_image_model()


@pytest.fixture(scope="module")
def text():
    return qwen_text(0, TXT)


def latent(seed, batch=1):
    return torch.randn(batch, *SHAPE[1:], generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference(qwen, text):
    """A random 'face' latent inverted on the tiny Qwen-Image (4 steps), K/V kept at every step."""
    x = latent(5)
    return invert_latent(qwen, x, reference_conds(qwen, text, {}, x, (64, 64)), 4, "simple", (64, 64))


def sample(model, text, steps=3, seed=0):
    cond = [[text, {}]]
    return comfy.sample.sample(model, latent(seed), steps, 1.0, "euler", "simple", cond, cond, torch.zeros(SHAPE),
                               disable_pbar=True, seed=seed)


# ------------------------------------------------------------------------------------------------------- layout
def test_the_layout_names_every_block_as_the_patches_see_it(qwen, text):
    layout = layout_of(qwen)
    assert isinstance(layout, QwenImageLayout) and layout_of(qwen.clone()) is layout
    assert list(layout.blocks) == ["double.0", "double.1", "double.2"]
    assert [layout.levels[n] for n in layout.blocks] == ["double_early", "double_early", "double_late"]
    assert set(layout.levels.values()) <= set(DIT_LEVELS)
    assert layout.family == "QwenImage" and layout.latent_channels == 16 and layout.context_dim == 32
    assert layout.adm_channels is None and layout.dims["double.2"] == (32, 32) and not layout.guidance_embed
    assert (layout.heads, layout.head_dim) == (2, 16) and layout.ADDS_TERM == "attention override"
    seen = []
    m = qwen.clone()
    m.set_model_attn1_patch(lambda q, k, v, pe=None, attn_mask=None, extra_options=None:
                            seen.append((layout.block_at(extra_options), extra_options["img_slice"], q.shape)) or {})
    sample(m, text, steps=1)
    tokens = TXT + 16
    assert layout.grids((SIDE, SIDE))["double.0"] == (4, 4) and layout.tokens(8 * SIDE) == dict.fromkeys(
        layout.blocks, 16)
    assert seen == [(name, [TXT, tokens], (1, 2, tokens, 16)) for name in layout.blocks]


def test_qwen_image_is_served_and_named_in_the_refusals_of_other_models(qwen):
    check_served(qwen)  # the nodes serve it (tests/test_qwen_nodes.py)
    assert is_joint(qwen) and default_resolution(qwen) == 512
    from support.flux_models import tiny_chroma_radiance_model  # a network no layout serves
    with pytest.raises(ModelFamilyError) as refused:
        check_served(tiny_chroma_radiance_model())
    message = str(refused.value)
    assert "Qwen-Image" in message.split("it serves")[1] and "\n" not in message


def test_a_reference_pass_keeps_every_blocks_image_k_and_v(qwen, text):
    x = latent(2)
    check_reference_pass_keeps_image_k_and_v(qwen, x, reference_conds(qwen, text, {}, x, (64, 64)))


# ------------------------------------------------------------------------------------------------- flow inversion
def test_inversion_on_a_tiny_qwen_image_keeps_features_and_samples_back(qwen, reference):
    """The model's own flow schedule (shift 1.15), features at every inverted sigma, and the inversion's Euler step
    on the network is ComfyUI's sampler's: first-order round trips (4x the steps, well under half the error)."""
    sigmas = reference.sigmas.tolist()
    assert reference.features.sigmas() == pytest.approx(sigmas[:-1]) and sigmas[-1] == pytest.approx(1.0)
    assert reference.states.shape == (len(sigmas), *SHAPE) and set(reference.conds) == {"c_crossattn"}
    errors = round_trip_errors(qwen, reference)
    assert errors[1] < 0.45 * errors[0], errors


# ------------------------------------------------------------------------------------------------- the joint EAA
def test_strength_zero_and_steps_outside_the_window_are_bit_identical_to_plain(qwen, text, reference):
    plain = sample(qwen, text)
    assert torch.equal(sample(install_joint(qwen, JointApplication(qwen, reference, 0.0)), text), plain)
    none = dict.fromkeys(DIT_LEVELS, 0.0)
    assert torch.equal(sample(install_joint(qwen, JointApplication(qwen, reference, 1.0, block_weights=none)), text),
                       plain)
    outside = install_joint(qwen, JointApplication(qwen, reference, 1.0, sigma_start=0.05, sigma_end=0.01))
    assert torch.equal(sample(outside, text), plain)
    inside = install_joint(qwen, JointApplication(qwen, reference, 1.0))
    assert "attn1_patch" not in inside.model_options["transformer_options"].get("patches", {})
    assert not torch.equal(sample(inside, text), plain)
    assert torch.equal(sample(qwen, text), plain)  # the model it was installed on is untouched
    assert "optimized_attention_override" not in qwen.model_options["transformer_options"]


def one_call(model, x, sigma, conds, name):
    """One apply_model call of a clone of ``model`` (through its APPLY_MODEL wrappers): the named block's inputs
    (ComfyUI's block replacement) and every block's joint attention output before its output projections (the text
    rows then the image rows, read at the inputs of ``to_add_out`` and ``to_out``)."""
    m = model.clone()
    inputs, outputs = {}, {}
    layout = layout_of(m)

    def replace(args, extra):
        inputs.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items() if k != "pe"})
        return extra["original_block"](args)

    m.set_model_patch_replace(replace, "dit", "double_block", int(name.split(".")[1]))
    hooks = []
    for block_name, block in layout.blocks.items():
        parts = {}

        def keep(part, block_name=block_name, parts=parts):
            def hook(module, args):
                parts[part] = args[0].clone()
                if len(parts) == 2:
                    outputs[block_name] = torch.cat((parts["txt"], parts["img"]), dim=1)
            return hook
        hooks += [block.attn.to_add_out.register_forward_pre_hook(keep("txt")),
                  block.attn.to_out[0].register_forward_pre_hook(keep("img"))]
    options = {**m.model_options["transformer_options"], "wrappers": m.wrappers}  # as sampling merges them
    try:
        with torch.no_grad():
            m.model.apply_model(x, torch.full((x.shape[0],), sigma), transformer_options=options, **conds)
    finally:
        for h in hooks:
            h.remove()
    return inputs, outputs


def block_qkv(block, args, txt):
    """q, k, v [B, heads, L, d] of a Qwen-Image block's joint attention from its inputs, through its own layers
    (modulation, LayerNorm, projections, RMS QK-norm), the text rows first."""
    attn = block.attn
    ln = lambda t: torch.nn.functional.layer_norm(t, t.shape[-1:], eps=1e-6)  # noqa: E731
    heads = lambda t: t.view(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
    out = []
    for stream, mod, projections, norms in (
            ("txt", block.txt_mod, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
             (attn.norm_added_q, attn.norm_added_k)),
            ("img", block.img_mod, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))):
        shift, scale, _ = mod(args["vec"]).chunk(2, dim=-1)[0].chunk(3, dim=-1)
        x = ln(args[stream]) * (1 + scale[:, None]) + shift[:, None]
        q, k, v = (heads(p(x)) for p in projections)
        out.append((norms[0](q), norms[1](k), v))
    return tuple(torch.cat(t, dim=2) for t in zip(*out))


def grid_ids(index: float) -> torch.Tensor:
    """Qwen-Image's image ids of a 4x4 grid written out: (frame index, row − 2, column − 2)."""
    rows, cols = torch.meshgrid(torch.arange(4.0) - 2, torch.arange(4.0) - 2, indexing="ij")
    return torch.stack((torch.full((4, 4), index), rows, cols), -1).reshape(16, 3)


@pytest.mark.parametrize("name, level", [("double.0", "double_early"), ("double.2", "double_late")])
@pytest.mark.parametrize("rows, positions", [("image", "own"), ("image and text", "own"), ("image", "shifted")])
def test_the_eaa_term_equals_an_independent_recomputation(qwen, text, reference, name, level, rows, positions):
    layout = layout_of(qwen)
    lam = 0.7
    sigma = reference.features.sigmas()[1]
    only = {lv: float(lv == level) for lv in DIT_LEVELS}  # earlier blocks unchanged: same block input
    x = latent(3, batch=2)  # batch 2: the folded path
    conds = reference_conds(qwen, text.expand(2, -1, -1), {}, x, (64, 64))
    applied = install_joint(qwen, JointApplication(qwen, reference, lam, block_weights=only, rows=rows,
                                                   positions=positions))
    inputs_eaa, outputs_eaa = one_call(applied, x, sigma, conds, name)
    inputs_plain, outputs_plain = one_call(qwen, x, sigma, conds, name)
    for key, value in inputs_plain.items():
        if torch.is_tensor(value):
            assert torch.equal(inputs_eaa[key], value), key
    delta = outputs_eaa[name] - outputs_plain[name]

    block = layout.blocks[name]
    q, _, _ = block_qkv(block, inputs_plain, TXT)
    ref_inputs, _ = one_call(qwen, reference.latent_at(sigma), sigma, reference.conds, name)
    _, k_ref, v_ref = block_qkv(block, ref_inputs, TXT)
    k_ref, v_ref = k_ref[:, :, TXT:], v_ref[:, :, TXT:]
    axes = [4, 6, 6]
    txt_ids = torch.full((TXT, 3), 2.0) + torch.arange(TXT, dtype=torch.float32)[:, None]  # from max(h, w) // 2
    ids = torch.cat((txt_ids, grid_ids(0.0)))
    first = TXT if rows == "image" else 0
    q_rot = rope(q, ids, axes)[:, :, first:]
    k_rot = rope(k_ref, grid_ids(1.0 if positions == "shifted" else 0.0), axes)
    w = torch.softmax(q_rot @ k_rot.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    e = (w @ v_ref).transpose(1, 2).reshape(2, -1, q.shape[1] * q.shape[-1])
    assert torch.allclose(delta[:, first:], lam * e, atol=1e-5, rtol=1e-4), (delta[:, first:] - lam * e).abs().max()
    assert torch.equal(delta[:, :first], torch.zeros_like(delta[:, :first]))  # text rows untouched by default


def test_it_chains_with_another_attention_override_in_either_order(qwen, text, reference):
    """Another pack's ``optimized_attention_override`` (here: the attention output halved) set before or after the
    EAA is installed gives the same result, the EAA still acts beside it, and two applications add both terms."""
    def halve(func, *args, **kwargs):
        return func(*args, **kwargs) * 0.5

    app = JointApplication(qwen, reference, 0.8)
    other_first = qwen.clone()
    other_first.model_options["transformer_options"]["optimized_attention_override"] = halve
    other_first = install_joint(other_first, app)
    ours_first = install_joint(qwen, app)
    ours_first.model_options["transformer_options"]["optimized_attention_override"] = halve
    other_only = qwen.clone()
    other_only.model_options["transformer_options"]["optimized_attention_override"] = halve
    a = sample(other_first, text)
    assert torch.equal(a, sample(ours_first, text))
    assert not torch.equal(a, sample(other_only, text)) and not torch.equal(a, sample(install_joint(qwen, app), text))
    only = {lv: float(lv == "double_early") for lv in DIT_LEVELS}
    x = latent(3)
    conds = reference_conds(qwen, text, {}, x, (64, 64))
    sigma = reference.features.sigmas()[1]
    twice = install_joint(install_joint(qwen, JointApplication(qwen, reference, 0.8, block_weights=only)),
                          JointApplication(qwen, reference, 0.4, block_weights=only))
    once = install_joint(qwen, JointApplication(qwen, reference, 1.2, block_weights=only))
    plain = one_call(qwen, x, sigma, conds, "double.0")[1]["double.0"]
    got = one_call(twice, x, sigma, conds, "double.0")[1]["double.0"] - plain
    want = one_call(once, x, sigma, conds, "double.0")[1]["double.0"] - plain
    assert torch.allclose(got, want, atol=1e-5) and got.abs().max() > 0.1
