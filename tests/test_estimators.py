"""Flipout and local reparameterization against closed forms, for every layer type."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from torch import nn

import dnn2bnn
from dnn2bnn import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesLinear,
    Estimator,
)

# (Bayesian class, constructor arguments, input shape); small so a few thousand draws are cheap
LAYERS = [
    (BayesLinear, (6, 4), (3, 6)),
    (BayesConv1d, (2, 3, 3), (2, 2, 5)),
    (BayesConv2d, (2, 2, 2), (2, 2, 3, 3)),
    (BayesConv3d, (2, 2, 2), (1, 2, 3, 3, 3)),
    (BayesConvTranspose1d, (2, 3, 3), (2, 2, 4)),
    (BayesConvTranspose2d, (2, 2, 2), (2, 2, 3, 3)),
]
ESTIMATORS = list(Estimator)
DRAWS = 4000


pytestmark = pytest.mark.usefixtures("one_thread")


def _draws(layer, x, n):
    """``n`` independent forward passes, vectorized: each vmap slice draws its own noise."""
    with torch.no_grad():
        return torch.func.vmap(lambda _: layer(x), randomness="different")(torch.arange(n))


def _z_threshold(n_tests: int, alpha: float = 1e-4) -> float:
    """Two-sided normal quantile with a Bonferroni correction over ``n_tests`` statistics."""
    return NormalDist().inv_cdf(1 - alpha / (2 * n_tests))


def _layer(cls, args, estimator):
    layer = cls(*args, estimator=estimator, posterior_sigma_init=0.3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight_rho.add_(torch.rand_like(layer.weight_rho))  # unequal sigmas
        layer.bias_rho.add_(torch.rand_like(layer.bias_rho))
    return layer


def _analytic(layer, x):
    """Mean and variance of each output from the Jacobian of the mean-mode output (no formula
    shared with the estimators): the output is linear in the weights."""
    params = {"weight_mu": layer.weight_mu.detach(), "bias_mu": layer.bias_mu.detach()}

    def f(weight, bias):
        return torch.func.functional_call(layer, {"weight_mu": weight, "bias_mu": bias}, (x,))

    with dnn2bnn.set_mode(layer, "mean"), torch.no_grad():
        mean = f(*params.values())
        jw, jb = torch.func.jacrev(f, argnums=(0, 1))(*params.values())
    nd = mean.dim()
    var_w = (jw**2 * layer.posterior_sigma("weight").detach() ** 2).flatten(nd).sum(-1)
    var_b = (jb**2 * layer.posterior_sigma("bias").detach() ** 2).flatten(nd).sum(-1)
    return mean, var_w + var_b


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.value)
@pytest.mark.parametrize("cls, args, shape", LAYERS, ids=lambda v: getattr(v, "__name__", ""))
def test_monte_carlo_mean_and_variance_match_closed_form(cls, args, shape, estimator):
    layer = _layer(cls, args, estimator)
    x = torch.randn(shape, dtype=torch.float64)
    mean, var = _analytic(layer, x)
    outs = _draws(layer, x, DRAWS)
    n = mean.numel()
    threshold = _z_threshold(2 * n)
    # every output is Gaussian under all three estimators: z-scores of the sample mean, and of
    # the sample variance (sd of s^2 / v is sqrt(2 / (S - 1)) for S Gaussian draws)
    z_mean = (outs.mean(0) - mean) / (var / DRAWS).sqrt()
    z_var = (outs.var(0) / var - 1) / math.sqrt(2 / (DRAWS - 1))
    assert z_mean.abs().max() < threshold, z_mean.abs().max()
    assert z_var.abs().max() < threshold, z_var.abs().max()


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.value)
@pytest.mark.parametrize("cls, args, shape", LAYERS, ids=lambda v: getattr(v, "__name__", ""))
def test_mean_mode_ignores_the_estimator_and_gradients_reach_mu_and_rho(cls, args, shape, estimator):
    layer = _layer(cls, args, estimator)
    dnn = layer.to_dnn()
    x = torch.randn(shape, dtype=torch.float64)
    with dnn2bnn.set_mode(layer, "mean"):
        torch.testing.assert_close(layer(x), dnn(x))
    layer(x).square().sum().backward()
    for name in ("weight_mu", "weight_rho", "bias_mu", "bias_rho"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def _gradient_variance(layer, x, target, draws):
    grads = []
    for _ in range(draws):
        layer.zero_grad()
        nn.functional.mse_loss(layer(x), target).backward()
        grads.append(layer.weight_mu.grad.clone())
    return torch.stack(grads).var(0).sum().item()


@pytest.mark.parametrize(
    "cls, args, shape", [(BayesLinear, (30, 10), (128, 30)), (BayesConv2d, (3, 4, 3), (64, 3, 6, 6))]
)
def test_flipout_and_lrt_reduce_minibatch_gradient_variance(cls, args, shape):
    x = torch.randn(shape)
    layer = cls(*args, posterior_sigma_init=0.3)
    target = torch.randn_like(layer(x))
    variances = {}
    for estimator in ESTIMATORS:
        torch.manual_seed(1)
        dnn2bnn.set_estimator(layer, estimator)
        variances[estimator] = _gradient_variance(layer, x, target, draws=100)
    # with B independent examples the per-example noise averages out ~B-fold; the sample
    # variances of 100 draws are within ~30%, so a factor of 3 cannot come from chance
    assert variances[Estimator.FLIPOUT] < variances[Estimator.REPARAM] / 3, variances
    assert variances[Estimator.LRT] < variances[Estimator.REPARAM] / 3, variances


def test_shared_layer_with_flipout_uses_one_perturbation_per_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x), self.fc(x)

    # flipout would flip signs independently at each use: the conversion gives the shared
    # layer 'reparam' (one weight sample per call) and says so
    with pytest.warns(dnn2bnn.ConversionWarning, match="'reparam' instead"):
        bnn = dnn2bnn.transform_to_bnn_model(Twice(), estimator="flipout", posterior_sigma_init=0.5)
    assert bnn.fc.estimator is Estimator.REPARAM
    x = torch.randn(1, 4)
    torch.manual_seed(3)
    a, b = bnn(x)
    assert torch.equal(a, b)
    with dnn2bnn.set_mode(bnn, "mean"):
        mean, _ = bnn(x)
    assert not torch.equal(a, mean)
    assert bnn.fc._sample_cache is None


def test_subclass_with_own_forward_falls_back_to_reparam_with_warning():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Plain(nn.Linear):
        pass

    model = nn.Sequential(Scaled(3, 3), Plain(3, 2))
    with pytest.warns(dnn2bnn.ConversionWarning, match="has its own forward"):
        bnn = dnn2bnn.transform_to_bnn_model(model, estimator="lrt")
    assert bnn[0].estimator is Estimator.REPARAM and bnn[1].estimator is Estimator.LRT
    assert any("own forward" in note for note in bnn.conversion_report.notes)
    with dnn2bnn.set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(torch.ones(1, 3)), model(torch.ones(1, 3)))
    with pytest.warns(dnn2bnn.ConversionWarning, match="own forward"):
        BayesLinear.from_dnn(Scaled(3, 3), estimator="flipout")
    with pytest.warns(UserWarning, match="keep 'reparam'"):
        dnn2bnn.set_estimator(bnn, "flipout")
    with pytest.raises(ValueError, match="estimator must be one of"):
        dnn2bnn.set_estimator(bnn, "bbb")
