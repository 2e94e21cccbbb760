"""Flux in the core: the layout as ComfyUI's patches see it, flow
inversion (exact on a known velocity field, and on a tiny random Flux with its guidance embedding), the reference's
K/V capture, and the EAA inside the joint attention, checked against an independent recomputation through the
block's own q/k/v, QK-norm and a RoPE written out here."""
import math

import pytest
import torch

import comfy.k_diffusion.sampling as kds
import comfy.sample
import comfy.samplers
from invadapter_core.adapter.joint import JointApplication, install_joint
from invadapter_core.arch.fit import check_served
from invadapter_core.arch.flux import FluxLayout, split_kv
from invadapter_core.arch.layout import ModelFamilyError, layout_of
from invadapter_core.arch.levels import DIT_LEVELS
from invadapter_core.reference.capture import reference_pass
from invadapter_core.reference.encode import reference_conds, invert_latent
from invadapter_core.reference.inversion import invert, inversion_sigmas
from support.flux_models import flux_text, tiny_flux_model

SIDE = 8  # latent side: a 4x4 token grid


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_model()


@pytest.fixture(scope="module")
def text():
    return flux_text(0)


@pytest.fixture(scope="module")
def reference(flux, text):
    """A random 'face' latent inverted on the tiny Flux (4 steps, guidance 3.5), K/V kept at every step."""
    ctx, opts = text
    latent = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    conds = reference_conds(flux, ctx, dict(opts, guidance=3.5), latent, (8 * SIDE, 8 * SIDE))
    return invert_latent(flux, latent, conds, 4, "simple", (8 * SIDE, 8 * SIDE))


def sample(model, text, steps=3, seed=0):
    ctx, opts = text
    noise = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    cond = [[ctx, dict(opts, guidance=3.5)]]
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond,
                               torch.zeros(1, 16, SIDE, SIDE), disable_pbar=True, seed=seed)


def round_trip_errors(model, reference, steps=(3, 12)) -> list[float]:
    """Relative error of inverting the reference's clean latent on the network over ``steps`` steps and sampling it
    back with ComfyUI's Euler sampler (the inversion step is its Euler step: the error is first order in the step)."""
    base, conds, x0 = model.model, reference.conds, reference.states[0]
    denoise = lambda x, sig: base.apply_model(x, torch.full((1,), float(sig)), **conds)  # noqa: E731
    errors = []
    for n in steps:
        sigmas = inversion_sigmas([0.02 + 0.98 * i / n for i in range(n + 1)])
        with torch.no_grad():
            states = invert(denoise, x0, sigmas)
            back = kds.sample_euler(lambda x, sig: denoise(x, sig[0]), states[-1], torch.tensor(sigmas[::-1]),
                                    disable=True)
        errors.append(float((back - x0).norm() / x0.norm()))
    return errors

# ------------------------------------------------------------------------------------------------------- layout
def test_the_layout_names_every_block_as_the_patches_see_it(flux, text):
    layout = layout_of(flux)
    assert isinstance(layout, FluxLayout) and layout_of(flux.clone()) is layout
    assert list(layout.blocks) == ["double.0", "double.1", "single.0", "single.1"]
    assert set(layout.levels.values()) <= set(DIT_LEVELS)
    assert layout.family == "Flux" and layout.latent_channels == 16 and layout.context_dim == 32
    assert layout.adm_channels == 8 and layout.dims["single.1"] == (32, 32) and layout.guidance_embed
    seen = []
    m = flux.clone()
    m.set_model_attn1_patch(lambda q, k, v, pe=None, attn_mask=None, extra_options=None:
                            seen.append((layout.block_at(extra_options), extra_options["img_slice"], q.shape)) or {})
    sample(m, text, steps=1)
    (h, w), tokens = layout.grids((SIDE, SIDE))["double.0"], 7 + 16
    assert (h, w) == (4, 4) and layout.tokens(8 * SIDE) == dict.fromkeys(layout.blocks, 16)
    assert seen == [(name, [7, tokens], (1, 2, tokens, 16)) for name in layout.blocks]


def test_flux_is_served_and_a_flux_subclass_is_refused_in_one_line(flux):
    """Flux and Chroma are served; Chroma Radiance (a Flux subclass on pixels, with its own head) is refused in one
    line naming what is served."""
    from support.flux_models import tiny_chroma_radiance_model

    check_served(flux)
    with pytest.raises(ModelFamilyError) as refused:
        check_served(tiny_chroma_radiance_model())
    message = str(refused.value)
    assert "cannot use this ChromaRadiance model" in message and "ChromaRadiance" in message.split("(")[1]
    served = message.split("it serves")[1]
    assert "SD1.x" in served and "Flux.1" in served and "Chroma" in served and "\n" not in message


def test_a_reference_pass_keeps_every_blocks_image_k_and_v(flux, text):
    ctx, opts = text
    x = torch.randn(1, 16, SIDE, SIDE)
    check_reference_pass_keeps_image_k_and_v(flux, x, reference_conds(flux, ctx, dict(opts), x, (64, 64)))


def check_reference_pass_keeps_image_k_and_v(model, x, conds):
    """What a reference pass keeps of every block is the image tokens' K (before RoPE) and V that the block's
    attn1_patch is handed, and its size is the layout's arithmetic (shared with the other MM-DiT families' tests)."""
    layout = layout_of(model)
    seen = {}
    m = model.clone()

    def record(q, k, v, pe=None, attn_mask=None, extra_options=None):
        s, e = extra_options["img_slice"][0], extra_options["img_slice"][-1]
        seen[layout.block_at(extra_options)] = (k[:, :, s:e].clone(), v[:, :, s:e].clone())
        return {}

    m.set_model_attn1_patch(record)
    m.model.apply_model(x, torch.tensor([0.6]), transformer_options=m.model_options["transformer_options"], **conds)
    _, features = reference_pass(model.model, x, 0.6, conds, layout, cross=False)
    assert set(features.self_attn) == set(layout.blocks)
    for name, f in features.self_attn.items():
        assert f.shape == (1, 16, 2 * 32)
        k, v = split_kv(f, layout.heads)
        assert torch.equal(k, seen[name][0]) and torch.equal(v, seen[name][1])  # K before RoPE, as the patch sees it
    assert layout.feature_bytes_per_step(64, bytes_per_value=4) == sum(f.numel() * 4 for f in
                                                                      features.self_attn.values())


# ------------------------------------------------------------------------------------------------- flow inversion
def gaussian_denoiser(mu: float, s: float):
    """The exact x0 prediction of rectified flow (x_σ = (1 − σ)·x0 + σ·ε) for data x0 ~ N(mu, s²)."""
    def denoise(x, sigma):
        a = 1.0 - sigma
        return mu + a * s * s / (a * a * s * s + sigma * sigma) * (x - a * mu)
    return denoise


@pytest.mark.parametrize("convention", ["lowest sigma", "classic"])
def test_flow_inversion_converges_on_a_known_velocity_field(convention):
    """With the exact denoiser of Gaussian data, inverting from σ = 0.02 (or 0) to 1 and sampling back with
    ComfyUI's Euler reconstructs the latent, and the inverted noise matches the exact flow map, with first-order
    errors (a quarter for four times the steps) falling towards 0."""
    mu, s = 0.3, 0.5
    denoise = gaussian_denoiser(mu, s)
    x0 = mu + s * torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    round_trip, endpoint = [], []
    for steps in (4, 16, 64, 256):
        lo = 0.02
        sigmas = inversion_sigmas([lo + (1 - lo) * i / steps for i in range(steps + 1)], convention)
        states = invert(denoise, x0, sigmas, convention=convention)
        back = kds.sample_euler(lambda x, sig: denoise(x, float(sig[0])), states[-1],
                                torch.tensor(sigmas[::-1], dtype=torch.float64), disable=True)
        # the probability-flow ODE of Gaussian data keeps z = (x − (1 − σ)·mu) / std(σ) constant
        start = sigmas[0]
        z = (x0 - (1 - start) * mu) / math.sqrt((1 - start) ** 2 * s * s + start * start)
        round_trip.append(float((back - x0).norm() / x0.norm()))
        endpoint.append(float((states[-1] - z).norm() / z.norm()))
    for errors in (round_trip, endpoint):
        assert all(b < 0.35 * a for a, b in zip(errors, errors[1:])), errors
        assert errors[-1] < 0.015, errors


def test_inversion_on_a_tiny_flux_passes_its_guidance_and_samples_back(flux, text, reference):
    ctx, opts = text
    assert set(reference.conds) == {"c_crossattn", "y", "guidance"} and float(reference.conds["guidance"]) == 3.5
    sigmas = reference.sigmas.tolist()
    assert reference.features.sigmas() == pytest.approx(sigmas[:-1])
    latent = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    unguided = invert_latent(flux, latent, dict(reference.conds, guidance=torch.tensor([1.0])), 4, "simple",
                             (64, 64), keep_features=False)
    assert not torch.allclose(unguided.states[-1], reference.states[-1])  # the guidance embedding was used
    # the inversion step on the network is the Euler step of ComfyUI's sampler: first-order round trips
    errors = round_trip_errors(flux, reference)
    assert errors[1] < 0.45 * errors[0], errors  # measured: 1.1 at 4 steps, 0.37 at 16, 0.086 at 64


# ------------------------------------------------------------------------------------------------- the joint EAA
def test_strength_zero_and_steps_outside_the_window_are_bit_identical_to_plain(flux, text, reference):
    plain = sample(flux, text)
    zero = install_joint(flux, JointApplication(flux, reference, 0.0))
    assert torch.equal(sample(zero, text), plain)
    no_blocks = install_joint(flux, JointApplication(flux, reference, 1.0, block_weights=dict.fromkeys(DIT_LEVELS,
                                                                                                         0.0)))
    assert torch.equal(sample(no_blocks, text), plain)
    outside = install_joint(flux, JointApplication(flux, reference, 1.0, sigma_start=0.05, sigma_end=0.01))
    assert torch.equal(sample(outside, text), plain)
    inside = install_joint(flux, JointApplication(flux, reference, 1.0))
    assert not torch.equal(sample(inside, text), plain)
    assert torch.equal(sample(flux, text), plain)  # the model it was installed on is untouched


def rope(x, ids, axes_dim, theta=10000):
    """Flux's RoPE written out: per axis, the pairs (x[2j], x[2j+1]) rotated by pos · theta^(−2j/dim)."""
    out, pair = x.clone(), 0
    for axis, dim in enumerate(axes_dim):
        for j in range(dim // 2):
            angle = ids[:, axis].double() * theta ** (-2.0 * j / dim)
            c, s = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
            a, b = x[..., 2 * pair], x[..., 2 * pair + 1]
            out[..., 2 * pair], out[..., 2 * pair + 1] = c * a - s * b, s * a + c * b
            pair += 1
    return out


def block_qkv(block, args, kind):
    """q, k, v [B, heads, L, d] of a block's joint attention from its inputs, through its own layers (QK-norm
    included); the text rows first, as the block concatenates them."""
    heads = block.num_heads
    split = lambda t: t.view(t.shape[0], t.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)  # noqa: E731
    ln = lambda t: torch.nn.functional.layer_norm(t, t.shape[-1:], eps=1e-6)  # noqa: E731
    if kind == "double":
        parts = []
        for stream, attn, mod in (("txt", block.txt_attn, block.txt_mod), ("img", block.img_attn, block.img_mod)):
            m = mod(args["vec"])[0]
            q, k, v = split(attn.qkv(ln(args[stream]) * (1 + m.scale) + m.shift))
            parts.append((attn.norm.query_norm(q), attn.norm.key_norm(k), v))
        return tuple(torch.cat(t, dim=2) for t in zip(*parts))
    m = block.modulation(args["vec"])[0]
    h = block.linear1(ln(args["img"]) * (1 + m.scale) + m.shift)[..., :3 * block.hidden_size]
    q, k, v = split(h)
    return block.norm.query_norm(q), block.norm.key_norm(k), v


def record_inputs(model, names):
    """A clone recording the inputs of the named blocks through ComfyUI's block replacement patches."""
    seen = {}
    for name in names:
        kind, i = name.split(".")

        def replace(args, extra, name=name, kind=kind):
            seen[name] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items() if k != "pe"}
            return extra["original_block"](args)
        model.set_model_patch_replace(replace, "dit", f"{kind}_block", int(i))
    return seen


def record_outputs(model):
    """A clone's attention outputs (before the output projection) per block, in an attn1_output_patch."""
    seen = {}
    layout = layout_of(model)
    model.set_model_attn1_output_patch(lambda attn, extra: seen.__setitem__(layout.block_at(extra), attn.clone())
                                       or attn)
    return seen


@pytest.mark.parametrize("name, level", [("double.0", "double_early"), ("single.0", "single_early")])
@pytest.mark.parametrize("rows", ["image", "image and text"])
def test_the_eaa_term_equals_an_independent_recomputation(flux, text, reference, name, level, rows):
    layout = layout_of(flux)
    lam = 0.7
    sigma = reference.features.sigmas()[1]
    only = {lv: (1.0 if lv == level else 0.0) for lv in DIT_LEVELS}  # earlier blocks unchanged: same block input
    ctx, opts = text
    x = torch.randn(2, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(3))  # batch 2: the folded path
    conds = reference_conds(flux, ctx.expand(2, -1, -1), {k: v.expand(2, -1) for k, v in opts.items()}, x, (64, 64))

    applied = install_joint(flux, JointApplication(flux, reference, lam, block_weights=only, rows=rows))
    inputs_eaa, outputs_eaa = one_call(applied, x, sigma, conds, name)  # the APPLY_MODEL wrapper runs as in sampling
    inputs_plain, outputs_plain = one_call(flux, x, sigma, conds, name)
    for key, value in inputs_plain[name].items():
        if torch.is_tensor(value):
            assert torch.equal(inputs_eaa[name][key], value), key
    delta = outputs_eaa[name] - outputs_plain[name]

    # independent: the generation's q and the reference's K/V through the block's own layers, RoPE written out
    kind = name.split(".")[0]
    block = layout.blocks[name]
    q, _, _ = block_qkv(block, inputs_plain[name], kind)
    ref_x = reference.latent_at(sigma)
    ref_inputs, _ = one_call(flux, ref_x, sigma, reference.conds, name)
    _, k_ref, v_ref = block_qkv(block, ref_inputs[name], kind)
    txt = ctx.shape[1]
    k_ref, v_ref = k_ref[:, :, txt:], v_ref[:, :, txt:]
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 2)
    img_ids = torch.cat((torch.zeros(16, 1), grid), dim=1)
    ids = torch.cat((torch.zeros(txt, 3), img_ids))
    axes = flux.model.diffusion_model.params.axes_dim
    first = txt if rows == "image" else 0
    q_rot = rope(q, ids, axes)[:, :, first:]
    k_rot = rope(k_ref, img_ids, axes)
    w = torch.softmax(q_rot @ k_rot.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    e = (w @ v_ref).transpose(1, 2).reshape(2, -1, q.shape[1] * q.shape[-1])
    assert torch.allclose(delta[:, first:], lam * e, atol=1e-5, rtol=1e-4), (delta[:, first:] - lam * e).abs().max()
    assert torch.equal(delta[:, :first], torch.zeros_like(delta[:, :first]))  # text rows untouched by default


def one_call(model, x, sigma, conds, name):
    """One apply_model call of a clone of ``model`` (through its APPLY_MODEL wrappers), recording the named block's
    inputs and every block's attention output."""
    m = model.clone()
    inputs, outputs = record_inputs(m, [name]), record_outputs(m)
    options = {**m.model_options["transformer_options"], "wrappers": m.wrappers}  # as sampling merges them
    with torch.no_grad():
        m.model.apply_model(x, torch.full((x.shape[0],), sigma), transformer_options=options, **conds)
    return inputs, outputs


def test_it_composes_with_another_attn1_patch_in_either_order(flux, text, reference):
    """Another pack's attn1_patch that changes the joint K/V (here V halved): ours adds the same term whether it
    was installed before or after it, and two applications add both terms."""
    halve_v = lambda q, k, v, pe=None, attn_mask=None, extra_options=None: {"v": v * 0.5}  # noqa: E731
    app = JointApplication(flux, reference, 0.8)
    other_first = flux.clone()
    other_first.set_model_attn1_patch(halve_v)
    other_first = install_joint(other_first, app)
    ours_first = install_joint(flux, app)
    ours_first.set_model_attn1_patch(halve_v)
    assert ours_first.model_options["transformer_options"]["patches"]["attn1_patch"][-1] is halve_v
    assert other_first.model_options["transformer_options"]["patches"]["attn1_patch"][0] is halve_v
    a, b = sample(other_first, text), sample(ours_first, text)
    assert torch.equal(a, b)
    other_only = flux.clone()
    other_only.set_model_attn1_patch(halve_v)
    assert not torch.equal(a, sample(other_only, text))
    # two applications: both terms, each with its own strength (here the same reference: (0.8 + 0.4)·E)
    only = {lv: float(lv == "double_early") for lv in DIT_LEVELS}
    ctx, opts = text
    x = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    conds = reference_conds(flux, ctx, dict(opts), x, (64, 64))
    sigma = reference.features.sigmas()[1]
    twice = install_joint(install_joint(flux, JointApplication(flux, reference, 0.8, block_weights=only)),
                          JointApplication(flux, reference, 0.4, block_weights=only))
    once = install_joint(flux, JointApplication(flux, reference, 1.2, block_weights=only))
    plain = one_call(flux, x, sigma, conds, "double.0")[1]["double.0"]
    got = one_call(twice, x, sigma, conds, "double.0")[1]["double.0"] - plain
    want = one_call(once, x, sigma, conds, "double.0")[1]["double.0"] - plain
    assert torch.allclose(got, want, atol=1e-5) and got.abs().max() > 0.1


def flux_kv_cache(model):
    """ComfyUI's own FluxKVCache node applied to ``model`` (keeps a Kontext image's K/V and re-appends them)."""
    from comfy_extras.nodes_flux import FluxKVCache

    return FluxKVCache.execute(model)[0]


def test_kontext_tokens_get_no_term(flux, text, reference):
    """A Kontext context image's tokens follow the generation's in the joint stream: the EAA adds nothing to them."""
    ctx, opts = text
    kontext = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(9))
    x = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    conds = dict(reference_conds(flux, ctx, dict(opts), x, (64, 64)),
                 ref_latents=[flux.model.process_latent_in(kontext)])
    sigma = reference.features.sigmas()[1]
    _, plain = one_call(flux, x, sigma, conds, "double.0")
    txt = ctx.shape[1]
    for name, level in (("double.0", "double_early"), ("single.1", "single_mid")):  # one block: same block input
        only = {lv: float(lv == level) for lv in DIT_LEVELS}
        applied = install_joint(flux, JointApplication(flux, reference, 1.0, block_weights=only))
        delta = one_call(applied, x, sigma, conds, name)[1][name] - plain[name]
        assert delta.shape[1] == txt + 16 + 16
        assert not torch.equal(delta[:, txt:txt + 16], torch.zeros_like(delta[:, txt:txt + 16]))
        assert torch.equal(delta[:, txt + 16:], torch.zeros_like(delta[:, txt + 16:]))  # Kontext rows: none


def test_flux_kv_cache_composes_in_either_order(text):
    """ComfyUI's FluxKVCache (an attn1_patch keeping a Kontext image's K/V and re-appending them to later calls)
    gives the same result installed before or after the EAA, and the EAA still acts beside it. FluxKVCache runs
    only on global-modulation (Flux.2-style) models in this ComfyUI (on Flux.1 it fails by itself, in its
    timestep-zero modulation), so the tiny Flux here has global modulation."""
    model = tiny_flux_model(global_modulation=True)
    assert isinstance(layout_of(model), FluxLayout)
    ctx, opts = text
    latent = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    ref = invert_latent(model, latent, reference_conds(model, ctx, dict(opts), latent, (64, 64)), 3, "simple",
                        (64, 64))
    kontext = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(9))
    cond = [[ctx, dict(opts, guidance=3.5, reference_latents=[kontext])]]
    noise = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(0))

    def run(m):
        return comfy.sample.sample(m, noise, 3, 1.0, "euler", "simple", cond, cond, torch.zeros(1, 16, SIDE, SIDE),
                                   disable_pbar=True, seed=0)

    app = JointApplication(model, ref, 1.0)
    cache_then_eaa = run(install_joint(flux_kv_cache(model), app))
    eaa_then_cache = run(flux_kv_cache(install_joint(model, app)))
    assert torch.equal(cache_then_eaa, eaa_then_cache)
    assert not torch.equal(cache_then_eaa, run(flux_kv_cache(model)))


def test_warm_runs_make_as_many_model_calls_as_plain_sampling(flux, text, reference):
    """On the inversion's own schedule (4 steps, simple) the reference's K/V are kept at every step but σ_max (an
    inversion never evaluates its last sigma): the first run makes one reference pass there, later runs none."""
    net = flux.model.diffusion_model
    calls = []
    handle = net.register_forward_pre_hook(lambda module, args: calls.append(1))
    applied = install_joint(flux, JointApplication(flux, reference, 1.0))
    counts = []
    try:
        for model in (flux, applied, applied):
            calls.clear()
            sample(model, text, steps=4)
            counts.append(len(calls))
    finally:
        handle.remove()
    assert counts == [4, 5, 4]


def test_chroma_has_the_same_layout_and_takes_the_eaa():
    """Chroma (Flux's blocks, a distilled modulation network, guidance 0 in its conds): the same block names, an
    inversion whose reference pass gets its guidance input, the EAA bit-identical at strength 0 and acting above."""
    from support.flux_models import tiny_chroma_model

    chroma = tiny_chroma_model()
    layout = layout_of(chroma)
    assert isinstance(layout, FluxLayout) and layout.family == "Chroma" and not layout.guidance_embed
    assert list(layout.blocks) == ["double.0", "double.1", "single.0", "single.1"] and layout.adm_channels is None
    ctx, _ = flux_text(0)
    latent = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    conds = reference_conds(chroma, ctx, {}, latent, (64, 64))
    assert set(conds) == {"c_crossattn", "guidance"}  # Chroma's forward needs it: dropping it would fail
    ref = invert_latent(chroma, latent, conds, 3, "simple", (64, 64))
    assert set(ref.features.get(ref.features.sigmas()[0]).self_attn) == set(layout.blocks)
    plain = sample(chroma, (ctx, {}))
    assert torch.equal(sample(install_joint(chroma, JointApplication(chroma, ref, 0.0)), (ctx, {})), plain)
    assert not torch.equal(sample(install_joint(chroma, JointApplication(chroma, ref, 1.0)), (ctx, {})), plain)
