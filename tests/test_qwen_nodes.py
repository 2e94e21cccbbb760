"""Qwen-Image through the pack's nodes, in-process (a tiny random Qwen-Image and a tiny random Wan 2.1 VAE from
ComfyUI's own classes): the MM-DiT node behaviour of tests/test_flux_nodes.py on its 5-D latents and its attention
override: encode and apply, strength 0 and the sigma window bit-identical to plain, the input model untouched, masks,
cond only, several photos, block weights, rows and positions, two Applies and another override user in either order,
a trained joint adapter file, and Flux references refused on it (and its references on Flux).

A separate file, not a third family of test_flux_nodes.py: its latents are 5-D, its captions carry no guidance or
pooled vector, its blocks are all "double" and its term is added in the attention override, so most of that file's
helpers (noise, conditioning, block deltas, the LoRA and EasyCache hooks on ``double_blocks``) would branch on it.
No server test: ComfyUI builds Qwen-Image's text encoder (Qwen2.5-VL 7B) at full size whatever the file holds."""
import pytest
import torch

import comfy.sample
import comfy.sd
import comfy.utils
from invadapter_core.arch.fit import check_served, default_resolution
from invadapter_core.arch.layout import ModelFamilyError, layout_of
from invadapter_core.arch.levels import DIT_LEVELS
from invadapter_core.reference.encode import reference_conds, sampler_sigmas
from invadapter_core.reference.reference import load_reference, save_reference
from support import flux_files
from support.flux_models import flux_text, tiny_flux_model
from support.qwen_models import qwen_text, tiny_qwen_image_model, tiny_wan_vae
from test_flux_nodes import adapter, apply, check_trained_joint_file_applies, node  # noqa: F401 - shared
from test_qwen_image import one_call

RES = 64  # pixels: a [1, 16, 1, 8, 8] latent, a 4x4 token grid
STEPS = 4
TXT = 7
SHAPE = (1, 16, 1, RES // 8, RES // 8)
UNET_LEVELS = ("input_high", "input_mid", "input_low", "middle", "output_low", "output_mid", "output_high")



@pytest.fixture(scope="module")
def vae():
    return tiny_wan_vae()


@pytest.fixture(scope="module")
def model():
    return tiny_qwen_image_model()


def caption(seed=0):
    return [[qwen_text(seed, TXT), {}]]


def photo(seed):
    return torch.rand(1, RES, RES, 3, generator=torch.Generator().manual_seed(seed))



@pytest.fixture(scope="module")
def encode(node, model, vae):
    def run(seed=1, image=None):
        return node("InvAdapterEncodeReference", model, vae, photo(seed) if image is None else image, caption(),
                    STEPS, "simple", RES, True)[0]
    return run


@pytest.fixture(scope="module")
def reference(encode):
    return encode()



def sample(model, cfg=1.0, seed=0):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "simple", caption(), caption(seed=7),
                               torch.zeros_like(noise), disable_pbar=True, seed=seed)


def block_delta(applied, plain, name="double.0", batch=1, chunks=None):
    """The change the applied model makes to one block's joint attention output (text rows, then image rows) in one
    call at the schedule's second sigma, whose K/V the reference keeps (an off-schedule sigma would run a reference
    pass inside the call, which the block hooks would record too); the block's input is the same as plain's when no
    earlier block has a term."""
    sigma = float(sampler_sigmas(plain, STEPS, "simple")[1])
    x = torch.randn(batch, *SHAPE[1:], generator=torch.Generator().manual_seed(3))
    conds = reference_conds(plain, qwen_text(0, TXT).expand(batch, -1, -1), {}, x, (RES, RES))
    if chunks is not None:
        applied = applied.clone()
        applied.model_options["transformer_options"]["cond_or_uncond"] = chunks
    return one_call(applied, x, sigma, conds, name)[1][name] - one_call(plain, x, sigma, conds, name)[1][name]


def custom(node, **dit):
    unet = {f"{k}_{lv}": 1.0 for k in ("self", "cross") for lv in UNET_LEVELS}
    return node("InvAdapterBlockWeights", "custom", **unet,
                **{f"dit_{lv}": dit.get(lv, 0.0) for lv in DIT_LEVELS})[0]


# ---------------------------------------------------------------------------------------------- encode and apply
def test_encode_and_apply_through_the_nodes(model, reference, apply):
    check_served(model)
    assert reference.family == layout_of(model).family == "QwenImage"
    assert reference.resolution == (RES, RES) and len(reference.features) == STEPS - 1  # no pass at sigma max
    assert tuple(reference.states.shape[1:]) == SHAPE and set(reference.conds) == {"c_crossattn"}
    assert set(reference.features.get(reference.features.sigmas()[0]).self_attn) == set(layout_of(model).blocks)
    assert default_resolution(model) == 512
    assert reference.features.get(float(sampler_sigmas(model, STEPS, "simple")[1])) is not None  # block_delta's
    plain = sample(model)
    applied = apply(model, reference)
    out = sample(applied)
    assert applied is not model and torch.isfinite(out).all() and not torch.equal(out, plain)


def test_strength_zero_and_a_window_outside_sampling_are_bit_identical(model, reference, apply):
    plain = sample(model)
    assert torch.equal(sample(apply(model, reference, weight=0.0)), plain)
    assert not apply(model, reference, weight=0.0).wrappers
    assert torch.equal(sample(apply(model, reference, start=0.999, end=1.0)), plain)
    assert not torch.equal(sample(apply(model, reference, start=0.0, end=0.3)), plain)


def test_the_input_model_is_untouched(model, reference, apply):
    options, wrappers = repr(model.model_options), repr(model.wrappers)
    plain = sample(model)
    apply(model, reference)
    assert repr(model.model_options) == options and repr(model.wrappers) == wrappers
    assert "optimized_attention_override" not in model.model_options["transformer_options"]
    assert torch.equal(sample(model), plain)


# ---------------------------------------------------------------------------------------------- options
def test_two_identities_with_masks_each_act_only_in_their_region(model, encode, apply, node):
    a, b = encode(seed=1), encode(seed=2)
    left = torch.zeros(1, RES, RES)
    left[:, :, :RES // 2] = 1.0
    right = 1.0 - left
    bw = custom(node, double_early=1.0)
    cols = torch.arange(16) % 4  # the 4x4 image tokens, row-major
    in_left = torch.cat((torch.zeros(TXT, dtype=torch.bool), cols < 2))
    in_right = torch.cat((torch.zeros(TXT, dtype=torch.bool), cols >= 2))
    da = block_delta(apply(model, a, mask=left, block_weights=bw), model)
    db = block_delta(apply(model, b, mask=right, block_weights=bw), model)
    assert da[:, in_left].abs().amax() > 0.05 and torch.equal(da[:, ~in_left], torch.zeros_like(da[:, ~in_left]))
    assert db[:, in_right].abs().amax() > 0.05 and torch.equal(db[:, ~in_right], torch.zeros_like(db[:, ~in_right]))
    both = block_delta(apply(apply(model, a, mask=left, block_weights=bw), b, mask=right, block_weights=bw), model)
    assert torch.allclose(both, da + db, atol=1e-6)
    assert not torch.equal(sample(apply(apply(model, a, mask=left), b, mask=right)), sample(model))


def test_cond_only_leaves_the_uncond_rows_untouched(model, reference, apply):
    cond_only = apply(model, reference, apply_to="cond only")
    both = apply(model, reference)
    delta = block_delta(cond_only, model, batch=2, chunks=[0, 1])
    assert delta[0].abs().amax() > 0.05 and torch.equal(delta[1], torch.zeros_like(delta[1]))
    full = block_delta(both, model, batch=2, chunks=[0, 1])
    assert full[1].abs().amax() > 0.05 and torch.allclose(delta[0], full[0], atol=1e-6)
    assert not torch.equal(sample(cond_only, cfg=3.0), sample(both, cfg=3.0))


def test_several_photos_concat_or_average(model, encode, apply, node):
    a, b = encode(seed=1), encode(seed=2)
    pair = node("InvAdapterCombineReferences", a, b)[0]
    assert pair.images == 2 and len(pair.features) == STEPS - 1
    twice = node("InvAdapterCombineReferences", a, a)[0]
    single = sample(apply(model, a))
    for combine in ("concat", "average"):
        assert torch.allclose(sample(apply(model, twice, combine=combine)), single, atol=1e-5)
    concat, average = (sample(apply(model, pair, combine=c)) for c in ("concat", "average"))
    assert not torch.allclose(concat, average) and not torch.allclose(concat, single)


def test_dit_block_weights_by_level(model, reference, apply, node):
    """Qwen-Image's blocks are all double blocks (levels double_early and double_late): 'double only' is every block
    there, and a level's slider acts on its blocks only."""
    assert set(layout_of(model).levels.values()) == {"double_early", "double_late"}
    plain = sample(model)
    assert torch.equal(sample(apply(model, reference, block_weights=custom(node))), plain)
    double = node("InvAdapterBlockWeights", "double only")[0]
    assert torch.equal(sample(apply(model, reference, block_weights=double)), sample(apply(model, reference)))
    early = custom(node, double_early=1.0)
    assert torch.equal(block_delta(apply(model, reference, block_weights=early), model, name="double.0"),
                       block_delta(apply(model, reference), model, name="double.0"))
    # double.2 (double_late) gets no term of its own; its output moves only through its changed input
    late_only = block_delta(apply(model, reference, block_weights=custom(node, double_late=1.0)), model, "double.2")
    assert late_only.abs().amax() > 0.05
    assert torch.equal(block_delta(apply(model, reference, block_weights=custom(node, double_late=1.0)), model,
                                   "double.0"), torch.zeros(1, TXT + 16, 32))


def test_rows_and_reference_positions(model, reference, apply):
    image = block_delta(apply(model, reference), model)
    both = block_delta(apply(model, reference, rows="image and text"), model)
    assert torch.equal(image[:, :TXT], torch.zeros_like(image[:, :TXT])) and both[:, :TXT].abs().amax() > 0.05
    assert torch.allclose(both[:, TXT:], image[:, TXT:], atol=1e-6)
    shifted = block_delta(apply(model, reference, reference_positions="shifted"), model)
    assert not torch.allclose(shifted, image)


# ---------------------------------------------------------------------------------------------- composition
def test_two_applies_compose_in_either_order(model, encode, apply):
    a, b = encode(seed=1), encode(seed=2)
    ab = sample(apply(apply(model, a, weight=0.6), b, weight=0.8))
    ba = sample(apply(apply(model, b, weight=0.8), a, weight=0.6))
    assert torch.allclose(ab, ba, atol=1e-5) and not torch.allclose(ab, sample(apply(model, a, weight=0.6)))


def halve(func, *args, **kwargs):
    """Another pack's optimized_attention_override (the attention output halved)."""
    return func(*args, **kwargs) * 0.5


def test_another_attention_override_user_composes_in_either_order(model, reference, apply):
    other_first = model.clone()
    other_first.model_options["transformer_options"]["optimized_attention_override"] = halve
    other_first = apply(other_first, reference)
    ours_first = apply(model, reference).clone()
    ours_first.model_options["transformer_options"]["optimized_attention_override"] = halve
    other_only = model.clone()
    other_only.model_options["transformer_options"]["optimized_attention_override"] = halve
    result = sample(other_first)
    assert torch.equal(result, sample(ours_first)) and not torch.equal(result, sample(other_only))
    assert other_first.model_options["transformer_options"]["optimized_attention_override"] is halve  # not clobbered


# ---------------------------------------------------------------------------------------------- files and families
def test_flux_and_qwen_image_references_are_refused_on_each_other_naming_both(model, reference, apply, node,
                                                                            tmp_path):
    path = str(tmp_path / "qwen-identity.safetensors")
    save_reference(reference, path)
    loaded = load_reference(path)
    assert loaded.family == "QwenImage" and torch.equal(sample(apply(model, loaded)), sample(apply(model, reference)))
    flux = tiny_flux_model()
    with pytest.raises(ModelFamilyError) as refused:
        apply(flux, loaded)
    message = str(refused.value)
    assert "encoded with a QwenImage model" in message and "Flux" in message and "\n" not in message
    flux_vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(flux_files.flux_vae_file())))
    ctx, opts = flux_text(0)
    flux_reference = node("InvAdapterEncodeReference", flux, flux_vae, photo(1), [[ctx, dict(opts, guidance=3.5)]],
                          STEPS, "simple", RES, True)[0]
    with pytest.raises(ModelFamilyError) as refused:
        apply(model, flux_reference)
    message = str(refused.value)
    assert "encoded with a Flux model" in message and "QwenImage" in message and "\n" not in message


def test_a_trained_joint_adapter_file_runs_through_apply(model, reference, node, tmp_path):
    check_trained_joint_file_applies(model, reference, node, tmp_path / "qwen.safetensors", "QwenImage",
                                     lambda applied: block_delta(applied, model))


def test_a_qwen_image_computing_in_bf16_encodes_and_applies(node, adapter, vae):
    """A tiny Qwen-Image built in bfloat16 (no manual cast: its blocks and the override's term run in bf16): encode
    and apply run, the sampled latent is finite and differs from plain."""
    import comfy.supported_models
    from support.models import model_config, random_patcher
    from support.qwen_models import UNET_CONFIG

    qwen = random_patcher(model_config(comfy.supported_models.QwenImage, dict(UNET_CONFIG), torch.bfloat16))
    assert qwen.model.get_dtype_inference() == torch.bfloat16 and qwen.model.manual_cast_dtype is None
    ref = node("InvAdapterEncodeReference", qwen, vae, photo(1), caption(), STEPS, "simple", RES, True)[0]
    applied = node("InvAdapterApply", qwen, adapter, ref, 1.0, 1.0, 0.0, 1.0, "concat", "cond and uncond")[0]
    out, plain = sample(applied), sample(qwen)
    assert torch.isfinite(out).all() and torch.isfinite(plain).all() and not torch.equal(out, plain)
