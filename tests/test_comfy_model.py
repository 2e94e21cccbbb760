"""Inv-Adapter inside ComfyUI's real sampling, on the small in-process SD1.5-shaped model."""
import logging

import pytest
import torch

import comfy.patcher_extension as ext
import comfy.sample
import comfy.samplers
from invadapter_core.adapter.application import Application, applications, install
from support.ddim import ddim_step
from invadapter_core.reference.encode import invert_latent, prepare_images
from invadapter_core.adapter.fit import check_reference_fits
from invadapter_core.reference.capture import reference_pass
from invadapter_core.arch.layout import ModelFamilyError, layout_of
from invadapter_core.adapter.weights import init_from_model

STEPS = 6


def face_latent(batch=1, seed=12):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def encode(model, caption, scheduler="simple", steps=STEPS, keep=True, images=1):
    return invert_latent(model, face_latent(images), caption, steps, scheduler, (64, 64), keep_features=keep)


def sample(model, caption, sampler="euler", scheduler="simple", cfg=4.0, batch=2, denoise=1.0, negative=None,
           steps=STEPS, positive=None):
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    latent = torch.randn(batch, 4, 8, 8, generator=g) if denoise < 1 else torch.zeros(batch, 4, 8, 8)
    neg = negative if negative is not None else torch.zeros_like(caption)
    pos = positive if positive is not None else [[caption, {}]]
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, [[neg, {}]], latent,
                               denoise=denoise, disable_pbar=True, seed=5)


def applied(model, reference, weight_self=1.0, **kw):
    app = Application(init_from_model(""), reference, model, weight_self, 1.0,
                      kw.pop("sigma_start", 1e9), kw.pop("sigma_end", 0.0), **kw)
    return install(model, app), app


def test_zero_weight_and_outside_the_percent_range_are_bit_identical(model, caption):
    ref = encode(model, caption)
    base = sample(model, caption)
    assert torch.equal(sample(applied(model, ref, 0.0)[0], caption), base)
    assert torch.equal(sample(applied(model, ref, 1.0, sigma_start=1e-4, sigma_end=0.0)[0], caption), base)
    assert not torch.equal(sample(applied(model, ref, 1.0)[0], caption), base)


def test_features_from_the_inversion_are_reused_and_a_second_run_costs_no_pass(model, caption):
    ref = encode(model, caption)
    m, _ = applied(model, ref)
    first = sample(m, caption)
    assert ref.features.passes == 1  # only sigma_max, the one sigma the inversion never evaluates
    second = sample(m, caption)
    assert ref.features.passes == 1 and torch.equal(first, second)


def test_changing_steps_does_not_pile_up_features_and_repeating_recomputes_none(model, caption):
    ref = encode(model, caption)
    pinned = set(ref.features.pinned)
    assert pinned == set(ref.features.sigmas())  # everything the inversion captured stays for good
    m, _ = applied(model, ref)
    for steps in (4, 5, 7, 9, 9):
        passes = ref.features.passes
        sample(m, caption, steps=steps)
        extra = set(ref.features.sigmas()) - pinned
        assert pinned <= set(ref.features.sigmas())
        assert len(extra) <= steps, "features of earlier runs' sigmas were kept"
    assert ref.features.passes == passes, "the same settings again recomputed features"


def test_two_applications_of_one_reference_in_one_run_keep_each_others_features(model, caption):
    ref = encode(model, caption)
    m, _ = applied(model, ref)
    m, _ = applied(m, ref, 0.5)  # another adapter object: a second application, not a replacement
    assert len(applications(m)) == 2
    sample(m, caption, steps=4)
    passes = ref.features.passes
    sample(m, caption, steps=4)
    assert ref.features.passes == passes


def test_one_reference_pass_per_sigma_however_many_batch_chunks(model, caption):
    ref = encode(model, caption, keep=False)
    m, _ = applied(model, ref)
    calls = []
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, "count",
                           lambda ex, x, t, *a, **k: calls.append(float(t[0])) or ex(x, t, *a, **k))
    # an area-limited second prompt runs on a cropped latent, so it cannot share a batch: two chunks per step
    sample(m, caption, positive=[[caption, {}], [caption, {"area": (4, 4, 0, 0), "strength": 1.0}]])
    assert len(calls) == 2 * STEPS and len(set(calls)) == STEPS
    assert ref.features.passes == STEPS


def test_cached_features_give_the_same_output_as_recomputing(model, caption):
    warm = encode(model, caption, keep=True)
    cold = encode(model, caption, keep=False)
    assert torch.equal(sample(applied(model, warm)[0], caption), sample(applied(model, cold)[0], caption))


@pytest.mark.parametrize("sampler,scheduler", [("euler", "karras"), ("dpmpp_2m", "simple"), ("heun", "normal"),
                                               ("euler_ancestral", "simple"), ("dpmpp_sde", "karras"),
                                               ("uni_pc", "simple")])
def test_every_kind_of_sampler_runs(model, caption, sampler, scheduler):
    ref = encode(model, caption)
    out = sample(applied(model, ref)[0], caption, sampler=sampler, scheduler=scheduler)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, sample(model, caption, sampler=sampler, scheduler=scheduler))


def test_cfg_off_batch_and_img2img(model, caption):
    ref = encode(model, caption)
    m, _ = applied(model, ref)
    for kw in ({"cfg": 1.0}, {"batch": 3}, {"denoise": 0.5}):
        out = sample(m, caption, **kw)
        assert torch.isfinite(out).all() and not torch.equal(out, sample(model, caption, **kw)), kw


def test_other_packs_patches_are_chained_not_replaced(model, caption):
    ref = encode(model, caption)
    seen = {"list": 0, "replace": 0}

    def foreign_patch(n, context, value, extra_options):
        seen["list"] += 1
        return n, context, value

    def foreign_replace(q, k, v, extra_options):
        seen["replace"] += 1
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra_options["n_heads"])

    other = model.clone()
    other.set_model_attn1_patch(foreign_patch)
    other.set_model_attn1_replace(foreign_replace, "input", 1)
    before = {k: list(v) for k, v in other.model_options["transformer_options"]["patches"].items()}
    m, _ = applied(other, ref)
    assert other.model_options["transformer_options"]["patches"] == before  # the input model is not mutated
    assert foreign_patch in m.model_options["transformer_options"]["patches"]["attn1_patch"]
    assert m.model_options["transformer_options"]["patches_replace"]["attn1"][("input", 1)] is foreign_replace
    out = sample(m, caption)
    assert seen["list"] > 0 and seen["replace"] > 0
    assert not torch.equal(out, sample(other, caption))


def test_applying_the_same_reference_twice_replaces_with_a_warning(model, caption, caplog):
    ref = encode(model, caption)
    once, app = applied(model, ref)
    with caplog.at_level(logging.WARNING):
        twice = install(once, Application(app.adapter, ref, model, 1.0, 1.0, 1e9, 0.0))
    assert "already applied" in caplog.text
    # why, and what to do
    assert "the same reference reached it twice" in caplog.text and "same photo in both photo slots" in caplog.text
    assert "two different photos" in caplog.text and "remove one InvAdapterApply" in caplog.text
    assert len(applications(twice)) == 1
    other = encode(model, caption)
    assert len(applications(applied(twice, other)[0])) == 2  # another identity stacks


def test_each_inversion_step_is_the_ddim_update_and_deterministic(model, caption):
    ref = encode(model, caption, keep=False)
    again = encode(model, caption, keep=False)
    assert torch.equal(ref.states, again.states)
    base = model.model
    for i in range(len(ref.sigmas) - 1):
        s, s_next = float(ref.sigmas[i]), float(ref.sigmas[i + 1])
        x = ref.states[i]
        with torch.no_grad():
            d = base.apply_model(x, torch.full((1,), s), c_crossattn=caption)
        assert torch.allclose(ref.states[i + 1], ddim_step(x, s, s_next, d), atol=1e-5, rtol=1e-5)


def test_features_captured_in_the_inversion_equal_a_fresh_reference_pass(model, caption):
    ref = encode(model, caption)
    layout = layout_of(model)
    for i, s in enumerate(ref.sigmas.tolist()[:-1]):
        _, fresh = reference_pass(model.model, ref.states[i], s, {"c_crossattn": caption}, layout, cross=False)
        kept = ref.features.get(s)
        assert kept.self_attn.keys() == fresh.self_attn.keys()
        for name in fresh.self_attn:
            assert torch.equal(kept.self_attn[name], fresh.self_attn[name])


def test_a_reference_of_another_family_is_refused(model, caption):
    ref = encode(model, caption)
    ref.family = "SDXL"
    with pytest.raises(ModelFamilyError, match="encoded with a SDXL model.*SD15"):
        check_reference_fits(model, ref)


def test_images_are_validated_and_normalised():
    assert prepare_images(torch.rand(2, 30, 50, 1), 64).shape == (2, 64, 64, 3)
    assert prepare_images(torch.rand(1, 64, 64, 4), 32).shape == (1, 32, 32, 3)
    for bad, msg in ((torch.rand(0, 64, 64, 3), "empty"), (torch.rand(1, 0, 64, 3), "empty"),
                     (torch.rand(1, 8, 8, 5), "channels"), ("x", "IMAGE tensor")):
        with pytest.raises(ValueError, match=msg):
            prepare_images(bad, 64)


def test_the_cache_keeps_the_inference_dtype_and_does_not_grow(model, caption):
    ref = encode(model, caption)
    m, app = applied(model, ref)
    sample(m, caption)
    entries, size, kv = len(ref.features), ref.features.nbytes(), app.kv_store.pack.nbytes
    for _ in range(5):
        sample(m, caption)
        # later runs read only the K/V store: sigma_max's features, which no run uses any more, are dropped
        assert len(ref.features) <= entries and ref.features.nbytes() <= size and app.kv_store.pack.nbytes == kv
    for s in ref.features.sigmas():
        for t in ref.features.get(s).self_attn.values():
            assert t.dtype == model.model.get_dtype_inference()


def test_capture_and_precision_bound_the_cache_and_still_sample(model, caption, tmp_path):
    from invadapter_core.reference.encode import CAPTURE
    from invadapter_core.reference.reference import load_reference, save_reference

    full = encode(model, caption)
    coarse = invert_latent(model, face_latent(), caption, STEPS, "simple", (64, 64), levels=CAPTURE["coarse levels"])
    levels = layout_of(model).levels
    kept = {name for _, name in coarse.features.shapes()}
    assert kept == {n for n, lv in levels.items() if lv in CAPTURE["coarse levels"]} and len(kept) < len(levels)
    assert coarse.features.nbytes() < full.features.nbytes()
    out = sample(applied(model, coarse)[0], caption)
    assert torch.isfinite(out).all() and not torch.equal(out, sample(applied(model, full)[0], caption))
    eight = invert_latent(model, face_latent(), caption, STEPS, "simple", (64, 64), store_dtype=torch.float8_e4m3fn)
    per_step = lambda r: r.features.nbytes() / len(r.features)  # noqa: E731
    assert per_step(eight) * 4 == per_step(full)  # fp32 tiny model: a quarter (fp16 UNets: half)
    assert torch.isfinite(sample(applied(model, eight)[0], caption)).all()
    path = str(tmp_path / "eight.safetensors")
    save_reference(eight, path)
    back = load_reference(path)
    assert back.features.store_dtype == torch.float8_e4m3fn
    sample(applied(model, back)[0], caption)
    assert back.weights is not None  # the probe accepted the 8-bit features as this model's


def test_the_caches_are_models_to_comfyui_memory_management(model, caption):
    """The feature and K/V packs load beside the UNet (the patch's models()) and ComfyUI evicts them like any model
    (its unload path ends in the pack's own .to()); after an eviction the next run is the same, with no pass."""
    import comfy.model_management as mm

    ref = encode(model, caption)
    m, app = applied(model, ref)
    first = sample(m, caption)
    loaded = {id(lm.model.model) for lm in mm.current_loaded_models if lm.model is not None}
    assert id(app.kv_store.pack) in loaded
    mm.unload_all_models()
    assert not any(lm.model is not None and lm.model.model is app.kv_store.pack for lm in mm.current_loaded_models)
    passes = ref.features.passes
    assert torch.equal(sample(m, caption), first) and ref.features.passes == passes


def test_applications_of_one_reference_alternating_recompute_nothing(model, caption):
    """One application served from its K/V store, another projecting from the features (no store): what the first
    never reads still serves the second, so alternating runs make no reference pass after the first."""
    ref = encode(model, caption)
    kept, _ = applied(model, ref)
    projecting = install(model, Application(init_from_model(""), ref, model, 0.7, 1.0, 1e9, 0.0, keep_kv=False))
    sample(kept, caption)
    sample(projecting, caption)
    passes = ref.features.passes
    for _ in range(2):
        sample(kept, caption)
        sample(projecting, caption)
    assert ref.features.passes == passes
