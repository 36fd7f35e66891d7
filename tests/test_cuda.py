"""The same guarantees on a CUDA device (skipped without one; CI has none).

Run on a GPU machine with ``python -m pytest tests/test_cuda.py``. Each test compares the
GPU result with the CPU result or the deterministic network, so a failure names what
differs on the device: the fused KL kernels (multi-tensor, scale mixture), the sigma cache,
sampling statistics, vectorized prediction, mixed precision and checkpoints.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import dnn2bnn
from tests.conftest import LeNet5

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand(p.shape, generator=g).to(p.device) * 0.3)
    return model


def test_mean_mode_reproduces_the_dnn_and_sampling_varies():
    dnn = torchvision.models.resnet18(num_classes=10).to(DEVICE).eval()
    bnn = dnn2bnn.transform_to_bnn_model(dnn, posterior_sigma_init=0.01)
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    with torch.no_grad(), dnn2bnn.set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(x), dnn(x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(bnn(x), bnn(x))


@pytest.mark.parametrize("path", ["batched", "fused with the sample"])
@pytest.mark.parametrize("prior", [
    dnn2bnn.NormalPrior(0.1, 0.5), dnn2bnn.EmpiricalPrior(0.3), dnn2bnn.ScaleMixturePrior(0.5, 1.0, 0.05),
])
def test_kl_value_and_gradients_equal_the_cpu_ones(prior, path, monkeypatch):
    """The multi-tensor KL node (small parameters), the sample+KL node of a training forward
    (``SMALL_KL_NUMEL = 0`` sends every parameter there) and the fused mixture KL."""
    from dnn2bnn.layers import _kl

    if path != "batched":
        monkeypatch.setattr(_kl, "SMALL_KL_NUMEL", 0)
    cpu = _perturbed(dnn2bnn.transform_to_bnn_model(
        LeNet5(), prior=prior, posterior_sigma_init=0.05))
    gpu = copy.deepcopy(cpu).to(DEVICE)
    x = torch.randn(2, 1, 28, 28)
    results = []
    for model, inputs in ((cpu, x), (gpu, x.to(DEVICE))):
        if path != "batched" and not prior.needs_sample:
            model(inputs)  # leaves each parameter's KL, computed with its sample, for the loss
            assert all(m._pending_kl for m in model.modules() if dnn2bnn.is_bayesian_layer(m))
        if prior.needs_sample:  # the same weight sample on both devices
            with dnn2bnn.set_mode(model, "mean"):
                model(inputs)
            for m in model.modules():
                if dnn2bnn.is_bayesian_layer(m):
                    for name in m.bayes_params:
                        mu = getattr(m, name + "_mu")
                        m._kl_samples[name] = mu + 0.01 * torch.ones_like(mu)
        kl = dnn2bnn.kl_divergence(model)
        kl.backward()
        results.append((kl.detach().cpu(), [p.grad.cpu() for p in model.parameters()]))
    (kl_cpu, grads_cpu), (kl_gpu, grads_gpu) = results
    torch.testing.assert_close(kl_gpu, kl_cpu, rtol=1e-5, atol=1e-2)
    for got, want in zip(grads_gpu, grads_cpu):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sample_statistics_match_the_posterior():
    layer = dnn2bnn.BayesLinear(64, 32, posterior_sigma_init=0.2).to(DEVICE)
    draws = torch.stack([layer.weight.detach() for _ in range(400)])
    sigma = layer.posterior_sigma().detach()
    z = (draws.mean(0) - layer.weight_mu.detach()) / (sigma / 20.0)  # 400 draws: SE = sigma / 20
    assert z.abs().max() < 6.0
    ratio = draws.var(0) / sigma.square()
    assert (ratio.mean() - 1).abs() < 0.02  # 2048 weights x 400 draws


def test_sigma_follows_optimizer_steps_and_data_writes():
    layer = dnn2bnn.BayesLinear(8, 4).to(DEVICE)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.5, fused=True)
    x = torch.randn(16, 8, device=DEVICE)
    for _ in range(3):
        loss = layer(x).square().mean() + dnn2bnn.kl_divergence(layer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert not layer._pending_kl  # the KL's backward dropped this step's KL
    layer.weight_rho.data.fill_(0.0)  # sigma = exp(0) = 1, invisible to versions
    with torch.no_grad():
        draws = torch.stack([layer.weight - layer.weight_mu for _ in range(200)])
    assert abs(draws.std().item() - 1.0) < 0.04


def test_training_steps_reduce_the_loss_in_bf16_autocast():
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(LeNet5(), posterior_sigma_init=1e-3).to(DEVICE)
    x = torch.randn(64, 1, 28, 28, device=DEVICE)
    y = torch.randint(0, 10, (64,), device=DEVICE)
    criterion = dnn2bnn.WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=1000)
    optimizer = torch.optim.Adam(dnn2bnn.bayes_param_groups(bnn, lr=3e-3), fused=True)
    losses = []
    for _ in range(30):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = criterion(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5


def _one_position_cnn():
    """Its second convolution has one output position: local reparameterization in predict."""
    return nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(8, 16, 6),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16, 10))


@pytest.mark.parametrize("build", [LeNet5, _one_position_cnn])
def test_vectorized_prediction_agrees_with_the_loop(build):
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(build(), posterior_sigma_init=0.05).to(DEVICE)
    x = torch.randn(8, 1, 28, 28, device=DEVICE)
    fast = dnn2bnn.predict(bnn, x, 400)
    slow = dnn2bnn.predict(bnn, x, 400, method="loop")
    assert fast.method == "vectorized" and fast.probs.device.type == "cuda"
    torch.testing.assert_close(fast.probs, slow.probs, rtol=0, atol=0.03)


def test_checkpoint_round_trip_from_the_gpu(tmp_path):
    bnn = _perturbed(dnn2bnn.transform_to_bnn_model(LeNet5())).to(DEVICE)
    path = tmp_path / "bnn.safetensors"
    dnn2bnn.save_bnn(bnn, path)
    loaded = dnn2bnn.load_bnn(path)
    for (name, a), (_, b) in zip(bnn.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(b.cpu(), a.cpu(), msg=name)
