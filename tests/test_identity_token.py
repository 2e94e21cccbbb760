"""IDAdapter's identity token (adapter/identity_token.py, adapter/identity_prompt.py): the map from the reference's
features to k token embeddings is trained jointly with the EAA (it gets gradients through the text path), saved in
the weights file and read back; the loader refuses a broken token map in one line; in a real prompt its embeddings
take the placeholder's place through ComfyUI's own tokenize / encode path."""
import json

import pytest
import torch

from invadapter_core.adapter.identity_prompt import encode_with_tokens, insert_tokens, placeholder_embedding, token_width
from invadapter_core.adapter.identity_token import (IdentityTokenMap, check_width, reference_tokens, summary_blocks,
                                                    summary_width)
from invadapter_core.adapter.weights import AdapterFileError, load_adapter, save_adapter
from invadapter_core.arch.layout import layout_of
from invadapter_core.train.config import ConfigError, load_config
from invadapter_core.train.data import TrainingSample
from invadapter_core.train.loop import Trainer
from invadapter_core.train.text_path import ClipTextPath

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 64


@pytest.fixture(scope="module")
def clip(clip_vae):
    return clip_vae[0]


class AppendPath:
    """A text path like the identity toy's: the tokens appended to the context."""

    def __init__(self, width):
        self.width, self.start = width, torch.zeros(width)
        self.calls = 0

    def __call__(self, captions, contexts, tokens):
        self.calls += 1
        assert len(captions) == len(contexts) == len(tokens)
        return torch.cat([contexts, tokens.to(contexts.dtype)], dim=1)


def samples(model, n=4, seed=0):
    """Training samples with a random 3-state trajectory (sigmas 0 < 0.5 < 3), captions of the UNet's width."""
    g = torch.Generator().manual_seed(seed)
    dim = layout_of(model).context_dim
    side = RES // 8
    out = []
    for i in range(n):
        states = torch.randn(3, 4, side, side, generator=g)
        states[1:] *= torch.tensor([0.5, 3.0])[:, None, None, None] + 1
        out.append(TrainingSample(torch.randn(4, side, side, generator=g), torch.randn(4, dim, generator=g),
                                  torch.tensor([0.0, 0.5, 3.0]), states, torch.randn(4, dim, generator=g),
                                  caption=f"photo {i}"))
    return out


def config(out, **extra):
    values = {"data.resolution": RES, "model.tokens_m": 4, "train.output_dir": str(out), "train.batch_size": 2,
              "train.max_steps": 2, "train.log_every": 1, "train.checkpoint_every": 0, "train.caption_dropout": 0.0,
              "validation.every": 0, "train.export_dtype": "float32", "train.resume": "no", "train.tensorboard": False,
              "model.identity_tokens": 2}
    values.update(extra)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def test_the_token_map_trains_with_the_eaa_and_is_saved_and_loaded(tiny_model, tmp_path):
    layout = layout_of(tiny_model)
    width = layout.context_dim
    path = AppendPath(width)
    trainer = Trainer(config(tmp_path), tiny_model, progress=False, data=samples(tiny_model), text_path=path)
    token = trainer.adapter.identity_token
    assert token is not None and token.tokens == 2 and token.width == width
    assert token.blocks == summary_blocks(layout) and token.norm.normalized_shape[0] == summary_width(layout,
                                                                                                   token.blocks)
    assert trainer.parameters["identity_token"] == sum(p.numel() for p in token.parameters())
    before = {k: v.clone() for k, v in token.state_dict().items()}
    # one micro-batch: the map's last layer gets a gradient through the text path (its weight starts at 0)
    loss = trainer.loss(0)
    loss.backward()
    assert token.fc2.weight.grad is not None and token.fc2.weight.grad.abs().sum() > 0
    assert token.fc2.bias.grad.abs().sum() > 0
    trainer.optimizer.zero_grad(set_to_none=True)
    result = trainer.run()
    assert path.calls >= 3
    moved = [k for k in before if not torch.equal(before[k], token.state_dict()[k])]
    assert "fc2.weight" in moved and "fc2.bias" in moved
    loaded = load_adapter(str(result.weights))
    assert loaded.identity_token is not None and loaded.identity_token.blocks == token.blocks
    for k, v in token.state_dict().items():
        assert torch.equal(loaded.identity_token.state_dict()[k], v.detach().cpu()), k


def test_the_trainer_refuses_a_token_without_a_text_path(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="model.identity_tokens needs a text path"):
        Trainer(config(tmp_path), tiny_model, progress=False, data=samples(tiny_model))


def test_a_reference_gives_its_tokens_averaged_over_its_photos(tiny_model):
    """At inference: one frozen reference pass at the trajectory's lowest positive sigma; R photos averaged."""
    from invadapter_core.reference.reference import Reference

    layout = layout_of(tiny_model)
    blocks = summary_blocks(layout)
    torch.manual_seed(0)
    token = IdentityTokenMap(summary_width(layout, blocks), 2, 16, 32, blocks)
    g = torch.Generator().manual_seed(1)
    states = torch.randn(3, 2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 4, layout.context_dim, generator=g)

    def ref(s, c):
        return Reference("SD15", (RES, RES), torch.tensor([0.0, 0.5, 3.0], dtype=torch.float64), s, {"c_crossattn": c})

    both = reference_tokens(tiny_model, token, ref(states, ctx))
    assert both.shape == (1, 2, 16)
    one = reference_tokens(tiny_model, token, ref(states[:, :1], ctx[:1]))
    other = reference_tokens(tiny_model, token, ref(states[:, 1:], ctx[1:]))
    assert not torch.allclose(one, other)
    # the state at sigma 0.5 is what it reads: the top of the trajectory does not matter
    changed = states[:, :1].clone()
    changed[2] += 1
    assert torch.equal(reference_tokens(tiny_model, token, ref(changed, ctx[:1])), one)
    with pytest.raises(ValueError, match="token embeddings are 32-d"):
        check_width(token, 32)


# ------------------------------------------------------------------------------------------------ the file
def saved_with_token(tmp_path, **meta_changes):
    from invadapter_core.adapter.eaa import InvAdapter, SelfEAA
    from invadapter_core.files.safetensors_io import save_atomic
    from invadapter_core.adapter.weights import adapter_state

    torch.manual_seed(0)
    token = IdentityTokenMap(96, 2, 16, 32, ["middle.0.0", "output.3.0"])
    adapter = InvAdapter("SD15", 64, None, {"middle.0.0": SelfEAA(32, 32)}, {}, name="t", identity_token=token)
    tensors, meta = adapter_state(adapter)
    for key, value in meta_changes.items():
        if value is None:
            meta.pop("invadapter." + key)
        else:
            meta["invadapter." + key] = value
    path = tmp_path / "a.safetensors"
    save_atomic(tensors, str(path), meta)
    return path, tensors, meta, token


def test_the_file_round_trips_the_token_map(tmp_path):
    path, _, meta, token = saved_with_token(tmp_path)
    assert meta["invadapter.identity_tokens"] == "2" and meta["invadapter.identity_token_width"] == "16"
    loaded = load_adapter(str(path)).identity_token
    assert (loaded.tokens, loaded.width, loaded.blocks) == (2, 16, ["middle.0.0", "output.3.0"])
    x = torch.randn(3, 96)
    assert torch.allclose(loaded(x), token(x))


@pytest.mark.parametrize("change, message", [
    ({"identity_token_width": "8"}, r"identity_token.fc2.weight' has shape \(32, 32\), expected \(16, 32\)"),
    ({"identity_tokens": None}, "metadata 'invadapter.identity_tokens' is missing"),
    ({"identity_token_blocks": '["nowhere"]'}, "identity_token_blocks' is"),
    ({"identity_tokens": "0"}, "must be at least 1"),
])
def test_the_loader_refuses_a_token_map_that_does_not_add_up_in_one_line(tmp_path, change, message):
    path, _, _, _ = saved_with_token(tmp_path, **change)
    with pytest.raises(AdapterFileError, match=message) as e:
        load_adapter(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_the_loader_refuses_a_token_map_with_a_missing_tensor(tmp_path):
    from invadapter_core.files.safetensors_io import save_atomic

    path, tensors, meta, _ = saved_with_token(tmp_path)
    del tensors["identity_token.fc1.bias"]
    save_atomic(tensors, str(path), meta)
    with pytest.raises(AdapterFileError, match="identity token lacks identity_token.fc1.bias"):
        load_adapter(str(path))


# ------------------------------------------------------------------------------------------------ real prompts
def test_the_placeholder_becomes_the_tokens_in_comfyuis_own_encoding(clip):
    width = token_width(clip)
    own = placeholder_embedding(clip)
    assert own.shape == (width,)
    text = "a photo of sks person in the snow"
    plain = clip.encode_from_tokens(clip.tokenize(text))
    same = clip.encode_from_tokens(insert_tokens(clip, text, own[None]))
    assert torch.allclose(same, plain, atol=1e-5)  # the placeholder's own embedding: the plain prompt
    sks = clip.tokenize("sks")["l"][0][1][0]
    where = [t[0] for t in clip.tokenize(text)["l"][0]].index(sks)
    other = clip.encode_from_tokens(insert_tokens(clip, text, torch.randn(2, width)))
    assert other.shape == plain.shape
    diff = (other - plain).abs().amax(-1)[0]
    assert float(diff[:where].max()) < 1e-5  # causal text transformer: nothing before the placeholder changes
    assert bool((diff[where:where + 2] > 1e-3).all())
    cond = encode_with_tokens(clip, text, torch.randn(1, width))
    assert cond[0][0].shape == plain.shape and "pooled_output" in cond[0][1]
    with pytest.raises(ValueError, match="no placeholder word 'sks'"):
        insert_tokens(clip, "a photo of a person", own[None])
    with pytest.raises(ValueError, match="this text encoder's token embeddings are"):
        encode_with_tokens(clip, text, torch.randn(1, width + 1))


def test_the_clip_text_path_is_differentiable_in_the_tokens(clip):
    path = ClipTextPath(clip)
    assert path.caption("a man") == "sks a man" and path.caption("sks, smiling") == "sks, smiling"
    tokens = torch.randn(2, 1, path.width, requires_grad=True)
    context = path(["a photo of sks", ""], torch.zeros(2, 77, path.width), tokens)
    assert context.shape == (2, 77, path.width)
    context.square().sum().backward()
    assert tokens.grad is not None and bool((tokens.grad.abs().sum(-1) > 0).all())


def test_the_trainer_trains_the_map_through_comfyuis_clip(tiny_model, clip, tmp_path):
    """A real checkpoint's text path: every caption re-encoded with the tokens in the placeholder's place."""
    path = ClipTextPath(clip)
    trainer = Trainer(config(tmp_path, **{"model.identity_tokens": 1}), tiny_model, progress=False,
                      data=samples(tiny_model), text_path=path)
    token = trainer.adapter.identity_token
    assert torch.equal(token(torch.randn(2, token.norm.normalized_shape[0]))[0, 0], path.start)  # starts as "sks"
    trainer.loss(0).backward()
    assert token.fc2.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ the node
def test_the_identity_prompt_node_puts_the_token_in_the_placeholders_place(pack, clip, tiny_model):
    from invadapter_core.adapter.eaa import InvAdapter
    from invadapter_core.reference.reference import Reference

    node = pack.nodes.identity_prompt.InvAdapterIdentityPrompt
    layout = layout_of(tiny_model)
    blocks = summary_blocks(layout)
    token = IdentityTokenMap(summary_width(layout, blocks), 1, token_width(clip), 64, blocks)
    token.start_from(placeholder_embedding(clip))
    adapter = InvAdapter("SD15", None, None, {}, {}, name="tok", self_from_base=True, identity_token=token)
    g = torch.Generator().manual_seed(3)
    reference = Reference("SD15", (RES, RES), torch.tensor([0.0, 0.5, 3.0], dtype=torch.float64),
                          torch.randn(3, 1, 4, 8, 8, generator=g), {"c_crossattn": torch.randn(1, 77, 768, generator=g)})
    text = "a photo of sks person in the snow"
    plain = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    # an untrained token is the placeholder word itself: the plain prompt's conditioning
    same = node.execute(tiny_model, clip, adapter, reference, text).args[0]
    assert torch.allclose(same[0][0], plain[0][0], atol=1e-5)
    assert torch.allclose(same[0][1]["pooled_output"], plain[0][1]["pooled_output"], atol=1e-5)
    with torch.no_grad():
        token.fc2.weight.normal_(generator=g)
    changed = node.execute(tiny_model, clip, adapter, reference, text).args[0][0][0]
    where = [t[0] for t in clip.tokenize(text)["l"][0]].index(clip.tokenize("sks")["l"][0][1][0])
    diff = (changed - plain[0][0]).abs().amax(-1)[0]
    assert float(diff[:where].max()) < 1e-5 and bool((diff[where:where + 3] > 1e-3).all())
    # another placeholder word
    other = node.execute(tiny_model, clip, adapter, reference, "a photo of ohwx man", placeholder="ohwx").args[0]
    assert other[0][0].shape == plain[0][0].shape
    with pytest.raises(ValueError, match="Inv-Adapter 'plain' has no identity token"):
        node.execute(tiny_model, clip, InvAdapter("SD15", None, None, {}, {}, name="plain", self_from_base=True),
                     reference, text)
    narrow = InvAdapter("SD15", None, None, {}, {}, name="narrow", self_from_base=True,
                        identity_token=IdentityTokenMap(summary_width(layout, blocks), 1, 32, 64, blocks))
    with pytest.raises(ValueError, match="identity token is 32-d, this text encoder's token embeddings are 768-d"):
        node.execute(tiny_model, clip, narrow, reference, text)
