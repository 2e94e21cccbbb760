"""What one training step computes (train/step.py), on plain tensors: the draws depend only on the seed and the
sample's draw id, the loss is eq. 6 through ComfyUI's x0 output, and loss terms are weighted by the [loss] config
section (a new term is one function in LOSS_TERMS and one key there)."""
import pytest
import torch

from invadapter_core.train import step
from invadapter_core.train.config import load_config


def batch_and_prediction(seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 8, 8)
    x0, eps, denoised = (torch.randn(shape, generator=g) for _ in range(3))
    sigmas = torch.tensor([0.5, 3.0])
    b = step.Batch(x0.clone(), x0, eps, sigmas, torch.zeros(2, 77, 8), torch.zeros(2, 77, 8), None, None)
    return b, step.Prediction(x0 + sigmas[:, None, None, None] * eps, denoised)


def test_draws_depend_only_on_seed_and_draw_id():
    a = step.draw(7, (4, 8, 8), seed=3, dropout=0.5, min_t=600, max_t=999)
    b = step.draw(7, (4, 8, 8), seed=3, dropout=0.5, min_t=600, max_t=999)
    c = step.draw(8, (4, 8, 8), seed=3, dropout=0.5, min_t=600, max_t=999)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[1], c[1])
    assert all(600 <= step.draw(i, (1,), 0, 0.0, 600, 999)[0] <= 999 for i in range(200))


def test_denoising_loss_is_the_epsilon_mse_of_eq_6():
    b, pred = batch_and_prediction()
    eps_hat = (pred.x - pred.denoised) / b.sigmas[:, None, None, None]
    assert torch.allclose(step.denoising_loss(b, pred), ((eps_hat - b.eps) ** 2).mean())


def test_terms_are_weighted_by_their_config_key(tmp_path, monkeypatch):
    b, pred = batch_and_prediction()
    assert torch.allclose(step.total_loss(b, pred, {"denoising": 2.0}), 2 * step.denoising_loss(b, pred))
    with pytest.raises(ValueError, match="every loss weight is 0"):
        step.total_loss(b, pred, {"denoising": 0.0})
    # a new term: one function, one key
    monkeypatch.setitem(step.LOSS_TERMS, "mean_x0", lambda batch, p: p.denoised.float().mean() ** 2)
    total = step.total_loss(b, pred, {"denoising": 1.0, "mean_x0": 0.5})
    assert torch.allclose(total, step.denoising_loss(b, pred) + 0.5 * pred.denoised.mean() ** 2)
    path = tmp_path / "train.toml"
    path.write_text("[loss]\ndenoising = 0.25\n")
    assert load_config(str(path)).loss.denoising == 0.25


def test_grouped_references_combine_as_inference_combines_one_identitys_photos():
    """MFF (train.references = K): sample i's K photos are combined exactly as InvAdapterApply combines several
    photos of one identity (concat / average), each sample on its own."""
    from invadapter_core.adapter.injection import Grouped, combine_images

    t = torch.randn(6, 5, 4)  # 3 samples x K = 2 photos, 5 tokens of 4 channels
    for mode in ("concat", "average"):
        grouped = combine_images(t, Grouped(mode, 2))
        assert grouped.shape == ((3, 10, 4) if mode == "concat" else (3, 5, 4))
        for i in range(3):
            assert torch.equal(grouped[i:i + 1], combine_images(t[2 * i:2 * i + 2], mode))
    with pytest.raises(ValueError, match="unknown combine mode"):
        combine_images(t, Grouped("sum", 2))


def test_identity_loss_is_the_weighted_cosine_distance_to_the_reference_and_needs_a_recognizer():
    b, pred = batch_and_prediction()
    with pytest.raises(ValueError, match="loss.identity needs a face recognizer"):
        step.identity_loss(b, pred)
    g = torch.Generator().manual_seed(1)
    projection = torch.randn(4 * 8 * 8, 16, generator=g)
    b.recognizer = lambda latent: latent.flatten(1) @ projection
    b.ref_clean = torch.randn(2, 4, 8, 8, generator=g)
    denoised = pred.denoised.clone().requires_grad_(True)
    loss = step.identity_loss(b, step.Prediction(pred.x, denoised))
    cos = torch.nn.functional.cosine_similarity(denoised.flatten(1) @ projection, b.ref_clean.flatten(1) @ projection)
    assert torch.allclose(loss, ((1 - cos) / (1 + b.sigmas ** 2)).mean())
    loss.backward()
    assert denoised.grad.abs().sum() > 0
    # the prediction equal to the reference: nothing to learn
    assert float(step.identity_loss(b, step.Prediction(pred.x, b.ref_clean))) < 1e-6
    # K = 2 photos per sample (rows 2i, 2i + 1): the target is their mean embedding, so two copies of one photo
    # give the same loss as the photo alone
    single = step.identity_loss(b, pred)
    b.references, b.ref_clean = 2, b.ref_clean.repeat_interleave(2, dim=0)
    assert torch.allclose(step.identity_loss(b, pred), single)
    assert "identity" in step.LOSS_TERMS and load_config(None, ["loss.identity=0.5"]).loss.identity == 0.5
