"""Memory options of an MM-DiT reference (issue 20) on the tiny random Flux: block subsets, fp8 storage, a subset of
steps, the per-step recompute fallback, and the application's K/V store under ComfyUI's memory manager. Sizes are
checked against the layout's own arithmetic (``feature_bytes_per_step``, what the README's table is made of)."""
import pytest
import torch

import comfy.model_management as mm
import comfy.sample
from comfy.patcher_extension import WrappersMP
from invadapter_core.adapter.joint import JointApplication, install_joint
from invadapter_core.arch.layout import layout_of
from invadapter_core.arch.levels import DIT_PRESETS
from invadapter_core.comfyui.memory import TensorPack
from invadapter_core.reference.encode import DIT_CAPTURE, capture_levels, kept_sigmas, reference_conds, invert_latent
from test_flux import flux, text  # noqa: F401 - the tiny Flux and its text, shared fixtures

SIDE = 8  # latent side: a 4x4 token grid, 16 image tokens
RES = 8 * SIDE
STEPS = 4
DOUBLE = DIT_CAPTURE["double blocks"]
# float8_e4m3fn keeps 3 mantissa bits: rounding to nearest is off by at most 2^-4 = 6.25 % of a value in its normal
# range (|x| >= 2^-6), less on average (measured on these K/V: 2.5-2.8 % relative L2 per block, at most 5.9 % per
# value; the sampled output moves by 0.9 % of the EAA's effect)
FP8_MAX_RELATIVE = 2.0 ** -4
FP8_RMS_RELATIVE = 0.035


@pytest.fixture(scope="module")
def conds(flux, text):
    ctx, opts = text
    return reference_conds(flux, ctx, dict(opts, guidance=3.5), face(), (RES, RES))


def face():
    return torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(5))


def encode(flux, conds, **options):
    return invert_latent(flux, face(), conds, STEPS, "simple", (RES, RES), **options)


def sample(model, text, seed=0):
    ctx, opts = text
    noise = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    cond = [[ctx, dict(opts, guidance=3.5)]]
    return comfy.sample.sample(model, noise, STEPS, 1.0, "euler", "simple", cond, cond,
                               torch.zeros(1, 16, SIDE, SIDE), disable_pbar=True, seed=seed)


def counted(flux, fn) -> int:
    """How many times the diffusion model runs during ``fn`` (sampling calls and reference passes alike)."""
    calls = []
    handle = flux.model.diffusion_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


# ---------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("capture, fp8, window", [("all levels", False, (0.0, 1.0)), ("double blocks", False,
                                                                                      (0.0, 1.0)),
                                                   ("early blocks", True, (0.0, 1.0)), ("all levels", True, (0.0, 0.5))])
def test_each_option_keeps_what_the_layout_computes(flux, conds, text, capture, fp8, window):
    layout = layout_of(flux)
    levels = capture_levels(flux, capture)
    ref = encode(flux, conds, levels=levels, store_dtype=torch.float8_e4m3fn if fp8 else None, keep_percent=window)
    steps = kept_sigmas(flux, ref.sigmas.tolist()[:-1], window)
    assert ref.features.sigmas() == pytest.approx(steps) and 0 < len(steps) <= STEPS
    if window != (0.0, 1.0):
        assert len(steps) < STEPS
    per_step = layout.feature_bytes_per_step(RES, bytes_per_value=1 if fp8 else 4, levels=levels)  # fp32 tiny model
    assert ref.features.nbytes() == len(steps) * per_step
    kept = {name for _, name in ref.features.shapes()}
    assert kept == (set(layout.blocks) if levels is None else layout.at_levels(levels))
    # the application's K/V store: the model's dtype, every step of the run's schedule inside the window it applies
    ms = flux.get_model_object("model_sampling")
    app = JointApplication(flux, ref, 1.0, sigma_start=float(ms.percent_to_sigma(window[0])),
                           sigma_end=float(ms.percent_to_sigma(window[1])))
    sample(install_joint(flux, app), text)
    store = app.cache.store
    assert isinstance(store.pack, TensorPack) and store.pack.flat.dtype == flux.model.get_dtype_inference()
    assert store.pack.flat.device == flux.load_device
    active = [s for s in store.sigmas if app.active(s)]
    assert len(store.sigmas) == len(active) and store.filled == set(range(len(active)))
    assert app.cache.nbytes() == len(active) * layout.feature_bytes_per_step(RES, 4, levels=levels)


def test_capture_options_are_refused_by_name_where_they_do_not_fit(flux):
    with pytest.raises(ValueError, match="capture 'coarse levels' is not an option for this MM-DiT model"):
        capture_levels(flux, "coarse levels")
    with pytest.raises(ValueError, match="keep_percent"):
        kept_sigmas(flux, [0.1, 0.5], (0.7, 0.2))


# ---------------------------------------------------------------------------------------------------- fp8
def test_fp8_features_are_within_the_stated_rounding_error(flux, conds, text):
    full = encode(flux, conds)
    eight = encode(flux, conds, store_dtype=torch.float8_e4m3fn)
    assert torch.equal(full.states, eight.states)  # storage does not touch the inversion
    worst = 0.0
    for s in full.features.sigmas():
        a, b = full.features.get(s).self_attn, eight.features.get(s).self_attn
        for name in a:
            x, y = a[name], b[name].float()
            assert b[name].dtype == torch.float8_e4m3fn
            normal = x.abs() >= 2.0 ** -6
            assert ((y - x).abs()[normal] <= FP8_MAX_RELATIVE * x.abs()[normal] + 1e-7).all(), name
            worst = max(worst, float((y - x).norm() / x.norm()))
    assert worst < FP8_RMS_RELATIVE, worst
    plain = sample(flux, text)
    with_full = sample(install_joint(flux, JointApplication(flux, full, 1.0)), text)
    with_eight = sample(install_joint(flux, JointApplication(flux, eight, 1.0)), text)
    effect = (with_full - plain).norm()
    assert (with_eight - with_full).norm() < 0.05 * effect, float((with_eight - with_full).norm() / effect)


# ---------------------------------------------------------------------------------------------------- block subsets
def outputs_around(model, app):
    """A clone with ``app`` installed between two attn1_output_patch recorders: per block, the attention output
    before and after the EAA's term."""
    layout = layout_of(model)
    before, after = {}, {}
    m = model.clone()
    m.set_model_attn1_output_patch(lambda attn, extra: before.setdefault(layout.block_at(extra), []).append(
        attn.clone()) or attn)
    m = install_joint(m, app)
    m.set_model_attn1_output_patch(lambda attn, extra: after.setdefault(layout.block_at(extra), []).append(
        attn.clone()) or attn)
    return m, before, after


@pytest.mark.parametrize("how", ["capture", "block weights"])
def test_double_blocks_only_apply_on_the_double_blocks(flux, conds, text, how):
    """Kept for the double blocks only (capture) or weighted there only (block weights): every single block's
    attention output leaves the EAA exactly as it came in, every double block's gets the term."""
    if how == "capture":
        ref, weights = encode(flux, conds, levels=DOUBLE), None
    else:
        ref, weights = encode(flux, conds), DIT_PRESETS["double only"]
    app = JointApplication(flux, ref, 1.0, block_weights=weights)
    m, before, after = outputs_around(flux, app)
    sample(m, text)
    layout = layout_of(flux)
    assert set(before) == set(after) == set(layout.blocks)
    for name in layout.blocks:
        pairs = list(zip(before[name], after[name]))
        assert len(pairs) == STEPS
        if name.startswith("single"):
            assert all(torch.equal(a, b) for a, b in pairs), name
        else:
            assert all(not torch.equal(a, b) for a, b in pairs), name
    assert set(app.cache.store.keys) == layout.at_levels(DOUBLE)


# ---------------------------------------------------------------------------------------------------- recompute
@pytest.mark.parametrize("levels", [None, DOUBLE])
def test_the_recompute_fallback_gives_the_kept_features_output(flux, conds, text, levels):
    """Nothing kept (keep_features off, no K/V store): one reference pass per step at the inverted trajectory's
    latent (running no block after the last one used) gives what the kept features give."""
    weights = DIT_PRESETS["double only"] if levels else None
    kept = encode(flux, conds, levels=levels)
    nothing = encode(flux, conds, keep_features=False)
    assert len(nothing.features) == 0 and torch.equal(nothing.states, kept.states)
    want = sample(install_joint(flux, JointApplication(flux, kept, 1.0, block_weights=weights)), text)
    app = JointApplication(flux, nothing, 1.0, block_weights=weights, reuse_features=False)
    m = install_joint(flux, app)
    plain_calls = counted(flux, lambda: sample(flux, text))
    for run in range(2):  # nothing is kept between runs either
        calls = counted(flux, lambda: torch.testing.assert_close(sample(m, text), want, rtol=1e-5, atol=1e-5))
        assert calls == 2 * plain_calls and app.passes == (run + 1) * plain_calls
        assert app.cache.store is None


def test_a_features_only_pass_skips_the_blocks_after_the_last_one_used(flux, conds):
    layout = layout_of(flux)
    assert layout.skip_patches(None) == {} and layout.skip_patches(set(layout.blocks)) == {}
    skipped = layout.skip_patches(layout.at_levels(DOUBLE))["dit"]
    assert set(skipped) == {("single_block", 0), ("single_block", 1)}
    ran = []
    handles = [b.register_forward_pre_hook(lambda module, args, name=name: ran.append(name))
               for name, b in layout.blocks.items()]
    try:
        ref = encode(flux, conds, keep_features=False)
        app = JointApplication(flux, ref, 1.0, block_weights=DIT_PRESETS["double only"], reuse_features=False)
        ran.clear()
        app.kv_at(flux.model, float(ref.sigmas[1]), flux.load_device, torch.float32)
    finally:
        for h in handles:
            h.remove()
    assert ran == ["double.0", "double.1"]


# ---------------------------------------------------------------------------------------------------- warm runs
@pytest.mark.parametrize("option", ["all", "double blocks", "fp8", "window", "keep_features off"])
def test_warm_runs_make_as_many_model_calls_as_plain_sampling(flux, conds, text, option):
    """Applied a second time on the same schedule, every option's run is served from the K/V store: exactly the
    plain run's diffusion-model calls. The first run makes one reference pass per step the reference did not keep
    (σ_max, never evaluated by an inversion; every step with keep_features off)."""
    ms = flux.get_model_object("model_sampling")
    window = (0.0, 1.0)
    encoding = {"double blocks": dict(levels=DOUBLE), "fp8": dict(store_dtype=torch.float8_e4m3fn),
                "window": dict(keep_percent=(0.0, 0.6)), "keep_features off": dict(keep_features=False)}
    ref = encode(flux, conds, **encoding.get(option, {}))
    if option == "window":
        window = (0.0, 0.6)
    app = JointApplication(flux, ref, 1.0, sigma_start=float(ms.percent_to_sigma(window[0])),
                           sigma_end=float(ms.percent_to_sigma(window[1])))
    m = install_joint(flux, app)
    plain = counted(flux, lambda: sample(flux, text))
    cold = counted(flux, lambda: sample(m, text))
    warm = [counted(flux, lambda: sample(m, text)) for _ in range(2)]
    assert warm == [plain, plain]
    active = [s for s in app.cache.store.sigmas]
    not_kept = [s for s in active if ref.features.get(s) is None]
    assert cold == plain + len(not_kept) and app.passes == len(not_kept) >= 1


def test_the_store_is_a_model_to_comfyui_memory_management(flux, conds, text):
    """The K/V store loads beside the model (the hook's models()) and ComfyUI evicts it like any model; after an
    eviction the next run gives the same output with no reference pass."""
    ref = encode(flux, conds)
    app = JointApplication(flux, ref, 1.0)
    m = install_joint(flux, app)
    first = sample(m, text)
    pack = app.cache.store.pack
    loaded = [lm.model.model for lm in mm.current_loaded_models if lm.model is not None]
    assert any(p is pack for p in loaded)
    mm.unload_all_models()
    assert not any(lm.model is not None and lm.model.model is pack for lm in mm.current_loaded_models)
    passes = app.passes
    assert torch.equal(sample(m, text), first) and app.passes == passes
    # another schedule: a new store for it, the old one dropped
    ctx, opts = text
    noise = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    cond = [[ctx, dict(opts, guidance=3.5)]]
    comfy.sample.sample(m, noise, STEPS + 2, 1.0, "euler", "simple", cond, cond, torch.zeros(1, 16, SIDE, SIDE),
                        disable_pbar=True, seed=0)
    assert app.cache.store.pack is not pack and len(app.cache.store.sigmas) == STEPS + 2


# ---------------------------------------------------------------------------------------------------- benchmarks
def run_script(*args, timeout=600):
    import json
    import subprocess

    from support import host

    done = subprocess.run([host.python_exe(), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=host.ROOT)
    assert done.returncode == 0, done.stderr[-6000:]
    return done.stdout, (lambda: json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_overhead_benchmark_takes_the_tiny_flux():
    """benchmarks/overhead.py --checkpoint tiny-flux: the MM-DiT path's JSON line (a tiny run: the bookkeeping,
    not the timings). Warm runs make the plain run's model calls; cold adds one pass (σ_max), naive one per step."""
    from support import host

    _, result = run_script(host.ROOT / "benchmarks" / "overhead.py", "--checkpoint", "tiny-flux", "--size", "64",
                           "--ref-size", "64", "--steps", "3", "--repeats", "1", "--threads", "1")
    result = result()
    assert result["reference_passes"] == {"cold": 1, "warm": 0, "naive": 3}
    calls = result["model_calls"]
    assert calls["warm"] == calls["plain"] == 3 and calls["cold_sampling"] == 4 and calls["naive"] == 2 + 3 + 3
    assert result["ref_cache_mb"] == result["ref_cache_mb_formula"] > 0 and result["kv_store_mb"] > 0
    assert result["host_us_per_patched_block_call"] > 0 and result["settings"]["family"] == "Flux"
    assert result["settings"]["cfg"] == 1.0 and result["settings"]["blocks_patched"] == 4


def test_the_memory_table_is_the_layouts_arithmetic():
    """benchmarks/memory_table.py builds the real networks on the meta device: Flux-dev's K+V of a 512² reference
    are 717 MB per step in bf16 over its 57 blocks, 239 MB over the 19 double blocks (the issue's figures)."""
    from support import host

    out, _ = run_script(host.ROOT / "benchmarks" / "memory_table.py")
    assert "| Flux.1-dev at 512² | 57 | 717 MB | 14.34 GB | 7.17 GB | 239 MB · 4.78 GB · 2.39 GB |" in out
    assert "| Chroma at 1024² | 57 | 2.87 GB | 57.38 GB | 28.69 GB | 956 MB · 19.13 GB · 9.56 GB |" in out
    assert "| Qwen-Image at 1024² | 60 | 3.02 GB |" in out


def test_features_that_fit_nowhere_are_not_kept_and_the_user_is_told(flux, conds, text, monkeypatch):
    """More than the device leaves and than the host's share (here: any size at all): the inversion keeps nothing,
    says so, and the application falls back to one reference pass per step with the kept features' result."""
    import invadapter_core.reference.encode as encode_module
    from invadapter_core.comfyui.notify import collecting

    want = sample(install_joint(flux, JointApplication(flux, encode(flux, conds), 1.0, keep_kv=False)), text)
    monkeypatch.setattr(encode_module, "HOST_SHARE", 0.0)
    with collecting() as notes:
        ref = encode(flux, conds)
    assert len(ref.features) == 0 and ref.features.nbytes() == 0
    assert len(notes) == 1 and "none are kept" in notes[0] and "capture 'double blocks'" in notes[0]
    app = JointApplication(flux, ref, 1.0, keep_kv=False)
    torch.testing.assert_close(sample(install_joint(flux, app), text), want, rtol=1e-5, atol=1e-5)
    assert app.passes == STEPS


def test_batch_chunks_of_one_step_share_its_recomputed_k_v(flux, conds, text):
    """Without a store or kept features, cond and uncond (cfg > 1) run as two calls per step when ComfyUI
    splits the batch; they share the step's one reference pass."""
    ref = encode(flux, conds, keep_features=False)
    app = JointApplication(flux, ref, 1.0, reuse_features=False)
    m = install_joint(flux, app)
    ctx, opts = text
    noise = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    # 7 and 5 text tokens: ComfyUI cannot batch them, so each step is two calls of one sample
    cond, uncond = [[ctx, dict(opts, guidance=3.5)]], [[torch.zeros_like(ctx[:, :5]), dict(opts, guidance=3.5)]]
    calls = []
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "count",
                           lambda ex, x, *a, **k: calls.append(x.shape[0]) or ex(x, *a, **k))
    comfy.sample.sample(m, noise, STEPS, 2.0, "euler", "simple", cond, uncond, torch.zeros(1, 16, SIDE, SIDE),
                        disable_pbar=True, seed=0)
    assert calls == [1] * (2 * STEPS) and app.passes == STEPS
