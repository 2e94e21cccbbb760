"""The trainer on an SDXL-family UNet (ADM input, transformer depth above one), through its data-source extension
point: the tiny in-process SDXL model, a few steps, then the weights file applied by the loader's path."""
import pytest
import torch

from invadapter_core.adapter.application import apply_identity
from invadapter_core.reference.encode import invert_latent, reference_conds
from invadapter_core.adapter.fit import check_adapter_fits
from invadapter_core.train.config import ConfigError, load_config
from invadapter_core.train.data import TrainingSample
from invadapter_core.train.loop import train
from invadapter_core.adapter.weights import load_adapter
from support.sdxl_models import sdxl_pooled_output, sdxl_text_context, tiny_sdxl_model
from test_families import sample, sdxl_prompts


class Faces:
    """Four synthetic samples, each its own reference, with the ADM vectors the encode node would build; the empty
    prompt for caption dropout."""

    def __init__(self, model):
        self.items = []
        for i in range(4):
            latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i))
            context, pooled = sdxl_text_context(i), sdxl_pooled_output(i)
            x0 = model.model.process_latent_in(latent)
            conds = reference_conds(model, context, {"pooled_output": pooled}, x0, (64, 64))
            ref = invert_latent(model, latent, conds, 4, "simple", (64, 64), keep_features=False)
            self.items.append(TrainingSample(ref.states[0, 0], context[0], ref.sigmas.float(), ref.states[:, 0],
                                             context[0], f"face {i}", adm=conds["y"][0], reference_adm=conds["y"][0],
                                             pooled=pooled[0]))
        empty = reference_conds(model, torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)},
                                torch.zeros(1, 4, 8, 8), (64, 64))
        self.empty_context, self.empty_adm, self.empty_pooled = empty["c_crossattn"][0], empty["y"][0], \
            torch.zeros(1280)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def sdxl():
    torch.set_num_threads(1)
    return tiny_sdxl_model()


def test_the_trainer_learns_an_sdxl_adapter_the_loader_applies(sdxl, tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "data.resolution=64", "model.tokens_m=8",
                             "train.batch_size=2", "train.max_steps=3", "train.caption_dropout=0.5", "train.seed=2",
                             "train.checkpoint_every=0", "validation.every=0", "validation.holdout=0",
                             "train.export_dtype=float32"])
    result = train(cfg, sdxl, progress=False, data=Faces(sdxl))
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.dropped_captions > 0  # the empty prompt's ADM vector went through too
    adapter = load_adapter(str(result.weights))
    assert any(name.endswith(".2") for name in adapter.self_layers())  # depth 3 at the lowest level
    assert adapter.family == "SDXL" and adapter.has_cross
    check_adapter_fits(adapter, sdxl)
    ref = Faces(sdxl).items[0]
    x0 = sdxl.model.process_latent_in(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9)))
    conds = reference_conds(sdxl, sdxl_text_context(9), {"pooled_output": sdxl_pooled_output(9)}, x0, (64, 64))
    reference = invert_latent(sdxl, sdxl.model.process_latent_out(x0), conds, 4, "simple", (64, 64), cross=True)
    pos, neg = sdxl_prompts()
    out = sample(apply_identity(sdxl, adapter, reference, 1.0, 1.0, 0.0, 1.0), pos, neg)
    assert torch.isfinite(out).all() and not torch.equal(out, sample(sdxl, pos, neg))
    assert ref.adm.shape == (2816,)


def test_an_inpainting_checkpoint_is_refused_with_what_to_train_on(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "validation.every=0"])
    with pytest.raises(ConfigError, match="inpainting model: train the EAA on its base"):
        train(cfg, tiny_sdxl_model(in_channels=9), progress=False, data=[])
