"""Priors: closed forms, the Monte Carlo KL of the scale mixture, empirical prior, MOPED, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dnn2bnn
from dnn2bnn import BayesLinear, EmpiricalPrior, Estimator, NormalPrior, ScaleMixturePrior
from dnn2bnn.priors import mixture_log_prob

from tests.conftest import mlp

PRIORS = [NormalPrior(0.1, 0.5), ScaleMixturePrior(0.5, 1.0, 0.05), EmpiricalPrior(0.2)]


def test_normal_closed_form_equals_torch_distributions():
    layer = BayesLinear(5, 3, prior=NormalPrior(0.1, 0.7), posterior_sigma_init=0.2)
    with torch.no_grad():
        layer.weight_rho.add_(torch.rand_like(layer.weight_rho))
    expected = 0.0
    for name in ("weight", "bias"):
        q = torch.distributions.Normal(getattr(layer, name + "_mu"), layer.posterior_sigma(name))
        p = torch.distributions.Normal(torch.tensor(0.1), torch.tensor(0.7))
        expected = expected + torch.distributions.kl_divergence(q, p).sum()
    torch.testing.assert_close(layer.kl(), expected)


def _numerical_kl(mu, sigma, buffers, points=4001):
    """Sum over weights of the integral of q (log q - log p), on mu +- 10 sigma."""
    t = torch.linspace(-10, 10, points, dtype=torch.float64)
    w = mu.reshape(-1, 1) + sigma.reshape(-1, 1) * t
    q = torch.distributions.Normal(mu.reshape(-1, 1), sigma.reshape(-1, 1))
    integrand = q.log_prob(w).exp() * (q.log_prob(w) - mixture_log_prob(w, buffers))
    return torch.trapezoid(integrand, w, dim=-1).sum()


@pytest.mark.usefixtures("one_thread")
def test_scale_mixture_monte_carlo_kl_matches_numerical_integration():
    prior = ScaleMixturePrior(0.3, 1.0, 0.05)
    layer = BayesLinear(4, 3, prior=prior, posterior_sigma_init=0.1, dtype=torch.float64)
    with torch.no_grad():
        layer.weight_rho.add_(torch.rand_like(layer.weight_rho))
    expected = 0.0
    for name in ("weight", "bias"):
        buffers = {k: getattr(layer, f"{name}_prior_{k}") for k in ("pi", "sigma1", "sigma2")}
        mu = getattr(layer, name + "_mu").detach()
        expected += _numerical_kl(mu, layer.posterior_sigma(name).detach(), buffers).item()
    x = torch.randn(2, 4, dtype=torch.float64)
    draws = 1500
    estimates = torch.empty(draws, dtype=torch.float64)
    for i in range(draws):
        layer(x)
        estimates[i] = layer.kl().detach()
    tolerance = 5 * estimates.std().item() / math.sqrt(draws)
    assert abs(estimates.mean().item() - expected) < tolerance, (estimates.mean(), expected)


def test_scale_mixture_kl_uses_the_forward_sample_once():
    layer = BayesLinear(4, 3, prior=ScaleMixturePrior(0.5, 1.0, 0.1), posterior_sigma_init=0.2)
    kl_before_forward = layer.kl()  # no forward yet: draws a sample
    assert torch.isfinite(kl_before_forward) and layer._kl_samples == {}
    layer(torch.randn(2, 4))
    sample = layer._kl_samples["weight"]
    sigma = layer.posterior_sigma()
    mu = layer.weight_mu
    log_q = torch.distributions.Normal(mu, sigma).log_prob(sample)
    buffers = {"pi": layer.weight_prior_pi, "sigma1": layer.weight_prior_sigma1,
               "sigma2": layer.weight_prior_sigma2}
    weight_term = (log_q - mixture_log_prob(sample, buffers)).sum()
    bias_sample = layer._kl_samples["bias"]
    kl = layer.kl()
    bias_q = torch.distributions.Normal(layer.bias_mu, layer.posterior_sigma("bias"))
    bias_buffers = {k: getattr(layer, f"bias_prior_{k}") for k in ("pi", "sigma1", "sigma2")}
    bias_term = (bias_q.log_prob(bias_sample) - mixture_log_prob(bias_sample, bias_buffers)).sum()
    torch.testing.assert_close(kl, weight_term + bias_term)
    assert layer._kl_samples == {}  # released by kl()
    kl.backward()
    assert layer.weight_mu.grad is not None and layer.weight_rho.grad.abs().sum() > 0
    with torch.no_grad():
        layer(torch.randn(2, 4))
    assert layer._kl_samples == {}  # nothing kept without autograd


@pytest.mark.parametrize("parametrization", ["exp", "softplus"])
@pytest.mark.parametrize("pi, sigma1, sigma2", [(0.5, 1.0, math.exp(-6)), (0.25, 0.1, 2.0)])
def test_fused_scale_mixture_kl_equals_the_reference_in_value_and_gradient(pi, sigma1, sigma2, parametrization):
    """The layer's fused Monte Carlo KL against ScaleMixturePrior.kl through autograd, at the
    same weight sample, for the value and every gradient (mu and rho, through the sample)."""
    prior = ScaleMixturePrior(pi, sigma1, sigma2)
    layer = BayesLinear(
        30, 20, prior=prior, posterior_sigma_init=0.05, dtype=torch.float64, parametrization=parametrization
    )
    with torch.no_grad():
        layer.weight_rho.add_(torch.rand_like(layer.weight_rho))
        layer.weight_mu.mul_(50.0)  # weights far in both components' tails too
    layer(torch.randn(3, 30, dtype=torch.float64))
    samples = dict(layer._kl_samples)
    fused = layer.kl()
    fused.backward()
    grads = [p.grad.clone() for p in (layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho)]
    layer.zero_grad()
    reference = 0.0
    for name in ("weight", "bias"):
        mu, rho = getattr(layer, name + "_mu"), getattr(layer, name + "_rho")
        sigma = torch.exp(rho) if parametrization == "exp" else nn.functional.softplus(rho)
        # the same draw, as a function of mu and rho
        w = mu + sigma * ((samples[name] - mu) / sigma).detach()
        buffers = {k: getattr(layer, f"{name}_prior_{k}") for k in ("pi", "sigma1", "sigma2")}
        reference = reference + prior.kl(mu, sigma, buffers, w)
    reference.backward()
    torch.testing.assert_close(fused, reference.detach())
    expected = [p.grad for p in (layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho)]
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_empirical_prior_and_moped_initialisation():
    dnn = nn.Linear(6, 4)
    bnn = BayesLinear.from_dnn(dnn, prior=EmpiricalPrior(0.1), moped_delta=0.05)
    torch.testing.assert_close(bnn.weight_prior_mu, dnn.weight.detach())
    torch.testing.assert_close(bnn.bias_prior_mu, dnn.bias.detach())
    torch.testing.assert_close(bnn.posterior_sigma(), 0.05 * dnn.weight.detach().abs())
    # KL at the trained weights is only the sigma part: sum of KL(N(w, s^2) || N(w, 0.1^2))
    s = torch.cat([0.05 * dnn.weight.detach().abs().flatten(), 0.05 * dnn.bias.detach().abs()])
    expected = (0.5 * ((s / 0.1) ** 2 - 1 - torch.log((s / 0.1) ** 2))).sum()
    torch.testing.assert_close(bnn.kl(), expected)
    with torch.no_grad():
        bnn.weight_rho.fill_(3.0)
    bnn.reset_parameters()
    torch.testing.assert_close(bnn.posterior_sigma(), 0.05 * bnn.weight_mu.detach().abs())


@pytest.mark.parametrize("estimator", list(Estimator), ids=lambda e: e.value)
@pytest.mark.parametrize("prior", PRIORS, ids=lambda p: type(p).__name__)
def test_priors_and_estimators_survive_save_and_load(tmp_path, prior, estimator):
    bnn = dnn2bnn.transform_to_bnn_model(mlp((5, 6, 3)), prior=prior, estimator=estimator)
    with torch.no_grad():  # move away from the initial state so a reload has to restore it
        for p in bnn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(bnn.state_dict(), tmp_path / "state.pt")
    torch.save(bnn, tmp_path / "model.pt")
    fresh = dnn2bnn.transform_to_bnn_model(mlp((5, 6, 3)), prior=prior, estimator=estimator)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    pickled = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (fresh, pickled):
        torch.manual_seed(5)
        expected = dnn2bnn.kl_divergence(bnn)
        torch.manual_seed(5)
        torch.testing.assert_close(dnn2bnn.kl_divergence(other), expected)
    assert pickled[0].prior == prior and pickled[0].estimator is estimator
    x = torch.randn(4, 5)
    torch.manual_seed(7)
    y = bnn(x)
    torch.manual_seed(7)
    torch.testing.assert_close(pickled(x), y)


def test_to_dnn_removes_every_prior_buffer_after_a_forward():
    layer = BayesLinear(3, 2, prior=ScaleMixturePrior())
    layer(torch.ones(1, 3))  # keeps a sample with an autograd graph
    dnn = layer.to_dnn()
    assert type(dnn) is nn.Linear and dict(dnn.named_buffers()) == {}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ScaleMixturePrior(pi=1.5), r"ScaleMixturePrior.pi must be in \(0, 1\]"),
        (lambda: ScaleMixturePrior(sigma2=0.0), "ScaleMixturePrior.sigma2 must be > 0"),
        (lambda: EmpiricalPrior("1"), "EmpiricalPrior.sigma must be a real number"),
        (lambda: BayesLinear(3, 2, prior={"sigma": 1.0}), "prior must be one of"),
        (lambda: BayesLinear(3, 2, moped_delta=-1.0), "moped_delta must be > 0"),
    ],
)
def test_bad_priors_raise_errors_naming_the_option(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()
