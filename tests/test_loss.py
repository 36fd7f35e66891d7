import pytest
import torch
from torch import nn

import dnn2bnn
from dnn2bnn import WithBNNLoss, kl_divergence, transform_to_bnn_model
from tests.conftest import LeNet5, mlp


def test_kl_divergence_sums_every_layer():
    bnn = transform_to_bnn_model(LeNet5())
    layers = [m for m in bnn.modules() if isinstance(m, dnn2bnn.BayesianLayer)]
    torch.testing.assert_close(kl_divergence(bnn), sum(layer.kl() for layer in layers))
    assert kl_divergence(mlp()).item() == 0.0


def test_with_bnn_loss_arithmetic():
    bnn = transform_to_bnn_model(mlp((6, 4, 3)), posterior_sigma_init=0.1)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    criterion = WithBNNLoss(bnn, loss_fn, dnn_factor=0.7, bnn_factor=0.01)
    with dnn2bnn.set_mode(bnn, "mean"):  # deterministic forward to compare the arithmetic
        loss = criterion(x, y)
        expected = 0.7 * loss_fn(bnn(x), y) + 0.01 * kl_divergence(bnn)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(criterion.last_kl, kl_divergence(bnn).detach())
    assert criterion.backbone is bnn and "bnn_factor=0.01" in repr(criterion)


def test_elbo_scaling():
    bnn = transform_to_bnn_model(mlp())
    criterion = WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=50_000)
    assert criterion.dnn_factor == 1.0 and criterion.bnn_factor == pytest.approx(2e-5)
    with pytest.raises(ValueError, match="num_train_examples must be >= 1"):
        WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=0)
    with pytest.raises(TypeError, match="num_train_examples must be an int"):
        WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=5.0)


def test_bad_factors_and_arguments():
    bnn = transform_to_bnn_model(mlp())
    with pytest.raises(ValueError, match="bnn_factor must be finite and >= 0"):
        WithBNNLoss(bnn, nn.MSELoss(), bnn_factor=-1)
    with pytest.raises(TypeError, match="dnn_factor must be a real number"):
        WithBNNLoss(bnn, nn.MSELoss(), dnn_factor="1")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        WithBNNLoss(bnn, 3)
    with pytest.warns(UserWarning, match="has no Bayesian layer"):
        WithBNNLoss(mlp(), nn.MSELoss())


def test_gradients_flow_through_loss_to_every_posterior_parameter():
    bnn = transform_to_bnn_model(LeNet5())
    criterion = WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=100)
    criterion(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))).backward()
    for name, param in bnn.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_kl_divergence_batches_small_parameters_without_changing_the_result(monkeypatch):
    """Small float32 parameters with a closed-form KL share one multi-tensor node; the value
    and every gradient equal the per-layer sum, whatever the prior and size mix."""
    from dnn2bnn.layers import _kl

    monkeypatch.setattr(_kl, "SMALL_KL_NUMEL", 500)  # some large, some small here
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 30), nn.ReLU(),
        nn.Linear(30, 10), nn.Linear(10, 3), nn.Linear(3, 2, dtype=torch.float64),
    )
    bnn = dnn2bnn.transform_to_bnn_model(
        net,
        config=dnn2bnn.BayesConfigMapping()
        .set_global(dnn2bnn.BayesConfig(prior=dnn2bnn.NormalPrior(0.1, 0.5), posterior_sigma_init=0.05))
        .set_module_name("4", dnn2bnn.BayesConfig(prior=dnn2bnn.EmpiricalPrior(0.3)))
        .set_module_name("5", dnn2bnn.BayesConfig(prior=dnn2bnn.ScaleMixturePrior(0.5, 1.0, 0.1))),
    )
    with torch.no_grad():
        for p in bnn.parameters():
            p.add_(torch.rand_like(p) * 0.3)
    x = torch.randn(2, 1, 8, 8)
    torch.manual_seed(1)
    bnn[:6](x)  # a forward pass, so the scale-mixture layer has its sample
    total = dnn2bnn.kl_divergence(bnn)
    total.backward()
    grads = [p.grad.clone() for p in bnn.parameters()]
    bnn.zero_grad()
    torch.manual_seed(1)
    bnn[:6](x)  # the same Monte Carlo sample for the reference
    reference = sum(m.kl().to(torch.float64) for m in bnn.modules() if dnn2bnn.is_bayesian_layer(m))
    reference.backward()
    torch.testing.assert_close(total.to(torch.float64), reference, rtol=1e-6, atol=1e-3)
    for (name, p), got in zip(bnn.named_parameters(), grads):
        torch.testing.assert_close(got, p.grad, msg=name)
