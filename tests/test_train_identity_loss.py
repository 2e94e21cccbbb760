"""The identity loss on real checkpoints (issue 21): ArcFace from an InsightFace recognition ONNX made differentiable
by onnx2torch (face.arcface_torch), behind the checkpoint's own VAE decode (train.identity). A tiny random ONNX
recognizer stands in for glintr100.onnx: its conversion gives the graph's own numbers, and training the tiny SD1.5
UNet with it sends gradients to the EAA weights and nothing else, and changes the EAA's update. The loss is on
when a recognizer is set, off without one; the config check refuses a recognizer file that is missing or no ONNX
model, in one line each."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the identity loss's ArcFace needs onnx + onnx2torch (requirements.txt)")
pytest.importorskip("onnx2torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from invadapter_core.face.arcface_torch import ArcFaceFileError, input_normalisation, load_arcface  # noqa: E402
from invadapter_core.train import step  # noqa: E402
from invadapter_core.train.__main__ import main as cli  # noqa: E402
from invadapter_core.train.identity import build_recognizer  # noqa: E402
from invadapter_core.train.loop import Trainer, train  # noqa: E402
from support import models  # noqa: E402
from test_train import RES, adapter_tensors, tiny_config, tiny_data  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

EMBED = 8


def tiny_recognizer(path: Path, seed: int = 0, normalises_itself: bool = False) -> dict:
    """A random ArcFace-shaped ONNX graph, [N, 3, 112, 112] -> [N, 8], built of the ops of InsightFace's IResNets
    (w600k_r50, glintr100): Conv (stride 2) -> BatchNormalization -> PRelu -> Conv -> Add (a residual) -> Conv
    (stride 8, to 7 x 7) -> Flatten -> Gemm -> BatchNormalization (the 1-D "features" layer), saved at ``path``; with
    ``normalises_itself`` the graph starts with InsightFace's Sub and Mul nodes. Returns its weights (numpy) for a
    direct evaluation."""
    rng = np.random.default_rng(seed)
    r = lambda *shape, s=0.3: rng.normal(0, s, shape).astype(np.float32)  # noqa: E731
    w = {"a_w": r(6, 3, 3, 3), "a_b": r(6, s=0.1), "bn_g": 1 + r(6, s=0.1), "bn_b": r(6, s=0.1), "bn_m": r(6, s=0.1),
         "bn_v": np.abs(1 + r(6, s=0.1)), "slope": np.full((6, 1, 1), 0.25, np.float32), "b_w": r(6, 6, 3, 3),
         "b_b": r(6, s=0.1), "c_w": r(4, 6, 8, 8, s=0.05), "c_b": r(4, s=0.1), "fc_w": r(EMBED, 4 * 7 * 7, s=0.1),
         "fc_b": r(EMBED, s=0.1), "f_g": 1 + r(EMBED, s=0.1), "f_b": r(EMBED, s=0.1), "f_m": r(EMBED, s=0.1),
         "f_v": np.abs(1 + r(EMBED, s=0.1))}
    node = helper.make_node
    nodes, first = [], "input.1"
    if normalises_itself:
        w.update(mean=np.float32(127.5), scale=np.float32(1 / 127.5))
        nodes += [node("Sub", ["input.1", "mean"], ["centred"], name="Sub_0"),
                  node("Mul", ["centred", "scale"], ["scaled"], name="Mul_1")]
        first = "scaled"
    nodes += [node("Conv", [first, "a_w", "a_b"], ["a"], name="Conv_2", strides=[2, 2], pads=[1, 1, 1, 1],
                   kernel_shape=[3, 3]),
              node("BatchNormalization", ["a", "bn_g", "bn_b", "bn_m", "bn_v"], ["bn"], name="BatchNorm_3",
                   epsilon=1e-5),
              node("PRelu", ["bn", "slope"], ["pr"], name="PRelu_4"),
              node("Conv", ["pr", "b_w", "b_b"], ["b"], name="Conv_5", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
              node("Add", ["pr", "b"], ["res"], name="Add_6"),
              node("Conv", ["res", "c_w", "c_b"], ["c"], name="Conv_7", strides=[8, 8], kernel_shape=[8, 8]),
              node("Flatten", ["c"], ["flat"], name="Flatten_8", axis=1),
              node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"], name="Gemm_9", transB=1),
              node("BatchNormalization", ["fc", "f_g", "f_b", "f_m", "f_v"], ["683"], name="BatchNorm_10",
                   epsilon=2e-5)]
    graph = helper.make_graph(nodes, "tiny-arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", EMBED])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def direct(w: dict, rgb: torch.Tensor) -> torch.Tensor:
    """The tiny graph evaluated by hand on 0..1 RGB at 112 px, with InsightFace's normalisation."""
    F = torch.nn.functional
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in w.items()}
    x = (rgb * 255 - 127.5) / 127.5
    a = F.conv2d(x, t["a_w"], t["a_b"], stride=2, padding=1)
    bn = F.batch_norm(a, t["bn_m"], t["bn_v"], t["bn_g"], t["bn_b"], training=False, eps=1e-5)
    pr = torch.where(bn >= 0, bn, 0.25 * bn)
    res = pr + F.conv2d(pr, t["b_w"], t["b_b"], padding=1)
    c = F.conv2d(res, t["c_w"], t["c_b"], stride=8)
    fc = c.flatten(1) @ t["fc_w"].T + t["fc_b"]
    return F.batch_norm(fc, t["f_m"], t["f_v"], t["f_g"], t["f_b"], training=False, eps=2e-5)


@pytest.fixture(scope="module")
def recognizer_file(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("recognizer") / "tiny_arcface.onnx"
    return path, tiny_recognizer(path)


def test_the_converted_recognizer_computes_the_graph_and_is_frozen(recognizer_file, tmp_path):
    path, w = recognizer_file
    arcface = load_arcface(str(path))
    assert arcface.size == (112, 112) and (arcface.mean, arcface.std) == (127.5, 127.5)
    assert all(not p.requires_grad for p in arcface.parameters()) and len(list(arcface.parameters())) > 0
    rgb = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0), requires_grad=True)
    emb = arcface(rgb)
    assert emb.shape == (2, EMBED)
    torch.testing.assert_close(emb, direct(w, rgb.detach()), rtol=1e-4, atol=1e-5)
    try:  # onnxruntime, where installed: the graph's own runtime agrees too
        import onnxruntime
    except ImportError:
        pass
    else:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = ((rgb.detach() * 255 - 127.5) / 127.5).numpy()
        torch.testing.assert_close(emb.detach(), torch.from_numpy(session.run(None, {"input.1": x})[0]),
                                   rtol=1e-4, atol=1e-5)
    emb.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0  # differentiable in the image, frozen itself
    assert all(p.grad is None for p in arcface.parameters())
    # another size is resized to the graph's 112 px first
    assert arcface(torch.rand(1, 3, 64, 64)).shape == (1, EMBED)
    # a graph that normalises itself (InsightFace's Sub/Mul rule) gets the raw 0..255 pixels
    inside = tmp_path / "normalising.onnx"
    w2 = tiny_recognizer(inside, normalises_itself=True)
    assert input_normalisation(onnx.load(str(inside))) == (0.0, 1.0)
    torch.testing.assert_close(load_arcface(str(inside))(rgb.detach()), direct(w2, rgb.detach()), rtol=1e-4,
                               atol=1e-5)
    (tmp_path / "notes.onnx").write_text("not a model\n")
    with pytest.raises(ArcFaceFileError, match="notes.onnx: not a readable ONNX model"):
        load_arcface(str(tmp_path / "notes.onnx"))


def identity_config(tiny_data, out: Path, recognizer: Path, weight: float):
    return tiny_config(tiny_data, out, **{"loss.identity": weight, "loss.recognizer": str(recognizer),
                                          "train.caption_dropout": 0.0, "train.max_steps": 2})


def test_the_identity_loss_trains_the_eaa_only_through_the_vae_and_arcface(tiny_data, tmp_path, clip_vae, tiny_model,
                                                                             recognizer_file):
    vae = clip_vae[1]
    path, _ = recognizer_file
    cfg = identity_config(tiny_data, tmp_path / "grad", path, 1.0)
    recognizer = build_recognizer(cfg, tiny_model, vae)
    unet_before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    vae_before = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}

    trainer = Trainer(cfg, tiny_model, progress=False, recognizer=recognizer)
    batch = trainer.batch(trainer.order.samples(trainer.data, 0), cfg.train.seed, 0.0)
    pred = step.predict(batch, trainer.generation, trainer.net)
    term = step.identity_loss(batch, pred)
    assert torch.isfinite(term) and 0 < float(term.detach()) < 2  # alpha_bar-weighted 1 - cos: a real, finite distance
    term.backward()
    grads = {n: p.grad for n, p in trainer.adapter.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values()), "no gradient reached the EAA"
    frozen = {"UNet": tiny_model.model, "VAE": vae.first_stage_model, "ArcFace": recognizer.arcface}
    for name, module in frozen.items():
        trainable = [n for n, p in module.named_parameters() if p.requires_grad or p.grad is not None]
        assert trainable == [], f"{name} parameters take gradients: {trainable[:3]}"
    identity_grads = {n: g.clone() for n, g in grads.items() if g is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    step.denoising_loss(batch, step.predict(batch, trainer.generation, trainer.net)).backward()
    # the identity term's own gradient is not the denoising one's: it adds something to the EAA's update
    assert any(not torch.allclose(g, p.grad) for n, p in trainer.adapter.named_parameters()
               for g in [identity_grads.get(n)] if g is not None and p.grad is not None)

    # the face is the central square (data.face_margin 0.5: half the side); loss.recognizer_resolution decodes
    # smaller, still differentiably
    assert recognizer.face(torch.zeros(1, 3, RES, RES)).shape[-2:] == (RES // 2, RES // 2)
    half = build_recognizer(tiny_config(tiny_data, tmp_path / "half", **{
        "loss.recognizer": str(path), "loss.recognizer_resolution": RES // 2}), tiny_model, vae)
    latent = batch.x0.clone().requires_grad_(True)
    assert half.decode(latent.detach()).shape[-2:] == (RES // 2, RES // 2)
    half(latent).sum().backward()
    assert latent.grad.abs().sum() > 0

    # two steps of the whole loop: with the identity loss the EAA ends elsewhere than without it
    runs = {}
    for weight in (0.0, 1.0):
        cfg = identity_config(tiny_data, tmp_path / f"run-{weight}", path, weight)
        result = train(cfg, tiny_model, progress=False, recognizer=recognizer if weight else None)
        assert result.step == 2 and all(np.isfinite(result.losses))
        runs[weight] = (result.losses, adapter_tensors(result.adapter))
    assert runs[1.0][0][0] > runs[0.0][0][0]  # the same batch: the identity term adds to the loss
    assert any(not torch.equal(runs[0.0][1][k], runs[1.0][1][k]) for k in runs[0.0][1])
    assert all(torch.equal(unet_before[k], v) for k, v in tiny_model.model.state_dict().items())
    assert all(torch.equal(vae_before[k], v) for k, v in vae.first_stage_model.state_dict().items())


def cli_config(tmp_path: Path) -> Path:
    (tmp_path / "c.toml").write_text(f"""[model]
checkpoint = "{models.shallow_sd15_checkpoint()}"
[data]
cache_dir = "cache"
[train]
output_dir = "run"
[loss]
identity = 0.5
""")
    (tmp_path / "notes.onnx").write_text("not a model\n")
    return tmp_path / "c.toml"


CASES = {
    "a missing file": (["loss.recognizer={tmp}/models/antelopev2/glintr100.onnx"],
                       "glintr100.onnx': does not exist; point it at an InsightFace recognition model"),
    "not an ONNX file": (["loss.recognizer={tmp}/notes.onnx"], "notes.onnx': not a readable ONNX model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_config_check_names_the_recognizer(tmp_path, capsys, case):
    sets, fragment = CASES[case]
    args = ["train", "--config", str(cli_config(tmp_path)), "--quiet"]
    for item in sets:
        args += ["--set", item.format(tmp=tmp_path)]
    code = cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("config error: loss.") and fragment in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_command_line_trains_with_the_recognizer(tiny_data, tmp_path, recognizer_file, capsys):
    """The identity loss is on when possible: `train` with loss.recognizer (relative to the config file) and the
    default loss.identity builds the recognizer from the checkpoint's VAE and trains, its logged loss above the same
    run's with loss.identity = 0; without a recognizer the term is off (the loss equals that run's), the run says so
    and its config.json records the weight it used."""
    _, cache, _ = tiny_data
    path, _ = recognizer_file
    (tmp_path / "recognizer.onnx").write_bytes(path.read_bytes())
    runs = {"on": 'recognizer = "recognizer.onnx"', "weight 0": 'identity = 0.0\nrecognizer = "recognizer.onnx"',
            "no recognizer": ""}
    losses, recorded = {}, {}
    for name, loss_section in runs.items():
        folder = name.replace(" ", "-")
        config = tmp_path / f"{folder}.toml"
        config.write_text(f"""[model]
checkpoint = "{models.shallow_sd15_checkpoint()}"
tokens_m = 16
[data]
cache_dir = "{cache}"
resolution = {RES}
[train]
output_dir = "run-{folder}"
batch_size = 1
max_steps = 1
checkpoint_every = 0
caption_dropout = 0.0
[validation]
every = 0
[loss]
{loss_section}
""")
        capsys.readouterr()
        assert cli(["train", "--config", str(config), "--quiet"]) == 0
        said = capsys.readouterr().out
        log = [json.loads(line) for line in (tmp_path / f"run-{folder}" / "log.jsonl").read_text().splitlines()]
        losses[name] = log[-1]["loss"]
        recorded[name] = json.loads((tmp_path / f"run-{folder}" / "config.json").read_text())["loss"]["identity"]
        assert (tmp_path / f"run-{folder}" / "invadapter.safetensors").is_file()
        assert ("identity loss on, weight 1" in said) == (name == "on"), said
        assert ("identity loss off: no recognizer" in said) == (name == "no recognizer"), said
    assert np.isfinite(losses["on"]) and losses["on"] > losses["weight 0"]
    assert losses["no recognizer"] == losses["weight 0"]
    assert recorded == {"on": 1.0, "weight 0": 0.0, "no recognizer": 0.0}
