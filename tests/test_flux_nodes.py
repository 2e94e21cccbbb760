"""Flux and Chroma through the pack's nodes, in-process (tiny random models from ComfyUI's own classes, a random
16-channel VAE): encode and apply, strength 0 and the sigma window bit-identical to plain, the input model untouched,
masks, cond only, several photos, block weights, the DiT options, composition with a second Apply and with other
packs' attention patches, a trained joint adapter file, saved references and adapters of the other family refused."""
import pytest
import torch

import comfy.sample
import comfy.sd
import comfy.utils
from invadapter_core.adapter.joint import JointApplication, install_joint
from invadapter_core.adapter.weights import load_adapter, save_adapter
from invadapter_core.arch.fit import default_resolution
from invadapter_core.arch.layout import ModelFamilyError, layout_of
from invadapter_core.arch.levels import DIT_LEVELS
from invadapter_core.files.validation import AdapterFileError
from invadapter_core.reference.encode import invert_latent
from invadapter_core.reference.reference import load_reference, save_reference
from invadapter_core.train.model import build_adapter
from support import flux_files, models
from support.flux_models import flux_text, tiny_chroma_model, tiny_flux_model
from test_flux import one_call

RES = 64  # pixels: an 8x8 latent, a 4x4 token grid
STEPS = 4
NODES = {"InvAdapterLoader": "loader", "InvAdapterEncodeReference": "encode", "InvAdapterApply": "apply",
         "InvAdapterCombineReferences": "control", "InvAdapterBlockWeights": "control"}


@pytest.fixture(scope="module")
def node(pack):
    classes = {name: getattr(__import__(f"{pack.__name__}.nodes.{module}", fromlist=[name]), name)
               for name, module in NODES.items()}
    return lambda name, *args, **kwargs: classes[name].execute(*args, **kwargs)


@pytest.fixture(scope="module")
def vae():
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(flux_files.flux_vae_file())))


@pytest.fixture(scope="module", params=["flux", "chroma"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return tiny_flux_model() if family == "flux" else tiny_chroma_model()


def caption(family, seed=0):
    ctx, opts = flux_text(seed)
    return [[ctx, dict(opts, guidance=3.5)]] if family == "flux" else [[ctx, {}]]


def photo(seed):
    return torch.rand(1, RES, RES, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def adapter(node):
    return node("InvAdapterLoader", "init from model")[0]


@pytest.fixture(scope="module")
def encode(node, model, vae, family):
    def run(seed=1, image=None):
        return node("InvAdapterEncodeReference", model, vae, photo(seed) if image is None else image,
                    caption(family), STEPS, "simple", RES, True)[0]
    return run


@pytest.fixture(scope="module")
def reference(encode):
    return encode()


@pytest.fixture(scope="module")
def apply(node, adapter):
    def run(model, reference, weight=1.0, start=0.0, end=1.0, combine="concat", apply_to="cond and uncond",
            mask=None, block_weights=None, **dit):
        return node("InvAdapterApply", model, adapter, reference, weight, 1.0, start, end, combine, apply_to, mask,
                    block_weights, **dit)[0]
    return run


def sample(model, family, cfg=1.0, seed=0):
    noise = torch.randn(1, 16, RES // 8, RES // 8, generator=torch.Generator().manual_seed(seed))
    negative = caption(family, seed=7)
    return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "simple", caption(family), negative,
                               torch.zeros_like(noise), disable_pbar=True, seed=seed)


def block_delta(applied, plain, family, name="double.0", batch=1, chunks=None):
    """The change the applied model makes to one block's attention output in one call at the reference's second
    sigma (the block's input is the same as plain's when no earlier block has a term)."""
    layout = layout_of(plain)
    ctx, opts = flux_text(0)
    x = torch.randn(batch, 16, RES // 8, RES // 8, generator=torch.Generator().manual_seed(3))
    conds = {"c_crossattn": ctx.expand(batch, -1, -1),
             "guidance": torch.full((batch,), 3.5 if family == "flux" else 0.0)}
    if layout.adm_channels:
        conds["y"] = opts["pooled_output"].expand(batch, -1)
    sigma = 0.6
    if chunks is not None:
        applied = applied.clone()
        applied.model_options["transformer_options"]["cond_or_uncond"] = chunks
    return one_call(applied, x, sigma, conds, name)[1][name] - one_call(plain, x, sigma, conds, name)[1][name]


def only(level):
    return {lv: float(lv == level) for lv in DIT_LEVELS}


# ---------------------------------------------------------------------------------------------- encode and apply
def test_encode_and_apply_through_the_nodes(model, family, reference, apply):
    assert reference.family == layout_of(model).family == {"flux": "Flux", "chroma": "Chroma"}[family]
    assert reference.resolution == (RES, RES) and len(reference.features) == STEPS - 1  # no pass at sigma max
    assert float(reference.conds["guidance"]) == (3.5 if family == "flux" else 0.0)  # Flux-dev's embedding kept
    assert set(reference.features.get(reference.features.sigmas()[0]).self_attn) == set(layout_of(model).blocks)
    assert default_resolution(model) == 512
    plain = sample(model, family)
    applied = apply(model, reference)
    assert applied is not model and not torch.equal(sample(applied, family), plain)


def test_chroma_takes_a_caption_with_a_pooled_output(node, vae, apply):
    """A text encoder that also gives a pooled vector (DualCLIPLoader, or the tests' CLIP-L stand-in for T5) hands
    Chroma a 'y' its network ignores: the reference keeps it and Apply must not refuse it."""
    model, family = tiny_chroma_model(), "chroma"
    ctx, opts = flux_text(0)
    ref = node("InvAdapterEncodeReference", model, vae, photo(1), [[ctx, opts]], STEPS, "simple", RES, True)[0]
    assert ref.conds["y"].shape[-1] == opts["pooled_output"].shape[-1] and layout_of(model).adm_channels is None
    assert not torch.equal(sample(apply(model, ref), family), sample(model, family))


def test_strength_zero_and_a_window_outside_sampling_are_bit_identical(model, family, reference, apply):
    plain = sample(model, family)
    assert torch.equal(sample(apply(model, reference, weight=0.0), family), plain)
    # weight_cross (the node passes 1.0) has no cross-attention to act on in an MM-DiT: nothing is installed
    assert not apply(model, reference, weight=0.0).wrappers
    # the last sampled sigma of 4 simple steps is far above the sigma at 99.9 %: no call is in the window
    assert torch.equal(sample(apply(model, reference, start=0.999, end=1.0), family), plain)
    assert not torch.equal(sample(apply(model, reference, start=0.0, end=0.3), family), plain)


def test_the_input_model_is_untouched(model, family, reference, apply):
    """A bypassed Apply is the model it was given: the node works on a clone."""
    options = repr(model.model_options)
    wrappers = repr(model.wrappers)
    plain = sample(model, family)
    apply(model, reference)
    assert repr(model.model_options) == options and repr(model.wrappers) == wrappers
    assert torch.equal(sample(model, family), plain)


# ---------------------------------------------------------------------------------------------- options
def test_two_identities_with_masks_each_act_only_in_their_region(model, family, encode, apply, node):
    """Two people: identity A masked to the left half of the image, B to the right. In the first block (the same
    input for every model) A's term is on the left half's tokens only, B's on the right, and the pair adds exactly
    A's left and B's right."""
    a, b = encode(seed=1), encode(seed=2)
    left = torch.zeros(1, RES, RES)
    left[:, :, :RES // 2] = 1.0
    right = 1.0 - left
    bw = node("InvAdapterBlockWeights", "custom", **{f"{k}_{lv}": 1.0 for k in ("self", "cross")
                                                   for lv in ("input_high", "input_mid", "input_low", "middle",
                                                              "output_low", "output_mid", "output_high")},
              **{f"dit_{lv}": v for lv, v in only("double_early").items()})[0]
    txt = flux_text(0)[0].shape[1]
    cols = torch.arange(16) % 4  # the 4x4 image tokens, row-major
    in_left = torch.cat((torch.zeros(txt, dtype=torch.bool), cols < 2))
    in_right = torch.cat((torch.zeros(txt, dtype=torch.bool), cols >= 2))
    da = block_delta(apply(model, a, mask=left, block_weights=bw), model, family)
    db = block_delta(apply(model, b, mask=right, block_weights=bw), model, family)
    assert da[:, in_left].abs().amax() > 0.05 and torch.equal(da[:, ~in_left], torch.zeros_like(da[:, ~in_left]))
    assert db[:, in_right].abs().amax() > 0.05 and torch.equal(db[:, ~in_right], torch.zeros_like(db[:, ~in_right]))
    both = block_delta(apply(apply(model, a, mask=left, block_weights=bw), b, mask=right, block_weights=bw), model,
                       family)
    assert torch.allclose(both, da + db, atol=1e-6)
    # whole sampling: each region moves with its own identity
    plain = sample(model, family)
    two = sample(apply(apply(model, a, mask=left), b, mask=right), family)
    assert not torch.equal(two, plain)


def test_cond_only_leaves_the_uncond_rows_untouched(model, family, reference, apply):
    cond_only = apply(model, reference, apply_to="cond only")
    both = apply(model, reference)
    delta = block_delta(cond_only, model, family, batch=2, chunks=[0, 1])
    assert delta[0].abs().amax() > 0.05 and torch.equal(delta[1], torch.zeros_like(delta[1]))
    full = block_delta(both, model, family, batch=2, chunks=[0, 1])
    assert full[1].abs().amax() > 0.05 and torch.allclose(delta[0], full[0], atol=1e-6)
    assert not torch.equal(sample(cond_only, family, cfg=3.0), sample(both, family, cfg=3.0))


def test_several_photos_concat_or_average(model, family, encode, apply, node):
    a, b = encode(seed=1), encode(seed=2)
    pair = node("InvAdapterCombineReferences", a, b)[0]
    assert pair.images == 2 and len(pair.features) == STEPS - 1
    twice = node("InvAdapterCombineReferences", a, a)[0]
    single = sample(apply(model, a), family)
    # the same photo twice: concatenated keys give the same softmax, their average is the photo itself
    for combine in ("concat", "average"):
        assert torch.allclose(sample(apply(model, twice, combine=combine), family), single, atol=1e-5)
    concat, average = (sample(apply(model, pair, combine=c), family) for c in ("concat", "average"))
    assert not torch.allclose(concat, average) and not torch.allclose(concat, single)


def test_dit_block_weights(model, family, reference, apply, node):
    plain = sample(model, family)
    zero = node("InvAdapterBlockWeights", "custom", **{f"{k}_{lv}": 1.0 for k in ("self", "cross")
                                                      for lv in ("input_high", "input_mid", "input_low", "middle",
                                                                 "output_low", "output_mid", "output_high")},
                **{f"dit_{lv}": 0.0 for lv in DIT_LEVELS})[0]
    assert torch.equal(sample(apply(model, reference, block_weights=zero), family), plain)
    double = node("InvAdapterBlockWeights", "double only")[0]
    single_delta = block_delta(apply(model, reference, block_weights=double), model, family, name="single.0")
    every_delta = block_delta(apply(model, reference), model, family, name="single.0")
    assert not torch.equal(every_delta, single_delta)
    assert not torch.equal(sample(apply(model, reference, block_weights=double), family), plain)


def test_a_unet_preset_on_a_dit_says_it_does_nothing(model, reference, adapter, node):
    coarse = node("InvAdapterBlockWeights", "coarse")[0]
    out = node("InvAdapterApply", model, adapter, reference, 1.0, 1.0, 0.0, 1.0, "concat", "cond and uncond", None,
               coarse)
    notices = " ".join(out.ui["text"])
    assert "levels this" in notices and "double_early" in notices


def test_rows_and_reference_positions(model, family, reference, apply):
    txt = flux_text(0)[0].shape[1]
    image = block_delta(apply(model, reference, block_weights=None), model, family)
    both = block_delta(apply(model, reference, rows="image and text"), model, family)
    assert torch.equal(image[:, :txt], torch.zeros_like(image[:, :txt])) and both[:, :txt].abs().amax() > 0.05
    assert torch.allclose(both[:, txt:], image[:, txt:], atol=1e-6)
    shifted = block_delta(apply(model, reference, reference_positions="shifted"), model, family)
    assert not torch.allclose(shifted, image)


# ---------------------------------------------------------------------------------------------- composition
def test_two_applies_compose_in_either_order(model, family, encode, apply):
    a, b = encode(seed=1), encode(seed=2)
    ab = sample(apply(apply(model, a, weight=0.6), b, weight=0.8), family)
    ba = sample(apply(apply(model, b, weight=0.8), a, weight=0.6), family)
    assert torch.allclose(ab, ba, atol=1e-5) and not torch.allclose(ab, sample(apply(model, a, weight=0.6), family))


def halve_v(q, k, v, pe=None, attn_mask=None, extra_options=None):
    """Another pack's attn1_patch that changes the joint attention's V."""
    return {"v": v * 0.5}


def test_another_packs_attn1_patch_composes_in_either_order(model, family, reference, apply):
    other_first = model.clone()
    other_first.set_model_attn1_patch(halve_v)
    other_first = apply(other_first, reference)
    ours_first = apply(model, reference).clone()
    ours_first.set_model_attn1_patch(halve_v)
    other_only = model.clone()
    other_only.set_model_attn1_patch(halve_v)
    result = sample(other_first, family)
    assert torch.equal(result, sample(ours_first, family)) and not torch.equal(result, sample(other_only, family))


def test_easycache_skipping_blocks_composes_in_either_order(model, family, reference, apply):
    """ComfyUI's EasyCache (a block-skipping cache around the diffusion model) with the identity: either order gives
    the same image, the identity still acts on the steps the cache computes, and at strength 0 the result is
    EasyCache's alone."""
    from comfy_extras.nodes_easycache import EasyCacheNode

    def cached(m):  # a threshold at which it skips some of this short run's steps (checked below)
        return EasyCacheNode.execute(m, 0.5, 0.0, 1.0, False)[0]

    steps = 8
    noise = torch.randn(1, 16, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))

    def run(m):
        return comfy.sample.sample(m, noise, steps, 1.0, "euler", "simple", caption(family), caption(family, 7),
                                   torch.zeros_like(noise), disable_pbar=True, seed=0)

    cache_then_eaa = run(apply(cached(model), reference))
    eaa_then_cache = run(cached(apply(model, reference)))
    calls = []
    hook = model.model.diffusion_model.double_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        cache_only = run(cached(model))
        skipping = len(calls)
        calls.clear()
        run(model)
    finally:
        hook.remove()
    assert skipping < len(calls)  # the cache did skip network calls in this run
    assert torch.equal(cache_then_eaa, eaa_then_cache) and not torch.equal(cache_then_eaa, cache_only)
    assert torch.equal(run(cached(apply(model, reference, weight=0.0))), cache_only)


def test_flux_kv_cache_composes_with_the_node(node, adapter, vae):
    """ComfyUI's FluxKVCache runs only on global-modulation Flux models in this ComfyUI (on Flux.1 it fails by
    itself, tests/test_flux.py): on one, the node's EAA and the cache give the same result in either order."""
    from comfy_extras.nodes_flux import FluxKVCache

    flux2 = tiny_flux_model(global_modulation=True)
    ref = node("InvAdapterEncodeReference", flux2, vae, photo(1), caption("flux"), STEPS, "simple", RES, True)[0]
    ctx, opts = flux_text(0)
    kontext = torch.randn(1, 16, RES // 8, RES // 8, generator=torch.Generator().manual_seed(9))
    cond = [[ctx, dict(opts, guidance=3.5, reference_latents=[kontext])]]
    noise = torch.randn(1, 16, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))

    def run(m):
        return comfy.sample.sample(m, noise, 3, 1.0, "euler", "simple", cond, cond, torch.zeros_like(noise),
                                   disable_pbar=True, seed=0)

    def applied(m):
        return node("InvAdapterApply", m, adapter, ref, 1.0, 1.0, 0.0, 1.0, "concat", "cond and uncond")[0]

    cache_then_eaa = run(applied(FluxKVCache.execute(flux2)[0]))
    eaa_then_cache = run(FluxKVCache.execute(applied(flux2))[0])
    assert torch.equal(cache_then_eaa, eaa_then_cache)
    assert not torch.equal(cache_then_eaa, run(FluxKVCache.execute(flux2)[0]))


# ---------------------------------------------------------------------------------------------- files and families
def test_a_saved_reference_records_its_family_and_is_refused_on_the_other(model, family, reference, apply,
                                                                          tmp_path):
    path = str(tmp_path / "flux-identity.safetensors")
    save_reference(reference, path)
    loaded = load_reference(path)
    assert loaded.family == reference.family and set(loaded.conds) == set(reference.conds)
    assert torch.equal(sample(apply(model, loaded), family), sample(apply(model, reference), family))
    sd = models.tiny_sd15_model()
    with pytest.raises(ModelFamilyError) as refused:
        apply(sd, loaded)
    assert f"encoded with a {reference.family} model" in str(refused.value) and "SD15" in str(refused.value)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sd_reference = invert_latent(sd, latent, models.text_context(3), 3, "normal", (64, 64))
    with pytest.raises(ModelFamilyError) as refused:
        apply(model, sd_reference)
    assert "encoded with a SD15 model" in str(refused.value) and reference.family in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_trained_sd_adapter_is_refused_on_flux_naming_both(model, reference, node):
    trained = load_adapter(str(models.adapter_file()))
    with pytest.raises(AdapterFileError) as refused:
        node("InvAdapterApply", model, trained, reference, 1.0, 1.0, 0.0, 1.0, "concat", "cond and uncond")
    message = str(refused.value)
    assert "SD15" in message and reference.family in message and "init from model" in message


def test_a_unet_capture_setting_is_refused_at_encode(model, family, vae, node):
    with pytest.raises(ValueError, match="not an option for this MM-DiT model; choose one of all levels, double "
                                         "blocks, early blocks"):
        node("InvAdapterEncodeReference", model, vae, photo(1), caption(family), STEPS, "simple", RES, True,
             capture="coarse levels")


def test_the_encode_node_keeps_double_blocks_in_fp8_inside_a_window(model, family, vae, node):
    """The memory options from the node: 'double blocks' keeps only the two-stream blocks, fp8 halves the bytes, and
    the kept window keeps only its steps (the others are made by a reference pass when sampling needs them)."""
    full = node("InvAdapterEncodeReference", model, vae, photo(1), caption(family), STEPS, "simple", RES, True)[0]
    small = node("InvAdapterEncodeReference", model, vae, photo(1), caption(family), STEPS, "simple", RES, True,
                 capture="double blocks", feature_precision="fp8 (half the memory)", keep_start_percent=0.5)[0]
    first = full.features.get(full.features.sigmas()[0])
    kept = small.features.sigmas()
    assert 0 < len(kept) < len(full.features.sigmas())
    blocks = small.features.get(kept[0]).self_attn
    assert set(blocks) == {n for n in first.self_attn if n.startswith("double.")}
    assert all(t.dtype == torch.float8_e4m3fn for t in blocks.values())
    with pytest.raises(ValueError, match="keep_start_percent 0.8 is after keep_end_percent 0.2"):
        node("InvAdapterEncodeReference", model, vae, photo(1), caption(family), STEPS, "simple", RES, True,
             keep_start_percent=0.8, keep_end_percent=0.2)


def test_a_reference_of_other_weights_is_named(model, family, reference, adapter, node):
    """A LoRA added between Encode and Apply: the joint path uses the kept K/V as they are, and says so."""
    lora = model.clone()
    layout = layout_of(model)
    weight = layout.blocks["double.0"].img_attn.qkv.weight
    assert lora.add_patches({"diffusion_model.double_blocks.0.img_attn.qkv.weight": (torch.zeros_like(weight),)})
    out = node("InvAdapterApply", lora, adapter, reference, 1.0, 1.0, 0.0, 1.0, "concat", "cond and uncond")
    assert "other weights" in " ".join(out.ui["text"])
    same = node("InvAdapterApply", model, adapter, reference, 1.0, 1.0, 0.0, 1.0, "concat", "cond and uncond")
    assert same.ui is None


def test_a_trained_joint_adapter_file_runs_through_apply(model, family, reference, node, tmp_path):
    """A weights file the trainer writes for this network (its K/V maps) is read back and applied by the node: the
    term equals JointApplication with those maps, and differs from the training-free one."""
    check_trained_joint_file_applies(model, reference, node, tmp_path / f"{family}.safetensors", "Flux",
                                     lambda applied: block_delta(applied, model, family))


def check_trained_joint_file_applies(model, reference, node, path, architecture: str, delta) -> None:
    """Random joint K/V maps written as the trainer writes them, loaded and applied by the node: ``delta(applied
    model)`` (a block's attention change) equals JointApplication's with those maps and differs from the
    training-free one's. Shared with test_qwen_nodes."""
    trained = build_adapter(model, RES, 16, init="random", train_cross=False)
    save_adapter(trained, str(path))
    loaded = load_adapter(str(path))
    assert loaded.architecture == architecture and not loaded.self_from_base
    applied = node("InvAdapterApply", model, loaded, reference, 1.0, 1.0, 0.0, 1.0, "concat", "cond and uncond")[0]
    direct = install_joint(model, JointApplication(model, reference, 1.0, adapter=trained))
    free = install_joint(model, JointApplication(model, reference, 1.0))
    assert torch.allclose(delta(applied), delta(direct), atol=1e-5)
    assert not torch.allclose(delta(applied), delta(free), atol=1e-4)


# ---------------------------------------------------------------------------------------------- weight dtypes
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16], ids=["fp8", "bf16"])
def test_a_flux_file_loaded_in_fp8_or_bf16_encodes_and_applies(node, adapter, vae, dtype):
    """The tiny Flux UNET file loaded as UNETLoader loads it with a weight dtype (fp8 weights computed in the
    manual-cast dtype; bf16): encode and apply run, the sampled latent is finite and differs from plain."""
    flux = comfy.sd.load_diffusion_model(str(flux_files.flux_unet_file()), model_options={"dtype": dtype})
    assert flux.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == dtype
    ctx = torch.randn(1, 5, 4096, generator=torch.Generator().manual_seed(0))
    cond = [[ctx, {"pooled_output": torch.randn(1, 2048, generator=torch.Generator().manual_seed(1)),
                   "guidance": 3.5}]]
    ref = node("InvAdapterEncodeReference", flux, vae, photo(1), cond, STEPS, "simple", RES, True)[0]
    assert len(ref.features) == STEPS - 1
    applied = node("InvAdapterApply", flux, adapter, ref, 1.0, 1.0, 0.0, 1.0, "concat", "cond and uncond")[0]
    noise = torch.randn(1, 16, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))

    def run(m):
        return comfy.sample.sample(m, noise, STEPS, 1.0, "euler", "simple", cond, cond, torch.zeros_like(noise),
                                   disable_pbar=True, seed=0)

    out, plain = run(applied), run(flux)
    assert torch.isfinite(out).all() and torch.isfinite(plain).all() and not torch.equal(out, plain)


def test_a_flux_computing_in_bf16_encodes_and_applies(node, adapter, vae):
    """A tiny Flux built in bfloat16 with no manual cast, so its blocks compute in bf16 (on CPU a loaded file computes
    in fp32, test above): the kept K/V and the term meet bf16 activations; the result is finite and differs."""
    import comfy.supported_models
    from support.flux_models import UNET_CONFIG
    from support.models import model_config, random_patcher

    flux = random_patcher(model_config(comfy.supported_models.Flux, dict(UNET_CONFIG), torch.bfloat16))
    assert flux.model.get_dtype_inference() == torch.bfloat16 and flux.model.manual_cast_dtype is None
    ref = node("InvAdapterEncodeReference", flux, vae, photo(1), caption("flux"), STEPS, "simple", RES, True)[0]
    applied = node("InvAdapterApply", flux, adapter, ref, 1.0, 1.0, 0.0, 1.0, "concat", "cond and uncond")[0]
    out, plain = sample(applied, "flux"), sample(flux, "flux")
    assert torch.isfinite(out).all() and torch.isfinite(plain).all() and not torch.equal(out, plain)
