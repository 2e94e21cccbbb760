"""Several photos per identity, several identities with masks, per-level weights, attention maps (tiny model)."""
import pytest
import torch

import comfy.sample

from invadapter_core.adapter.attention_maps import RECORDER_KEY, AttentionRecorder, reference_maps
from invadapter_core.adapter.block_weights import BlockWeights
from invadapter_core.arch.levels import level_of
from invadapter_core.adapter.application import Application, install
from invadapter_core.reference.encode import invert_latent
from invadapter_core.adapter.injection import ADD, CALL, STASH, Call, Step
from invadapter_core.arch.layout import layout_of
from invadapter_core.reference.reference import combine_references
from invadapter_core.adapter.weights import init_from_model
from test_comfy_model import STEPS, face_latent, sample


def encode(model, caption, seed=12, images=1):
    return invert_latent(model, face_latent(images, seed), caption, STEPS, "simple", (64, 64))


def apply(model, ref, **kw):
    return install(model, Application(init_from_model(""), ref, model, kw.pop("weight", 1.0), 1.0, 1e9, 0.0, **kw))


def block_delta(app, features, name, n, opts):
    """The self-attention EAA term one block adds to a zero attention output, through the installed patches."""
    kv = app.injection.project_kv(app.adapter, features, app.combine)
    opts = dict(opts, **{CALL: Call([Step(app.injection, kv, 0.5, app.key)])})
    STASH["self"](n, n, n, opts)
    return ADD["self"](torch.zeros_like(n), opts)


def test_a_single_photo_combined_equals_the_plain_reference(model, caption):
    ref = encode(model, caption)
    plain = sample(apply(model, ref), caption)
    assert combine_references([ref]) is ref
    for mode in ("concat", "average"):
        assert torch.equal(sample(apply(model, ref, combine=mode), caption), plain)


def test_two_photos_combine_by_concat_or_average(model, caption):
    a, b = encode(model, caption, seed=1), encode(model, caption, seed=2)
    both = combine_references([a, b])
    assert both.images == 2 and both.context.shape[0] == 2
    assert set(both.features.sigmas()) == set(a.features.sigmas())
    f = both.features.get(both.features.sigmas()[0])
    assert next(iter(f.self_attn.values())).shape[0] == 2
    concat, average = sample(apply(model, both, combine="concat"), caption), sample(apply(model, both, combine="average"), caption)
    single = sample(apply(model, a), caption)
    assert not torch.equal(concat, average) and not torch.equal(concat, single)
    other = invert_latent(model, face_latent(1, 3), caption, STEPS + 1, "simple", (64, 64))
    with pytest.raises(ValueError, match="steps/scheduler"):
        combine_references([a, other])


def test_masks_zero_is_no_adapter_and_ones_is_no_mask(model, caption):
    ref = encode(model, caption)
    base = sample(model, caption)
    assert torch.equal(sample(apply(model, ref, mask=torch.zeros(1, 64, 64)), caption), base)
    assert torch.equal(sample(apply(model, ref, mask=torch.ones(1, 64, 64)), caption), sample(apply(model, ref), caption))


def test_two_masked_identities_act_on_their_own_regions(model, caption):
    a, b = encode(model, caption, seed=1), encode(model, caption, seed=2)
    left, right = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    left[..., :32], right[..., 32:] = 1.0, 1.0
    blocks = layout_of(model).blocks
    # block level, exactly: an identity's EAA term is zero outside its mask
    app = Application(init_from_model(""), a, model, 1.0, 1.0, 1e9, 0.0, mask=left)
    name, tb = next(iter(blocks.items()))
    n = torch.randn(2, 64, tb.attn1.to_q.in_features)
    features = a.features.get(a.features.sigmas()[0])
    opts = {"block": ("input", int(name.split(".")[1])), "block_index": 0, "cond_or_uncond": [0, 1],
            "activations_shape": [2, 0, 8, 8], "original_shape": [2, 4, 8, 8], "n_heads": tb.attn1.heads}
    delta = block_delta(app, features, name, n, opts).reshape(2, 8, 8, -1)
    assert delta[:, :, 4:].abs().max() == 0 and delta[:, :, :4].abs().max() > 0
    # image level: a random network's own self-attention spreads any change over the whole image, so the
    # difference images are compared with each other: each identity's change leans to its own half (at 16x16,
    # measured 0.61 left for the left mask, 0.37 left for the right mask)
    g = torch.Generator().manual_seed(5)
    noise, latent = torch.randn(1, 4, 16, 16, generator=g), torch.zeros(1, 4, 16, 16)
    run = lambda m: comfy.sample.sample(m, noise, STEPS, 4.0, "euler", "simple", [[caption, {}]],  # noqa: E731
                                        [[torch.zeros_like(caption), {}]], latent, disable_pbar=True, seed=5)
    base = run(model)
    left_share = []
    for ref, mask in ((a, left), (b, right)):
        diff = (run(apply(model, ref, mask=mask)) - base).abs().sum(dim=(0, 1))
        left_share.append((diff[:, :8].sum() / diff.sum()).item())
    assert left_share[0] > 0.55 and 1 - left_share[1] > 0.55 and left_share[0] - left_share[1] > 0.15, left_share
    both = run(apply(apply(model, a, mask=left), b, mask=right))
    assert torch.isfinite(both).all() and not torch.equal(both, base)


def test_a_level_weighted_zero_leaves_its_attention_unchanged(model, caption):
    ref = encode(model, caption)
    blocks = layout_of(model).blocks
    weights = BlockWeights.preset("coarse")
    app = Application(init_from_model(""), ref, model, 1.0, 1.0, 1e9, 0.0, block_weights=weights)
    features = ref.features.get(ref.features.sigmas()[0])
    seen = set()
    for name, tb in blocks.items():
        stage, number, _ = name.split(".")
        f = features.self_attn[name]
        side = int(f.shape[1] ** 0.5)
        level = level_of(stage, {8: 0, 4: 1, 2: 2}.get(side, 0), 3)
        opts = {"block": (stage, int(number)), "block_index": 0, "cond_or_uncond": [0],
                "activations_shape": [1, 0, side, side], "original_shape": [1, 4, 8, 8], "n_heads": tb.attn1.heads}
        n = torch.randn(1, side * side, tb.attn1.to_q.in_features)
        changed = bool(block_delta(app, features, name, n, opts).abs().max() > 0)
        assert changed == (weights.scale("self", level) != 0), (name, level)
        seen.add(level)
    assert {"input_high", "middle", "output_low"} <= seen


def test_attention_maps_have_the_reference_shape_and_sum_to_one(model, caption):
    ref = encode(model, caption, images=2)
    m = apply(model, ref, combine="concat")
    recorder = AttentionRecorder()
    m.model_options["transformer_options"][RECORDER_KEY] = recorder
    sample(m, caption)
    (key, maps), = recorder.reference.items()
    assert len(maps) == STEPS * len(layout_of(model).blocks)
    for mp in maps:
        assert torch.allclose(mp.sum(dim=1), torch.ones(mp.shape[0]), atol=1e-4)
    rendered = reference_maps(maps, images=2, latent_hw=(8, 8), out_hw=(64, 64))
    assert rendered.shape == (2, 64, 128)
    assert torch.allclose(rendered.sum(dim=(1, 2)), torch.ones(2), atol=1e-4)
    (out_maps,) = recorder.output.values()
    assert out_maps[0].shape[0] == 2 and out_maps[0].ndim == 3


def test_cond_only_leaves_the_negative_rows_untouched(model, caption):
    ref = encode(model, caption)
    blocks = layout_of(model).blocks
    app = Application(init_from_model(""), ref, model, 1.0, 1.0, 1e9, 0.0, apply_to="cond only")
    name, tb = next(iter(blocks.items()))
    n = torch.randn(4, 64, tb.attn1.to_q.in_features)
    features = ref.features.get(ref.features.sigmas()[0])
    for layout in ([0, 1], [1, 0]):
        opts = {"block": ("input", int(name.split(".")[1])), "block_index": 0, "cond_or_uncond": layout,
                "activations_shape": [4, 0, 8, 8], "original_shape": [4, 4, 8, 8], "n_heads": tb.attn1.heads}
        delta = block_delta(app, features, name, n, opts)
        uncond = slice(2, 4) if layout == [0, 1] else slice(0, 2)
        cond = slice(0, 2) if layout == [0, 1] else slice(2, 4)
        assert delta[uncond].abs().max() == 0 and delta[cond].abs().max() > 0
    both = apply(model, ref)
    cond_only = apply(model, ref, apply_to="cond only")
    assert torch.equal(sample(cond_only, caption, cfg=1.0), sample(both, caption, cfg=1.0))  # no negative pass
    assert not torch.equal(sample(cond_only, caption), sample(both, caption))
