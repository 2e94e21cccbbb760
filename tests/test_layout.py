"""The layout seam: one object per model, built once, that names the blocks as ComfyUI's patches see them and knows
their widths, levels and token grids (checked against what a real sampling run and a reference pass produce)."""
import pytest
import torch

import comfy.sample
from invadapter_core.arch.layout import ModelFamilyError, layout_of
from invadapter_core.arch.levels import LEVELS
from invadapter_core.arch.unet import UNetLayout
from invadapter_core.reference.capture import reference_pass


def test_one_layout_per_model_shared_by_its_clones(model):
    layout = layout_of(model)
    assert isinstance(layout, UNetLayout)
    assert layout_of(model.clone()) is layout and layout_of(model.model) is layout
    assert layout.family == "SD15" and layout.latent_channels == 4 and layout.downscale == 8


def test_block_names_are_what_the_patches_see(model, caption):
    """Every block a sampling run's attention patches run in maps to a block of the layout, and every block runs."""
    layout, seen = layout_of(model), []
    m = model.clone()
    m.set_model_attn1_patch(lambda q, k, v, extra: (seen.append(layout.block_at(extra)), (q, k, v))[1])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    comfy.sample.sample(m, noise, 1, 1.0, "euler", "simple", [[caption, {}]], [[caption, {}]],
                        torch.zeros(1, 4, 8, 8), disable_pbar=True, seed=0)
    assert seen == list(layout.blocks)  # one call per block, in execution order
    assert set(layout.levels) == set(layout.blocks) and set(layout.levels.values()) <= set(LEVELS)


def test_grids_widths_and_bytes_match_a_reference_pass(model, caption):
    layout = layout_of(model)
    x = torch.randn(1, 4, 8, 8)
    _, features = reference_pass(model.model, x, 1.0, {"c_crossattn": caption}, layout, cross=True)
    for name, f in features.self_attn.items():
        h, w = layout.grids((8, 8))[name]
        assert f.shape == (1, h * w, layout.dims[name][0]), name
    assert layout.tokens(64) == {k: v.shape[1] for k, v in features.self_attn.items()}
    fp32 = sum(f.numel() * 4 for f in features.self_attn.values())
    assert layout.feature_bytes_per_step(64, bytes_per_value=4) == fp32
    assert layout.feature_bytes_per_step(64, bytes_per_value=4, with_cross=True) == 2 * fp32


def test_a_level_subset_keeps_only_its_blocks(model, caption):
    layout = layout_of(model)
    keep = layout.at_levels({"middle"})
    assert keep == {n for n in layout.blocks if n.startswith("middle.")} and keep
    _, features = reference_pass(model.model, torch.randn(1, 4, 8, 8), 1.0, {"c_crossattn": caption}, layout,
                                 cross=False, keep=keep)
    assert set(features.self_attn) == keep


def test_a_network_without_a_layout_is_refused_naming_what_is_served():
    """SD3's MMDiT has no layout (its blocks take no attention patches); Flux and Chroma have one."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD3({"in_channels": 16, "patch_size": 2, "depth": 2, "pos_embed_max_size": 16,
                                         "num_patches": 256, "adm_in_channels": 8,
                                         "context_embedder_config": {"target": "torch.nn.Linear",
                                                                     "params": {"in_features": 32,
                                                                                "out_features": 128}}})
    config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    sd3 = comfy.model_patcher.ModelPatcher(config.get_model({}, device=cpu), cpu, cpu)
    with pytest.raises(ModelFamilyError, match=r"SD3 model's network is a OpenAISignatureMMDITWrapper, .*serves "
                                               r"SD1\.x, SD2\.x"):
        layout_of(sd3)
