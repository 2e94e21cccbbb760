"""The trainer on MM-DiTs (issue 20): the joint EAA's K/V maps trained on a tiny random Flux from shards of flow
inversions that keep the guidance, gradients reaching those maps only; the training pass equal to what sampling
applies; the weight file naming its family and architecture, and the loader refusing it on another family."""
import json

import pytest
import torch
from safetensors.torch import save_file

from invadapter_core.adapter.fit import check_adapter_fits
from invadapter_core.adapter.joint import JointApplication, install_joint
from invadapter_core.adapter.weights import load_adapter
from invadapter_core.arch.layout import layout_of
from invadapter_core.files.validation import AdapterFileError
from invadapter_core.reference.encode import invert_latent, reference_conds
from invadapter_core.train import step
from invadapter_core.train.config import load_config
from invadapter_core.train.data import EMPTY_CONTEXT_FILE, ReferenceView, ShardSet, TrainingSample, write_shard
from invadapter_core.train.loop import Trainer
from invadapter_core.train.model import JointGenerationPass, build_adapter
from invadapter_core.train.preprocess import joint_conds, prompt_tensors
from support.flux_models import flux_text, tiny_chroma_model, tiny_flux_model
from support.models import tiny_sd15_model
from support.qwen_models import qwen_text, tiny_qwen_image_model
from test_flux import one_call

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 8
RES = 8 * SIDE


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_model()


def config(out, **extra):
    values = {"train.output_dir": str(out), "data.resolution": RES, "model.train_cross": False,
              "train.batch_size": 2, "train.max_steps": 12, "train.log_every": 4, "train.checkpoint_every": 0,
              "train.caption_dropout": 0.0, "validation.every": 0, "validation.holdout": 0,
              "train.export_dtype": "float32", "train.mixed_precision": "no", "train.tensorboard": False,
              "optim.lr": 3e-3, "optim.weight_decay": 0.0}
    values.update(extra)
    return load_config(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()])


def flux_shard(model, folder, count=4, steps=4):
    """What preprocessing writes for a batch of 'faces' on a flow model: each latent inverted on the model's flow
    schedule with the conditioning its sampler builds (pooled vector, guidance), the guidance kept per sample."""
    ctx = torch.cat([flux_text(i)[0] for i in range(count)])
    pooled = torch.cat([flux_text(i)[1]["pooled_output"] for i in range(count)])
    tensors = prompt_tensors(model, ctx, pooled, RES)
    conds = joint_conds(model, ctx, pooled, RES)
    latent = torch.randn(count, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(11))
    ref = invert_latent(model, latent, {"c_crossattn": ctx, "y": tensors["adm"], "guidance":
                                        conds["guidance"].expand(count)}, steps, "simple", (RES, RES),
                        keep_features=False)
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(str(folder / "shard-r000of001-00000.safetensors"), ref.states.movedim(1, 0), ctx, ref.sigmas.float(),
                [f"face {i}" for i in range(count)], [f"{i}.png" for i in range(count)],
                {"family": "Flux", "resolution": RES}, {"adm": tensors["adm"], "pooled": pooled,
                                                        "guidance": conds["guidance"].expand(count).contiguous()})
    empty, empty_pooled = flux_text(99, tokens=7)[0], flux_text(99)[1]["pooled_output"]
    save_file({k: v[0].contiguous() for k, v in prompt_tensors(model, empty, empty_pooled, RES).items()},
              str(folder / EMPTY_CONTEXT_FILE))
    return ShardSet(str(folder))


def test_preprocessing_conditioning_keeps_the_pooled_vector_and_guidance(flux):
    ctx, opts = flux_text(0)
    conds = joint_conds(flux, ctx, opts["pooled_output"], RES)
    assert set(conds) == {"c_crossattn", "y", "guidance"} and float(conds["guidance"]) == 3.5  # Flux-dev's default
    assert torch.equal(prompt_tensors(flux, ctx, opts["pooled_output"], RES)["adm"], opts["pooled_output"])
    chroma = joint_conds(tiny_chroma_model(), ctx, None, RES)
    assert set(chroma) == {"c_crossattn", "guidance"} and float(chroma["guidance"]) == 0.0


def test_flow_batches_noise_and_target_as_rectified_flow(flux, tmp_path):
    shards = flux_shard(flux, tmp_path / "cache")
    ms = flux.get_model_object("model_sampling")
    assert step.sigma_of(ms, 999) == pytest.approx(1.0) and 0 < step.sigma_of(ms, 0) < 0.01
    assert step.sigma_of(ms, 0) < step.sigma_of(ms, 500) < step.sigma_of(ms, 999)
    sample = shards[1]
    assert sample.guidance == 3.5 and sample.adm.shape == (8,)
    assert sample.reference_states.shape == (len(shards.sigmas), 16, SIDE, SIDE)
    batch = step.make_batch([(shards[0], 0), (shards[1], 1)], 0, 0.0, ms, (0, 999), None, None, torch.device("cpu"))
    assert batch.flow and torch.equal(batch.guidance, torch.tensor([3.5, 3.5]))
    gen = JointGenerationPass(build_adapter(flux, RES, 16, train_cross=False), flux)
    with torch.no_grad():
        pred = step.predict(batch, gen, gen)
    s = batch.sigmas[:, None, None, None]
    assert torch.allclose(pred.x, (1 - s) * batch.x0 + s * batch.eps)
    v_hat = (pred.x - pred.denoised) / s
    assert float(step.denoising_loss(batch, pred)) == pytest.approx(float(((v_hat - (batch.eps - batch.x0)) ** 2)
                                                                         .mean()), rel=1e-5)


def inverted_reference(flux, photos: int, seed: int):
    """(prompt, its conditioning, a reference of ``photos`` random photos inverted in 4 steps, a random adapter,
    the sigma of the trajectory's second state, a noisy latent to denoise there)."""
    ctx, opts = flux_text(0)
    latents = torch.randn(photos, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    conds = reference_conds(flux, ctx, dict(opts), latents, (RES, RES))
    ref = invert_latent(flux, latents, conds, 4, "simple", (RES, RES))
    adapter = build_adapter(flux, RES, 16, init="random", train_cross=False)
    x = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    return ctx, conds, ref, adapter, ref.features.sigmas()[1], x


def test_the_training_pass_is_what_sampling_applies(flux):
    """At a sigma of the reference's inversion, the training pass (reference features -> the adapter's maps -> the
    joint EAA) gives the same x0 prediction as sampling with JointApplication and those weights at strength 1."""
    ctx, conds, ref, adapter, sigma, x = inverted_reference(flux, photos=1, seed=5)
    gen = JointGenerationPass(adapter, flux)
    sigmas = torch.full((1,), sigma)
    with torch.no_grad():
        features = gen.reference_features(ref.latent_at(sigma), sigmas, ref.conds)
        trained = gen(x, sigmas, ctx, features.self_attn, None, conds["y"], conds["guidance"])
    applied = install_joint(flux, JointApplication(flux, ref, 1.0, adapter=adapter))
    m = applied.clone()
    options = {**m.model_options["transformer_options"], "wrappers": m.wrappers}
    with torch.no_grad():
        sampled = m.model.apply_model(x, sigmas, transformer_options=options, **conds)
        plain = flux.model.apply_model(x, sigmas, **conds)
    assert torch.allclose(trained, sampled, atol=1e-5) and not torch.allclose(trained, plain, atol=1e-3)
    # identity maps ('base' init) are the training-free EAA exactly
    identity = build_adapter(flux, RES, 16, train_cross=False)
    d = one_call(install_joint(flux, JointApplication(flux, ref, 1.0, adapter=identity)), x, sigma, conds,
                 "double.0")[1]
    free = one_call(install_joint(flux, JointApplication(flux, ref, 1.0)), x, sigma, conds, "double.0")[1]
    assert all(torch.equal(d[n], free[n]) for n in free)


@pytest.mark.parametrize("combine", ["concat", "average"])
def test_two_photos_per_target_train_as_apply_combines_them(flux, combine):
    """MFF on an MM-DiT: the training pass with K = 2 photos per sample gives what sampling gives with a two-photo
    reference combined the same way (each photo's K with RoPE, then side by side or averaged); in a batch, each
    sample reads its own two photos (sample-major rows)."""
    ctx, conds, ref, adapter, sigma, x = inverted_reference(flux, photos=2, seed=7)
    gen, one = JointGenerationPass(adapter, flux), torch.full((1,), sigma)
    with torch.no_grad():
        photos = gen.reference_features(ref.latent_at(sigma), torch.full((2,), sigma), ref.conds).self_attn
        trained = gen(x, one, ctx, photos, None, conds["y"], conds["guidance"], references=2, combine=combine)
        first_alone = gen(x, one, ctx, {n: f[:1] for n, f in photos.items()}, None, conds["y"], conds["guidance"])
        # two samples: the first with photos (0, 1), the second with (1, 0) or (0, 0)
        rows = {order: {n: f[list(order)] for n, f in photos.items()} for order in ((0, 1, 1, 0), (0, 1, 0, 0))}
        batch = {order: gen(x.expand(2, -1, -1, -1), torch.full((2,), sigma), ctx.expand(2, -1, -1), r, None,
                            conds["y"].expand(2, -1), conds["guidance"].expand(2), references=2, combine=combine)
                 for order, r in rows.items()}
    m = install_joint(flux, JointApplication(flux, ref, 1.0, adapter=adapter, combine=combine)).clone()
    options = {**m.model_options["transformer_options"], "wrappers": m.wrappers}
    with torch.no_grad():
        sampled = m.model.apply_model(x, one, transformer_options=options, **conds)
    assert torch.allclose(trained, sampled, atol=1e-5) and not torch.allclose(trained, first_alone, atol=1e-4)
    assert torch.allclose(batch[(0, 1, 1, 0)], trained.expand(2, -1, -1, -1), atol=1e-5)  # the photos' order is moot
    assert torch.allclose(batch[(0, 1, 0, 0)][:1], trained, atol=1e-5)
    assert not torch.allclose(batch[(0, 1, 0, 0)][1:], trained, atol=1e-4)


def test_k_2_and_the_identity_loss_train_the_joint_eaa(flux, tmp_path):
    """The defaults' two ingredients on Flux: train.references = 2 (a data source giving each sample a second photo)
    and the identity loss (a differentiable stand-in recognizer on the latent, flow-weighted): gradients reach the
    joint EAA, the identity term adds to the loss of the same batch, and a few steps train."""
    shards = flux_shard(flux, tmp_path / "cache")

    class TwoPhotos:  # sample i with image i + 1 as its second photo
        empty_context, empty_adm, empty_pooled = shards.empty_context, shards.empty_adm, shards.empty_pooled

        def __len__(self):
            return len(shards)

        def __getitem__(self, i):
            s, other = shards[i], shards[(i + 1) % len(shards)]
            s.more_references = (ReferenceView(other.reference_states, other.reference_context, other.reference_adm),)
            return s

    projection = torch.randn(16 * SIDE * SIDE, 8, generator=torch.Generator().manual_seed(0))
    recognizer = lambda latent: latent.flatten(1) @ projection  # noqa: E731 - differentiable stand-in
    plain = Trainer(config(tmp_path / "plain", **{"train.references": 2, "loss.identity": 0.0}), flux,
                    progress=False, data=TwoPhotos())
    trainer = Trainer(config(tmp_path / "run", **{"train.references": 2, "train.max_steps": 3}), flux,
                      progress=False, data=TwoPhotos(), recognizer=recognizer)
    assert trainer.loss_weights["identity"] == 1.0 and "identity loss on, weight 1" in trainer.choices
    with torch.no_grad():
        assert float(trainer.loss(0)) > float(plain.loss(0))  # the same batch: the identity term adds to it
    trainer.loss(0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.adapter.parameters())
    trainer.optimizer.zero_grad(set_to_none=True)
    result = trainer.run()
    assert result.step == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_a_few_steps_train_only_the_joint_eaa_and_lower_the_loss(flux, tmp_path):
    shards = flux_shard(flux, tmp_path / "cache")
    base_before = {k: v.clone() for k, v in flux.model.state_dict().items()}
    trainer = Trainer(config(tmp_path / "run"), flux, progress=False, data=shards)
    params = {id(p) for p in trainer.adapter.parameters()}
    assert len(params) == 2 * 4 and trainer.parameters["total"] == 4 * 2 * 32 * 32  # 4 blocks, K and V, 32x32
    # one backward: gradients reach the EAA maps, nothing else holds one
    trainer.loss(0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.adapter.parameters())
    assert all(p.grad is None for p in flux.model.parameters())
    trainer.optimizer.zero_grad(set_to_none=True)
    samples = list(shards)
    before = trainer.heldout_loss(samples=samples)
    result = trainer.run()
    after = trainer.heldout_loss(samples=samples)
    assert result.step == 12 and all(torch.isfinite(torch.tensor(result.losses)))
    assert after < 0.97 * before, (before, after)  # measured: 2.457 -> 2.223 (same timesteps and noise)
    assert all(torch.equal(base_before[k], v) for k, v in flux.model.state_dict().items()), "the base model changed"

    loaded = load_adapter(str(result.weights))
    assert (loaded.family, loaded.architecture) == ("Flux", "Flux") and set(loaded.self_layers()) == set(
        layout_of(flux).blocks)
    check_adapter_fits(loaded, flux)
    from safetensors import safe_open

    with safe_open(str(result.weights), framework="pt") as f:
        meta = f.metadata()
    assert meta["invadapter.base_family"] == "Flux" and meta["invadapter.architecture"] == "Flux"
    for other, family in ((tiny_chroma_model(), "Chroma"), (tiny_sd15_model(), "SD15"),
                          (tiny_qwen_image_model(), "QwenImage")):
        with pytest.raises(AdapterFileError) as refused:
            check_adapter_fits(loaded, other)
        message = str(refused.value)
        assert "Flux" in message and family in message and "\n" not in message, message


def test_a_unet_adapter_is_refused_on_flux_naming_both(flux, tmp_path):
    from invadapter_core.adapter.weights import save_adapter

    sd = build_adapter(tiny_sd15_model(), RES, 16, train_cross=False)
    save_adapter(sd, str(tmp_path / "sd.safetensors"))
    with pytest.raises(AdapterFileError) as refused:
        check_adapter_fits(load_adapter(str(tmp_path / "sd.safetensors")), flux)
    assert "SD15" in str(refused.value) and "Flux" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="no cross-attention"):
        build_adapter(flux, RES, 16)


def test_qwen_image_trains_through_its_attention_override(tmp_path):
    """The second family: one backward through a tiny Qwen-Image (5-D latents, the override slot) reaches every
    block's K/V maps and nothing else."""
    qwen = tiny_qwen_image_model()
    x0 = torch.randn(2, 16, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    ctx = torch.cat([qwen_text(0), qwen_text(1)])
    ref = invert_latent(qwen, x0, {"c_crossattn": ctx}, 3, "simple", (RES, RES), keep_features=False)
    states = ref.states.movedim(1, 0)
    samples = [TrainingSample(states[i, 0], ctx[i], ref.sigmas.float(), states[i], ctx[i]) for i in range(2)]
    trainer = Trainer(config(tmp_path, **{"train.max_steps": 1}), qwen, progress=False, data=samples)
    trainer.loss(0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.adapter.parameters())
    assert all(p.grad is None for p in qwen.model.parameters())
    assert len(list(trainer.adapter.parameters())) == 2 * 3


def test_the_gradient_matches_finite_differences(flux, tmp_path):
    """Flux's blocks add residuals in place into tensors their norms saved: the trainer keeps copies of saved tensors
    (``train.model.differentiable_ops``), so the backward pass gives the true gradient (central differences along
    a random direction of every EAA map)."""
    shards = flux_shard(flux, tmp_path / "cache")
    trainer = Trainer(config(tmp_path / "run", **{"model.init": "random"}), flux, progress=False, data=shards)
    batch = trainer.batch([(shards[0], 0), (shards[1], 1)], 0, 0.0)
    params = list(trainer.adapter.parameters())
    loss = trainer.loss_of(batch, trainer.generation)
    loss.backward()
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=g) for p in params]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
    eps = 1e-2
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(float(trainer.loss_of(batch, trainer.generation)))
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic) > 1e-3 and numeric == pytest.approx(analytic, rel=2e-2), (analytic, numeric)


def test_preprocess_inverts_faces_on_the_flow_schedule_and_keeps_the_guidance(tmp_path):
    """The trainer's own preprocessing on a flow model, with ComfyUI's CLIP-L and VAE of the shallow SD1.5 test
    checkpoint (a tiny Flux with 4 latent channels and CLIP-L-wide text and pooled inputs takes them): the shards
    hold the inversion on the model's flow schedule with its guidance (Flux-dev's default 3.5) and pooled vector,
    and the trainer trains on them, with the identity loss too (that VAE's decode and a tiny ONNX ArcFace)."""
    import comfy.sd
    from test_train import astronaut_images

    from invadapter_core.reference.encode import sampler_sigmas
    from invadapter_core.reference.inversion import inversion_sigmas
    from invadapter_core.train.distributed import DistInfo
    from invadapter_core.train.preprocess import preprocess
    from support.models import shallow_sd15_checkpoint

    _, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(shallow_sd15_checkpoint()), output_vae=True,
                                                            output_clip=True, output_model=False)
    model = tiny_flux_model(in_channels=4, out_channels=4, context_in_dim=768, vec_in_dim=768)
    astronaut_images(tmp_path / "images", bad=False)
    cfg = config(tmp_path / "run", **{"data.source": str(tmp_path / "images"), "data.face_crop": "center",
                                      "data.cache_dir": str(tmp_path / "cache"), "data.inversion_steps": 3,
                                      "train.max_steps": 2})
    summary = preprocess(cfg, model, clip, vae, DistInfo(), progress=False)
    assert summary["kept"] == 3 and summary["skipped"] == 0
    shards = ShardSet(str(tmp_path / "cache"))
    want = inversion_sigmas(sampler_sigmas(model, 3, "simple"))
    assert shards.sigmas.tolist() == pytest.approx(want) and want[-1] == pytest.approx(1.0)  # the flow schedule
    sample = shards[0]
    assert sample.guidance == 3.5 and sample.adm.shape == (768,) and sample.reference_states.shape[1:] == (4, 8, 8)
    assert shards.empty_adm is not None and shards.empty_adm.shape == (768,)
    result = Trainer(cfg, model, progress=False).run()
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))

    # the identity loss on a flow model, through the real VAE decode and a converted ONNX ArcFace stand-in: a finite,
    # flow-weighted distance whose gradient reaches the joint EAA and nothing frozen
    from test_train_identity_loss import tiny_recognizer

    from invadapter_core.train.identity import build_recognizer

    tiny_recognizer(tmp_path / "arcface.onnx")
    cfg = config(tmp_path / "run-identity", **{"data.cache_dir": str(tmp_path / "cache"),
                                               "loss.recognizer": str(tmp_path / "arcface.onnx")})
    recognizer = build_recognizer(cfg, model, vae)
    trainer = Trainer(cfg, model, progress=False, recognizer=recognizer)
    batch = trainer.batch(trainer.order.samples(trainer.data, 0), cfg.train.seed, 0.0)
    term = step.identity_loss(batch, step.predict(batch, trainer.generation, trainer.net))
    assert torch.isfinite(term) and 0 < float(term.detach()) < 2
    term.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.adapter.parameters())
    frozen = (model.model, vae.first_stage_model, recognizer.arcface)
    assert all(p.grad is None for m in frozen for p in m.parameters())


def test_the_trainer_loads_flux_from_its_separate_files(tmp_path):
    """Flux ships as a diffusion-model file, text encoders and a VAE: the trainer's config names them and the CLI
    loads them with ComfyUI's own loaders (the tiny Flux UNET; CLIP-L standing in for T5, as in the server tests)."""
    import subprocess

    from invadapter_core.train.config_check import check_config
    from invadapter_core.train.model import load_configured_base
    from support import flux_files, host, models

    files = {"model.diffusion_model": str(flux_files.flux_unet_file()), "model.clip_type": "sd3",
             "model.text_encoders": [str(models.clip_l_file())], "model.vae": str(flux_files.flux_vae_file())}
    cfg = config(tmp_path, **files)
    model, clip, vae = load_configured_base(cfg, "auto", True, True)
    assert layout_of(model).family == "Flux" and clip is not None and vae.latent_channels == 16
    assert not any(p.requires_grad for p in model.model.parameters())  # frozen
    assert not [p for p in check_config(cfg, "count") if p.startswith("model.")]
    both = config(tmp_path, **files, **{"model.checkpoint": str(models.adapter_file())})
    assert any("model.checkpoint and model.diffusion_model are both set" in p for p in check_config(both, "count"))
    wrong = config(tmp_path, **dict(files, **{"model.clip_type": "t5"}))
    assert any(p.startswith("model.clip_type = 't5': not a text-encoder type") for p in check_config(wrong, "count"))
    settings = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in files.items()]
    done = subprocess.run([host.python_exe(), "-m", "invadapter_core.train", "count", "--quiet",
                           *[a for s in settings for a in ("--set", s)], "--set", f"data.resolution={RES}",
                           "--set", "model.train_cross=false"],
                          cwd=host.ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "self" in done.stdout, done.stdout
