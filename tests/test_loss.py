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
