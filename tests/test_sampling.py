"""The hand-written gradients of the weight sample and the KL equal autograd's."""

from __future__ import annotations

import math

import pytest
import torch

import dnn2bnn
from dnn2bnn import BayesLinear, EmpiricalPrior, NormalPrior
from dnn2bnn.layers._base import softplus_inverse
from dnn2bnn.layers._sampling import GaussianSample, GaussianSampleTransformable, NormalKL, posterior_std
from dnn2bnn.priors import kl_normal

EXP = pytest.mark.parametrize("exp", [False, True], ids=["softplus", "exp"])


def _sigma(rho, exp):
    return torch.exp(rho) if exp else torch.nn.functional.softplus(rho)


def _params():
    mu = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    rho = (torch.randn(7, 5, dtype=torch.float64) - 2).requires_grad_()
    return mu, rho


@EXP
@pytest.mark.parametrize("function", [GaussianSample, GaussianSampleTransformable], ids=lambda f: f.__name__)
def test_sample_gradient_equals_autograd_of_the_formula(function, exp):
    mu, rho = _params()
    sigma = _sigma(rho, exp).detach()
    torch.manual_seed(3)
    weight = function.apply(mu, rho, sigma, exp)
    weight = weight[0] if isinstance(weight, tuple) else weight
    torch.manual_seed(3)
    eps = torch.randn_like(mu)
    g = torch.randn_like(weight)
    grads = torch.autograd.grad(weight, (mu, rho), g)
    reference = mu + _sigma(rho, exp) * eps
    torch.testing.assert_close(weight, reference)
    for got, want in zip(grads, torch.autograd.grad(reference, (mu, rho), g)):
        torch.testing.assert_close(got, want)


@EXP
@pytest.mark.parametrize("prior_mu", [0.0, 0.3, "tensor"])
def test_fused_normal_kl_value_and_gradient_equal_the_reference(prior_mu, exp):
    mu, rho = _params()
    pm = torch.randn(7, 5, dtype=torch.float64) if prior_mu == "tensor" else torch.tensor(prior_mu, dtype=torch.float64)
    ps = torch.tensor(0.4, dtype=torch.float64)
    sigma = _sigma(rho, exp).detach()
    fused = NormalKL.apply(mu, rho, sigma, pm, 0.4, None, exp)
    reference = kl_normal(mu, _sigma(rho, exp), pm, ps)
    torch.testing.assert_close(fused, reference)
    for got, want in zip(torch.autograd.grad(3 * fused, (mu, rho)), torch.autograd.grad(3 * reference, (mu, rho))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("prior", [NormalPrior(0.1, 0.5), EmpiricalPrior(0.2)], ids=str)
def test_layer_kl_gradient_equals_the_unfused_reference(prior):
    layer = BayesLinear(6, 3, prior=prior, posterior_sigma_init=0.1, dtype=torch.float64)
    layer.kl().backward()
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    total = sum(
        kl_normal(getattr(layer, n + "_mu"), layer.posterior_sigma(n), getattr(layer, n + "_prior_mu"),
                  getattr(layer, n + "_prior_sigma"))
        for n in ("weight", "bias")
    )
    total.backward()
    for g, p in zip(got, layer.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("parametrization", ["softplus", "exp"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "training"])
def test_no_value_computed_from_rho_outlives_a_data_write(grad, parametrization):
    """Issue 14 item 11: after ``rho.data.fill_`` samples and the KL use the new sigma."""
    torch.manual_seed(0)
    layer = BayesLinear(50, 50, posterior_sigma_init=1e-3, parametrization=parametrization)
    x = torch.randn(4, 50)
    with torch.set_grad_enabled(grad):
        layer(x)  # a forward that computed sigma (and, in training, the KL's)
    if grad:
        layer.kl()  # the step's KL takes (and drops) what the forward left for it
    layer.weight_rho.data.fill_(0.0)  # invisible to the version counter
    layer.eval()
    with torch.no_grad():
        draws = torch.stack([layer.weight - layer.weight_mu for _ in range(20)])
    expected = posterior_std(torch.zeros(()), parametrization == "exp").item()
    assert abs(draws.std().item() - expected) < 0.05 * expected
    reference = sum(
        kl_normal(getattr(layer, n + "_mu"), layer.posterior_sigma(n), torch.tensor(0.0), torch.tensor(1.0))
        for n in ("weight", "bias")
    )
    torch.testing.assert_close(layer.kl(), reference)
    with torch.no_grad():
        torch.testing.assert_close(dnn2bnn.kl_divergence(layer), reference)


def test_prior_buffer_data_writes_reach_the_kl():
    layer = BayesLinear(5, 3, prior_sigma=1.0)
    before = layer.kl().item()
    layer.weight_prior_sigma.data.fill_(0.1)
    after = layer.kl()
    reference = kl_normal(layer.weight_mu, layer.posterior_sigma(), torch.tensor(0.0), torch.tensor(0.1)) + kl_normal(
        layer.bias_mu, layer.posterior_sigma("bias"), torch.tensor(0.0), torch.tensor(1.0))
    assert after.item() != before
    torch.testing.assert_close(after, reference)


@EXP
def test_rho_gradient_is_exact_for_tiny_sigma_in_float32(exp):
    """Issue 14 item 13: sigma 1e-8 in float32, where ``mu + sigma * eps`` rounds to ``mu``."""
    torch.manual_seed(0)
    mu = torch.randn(64, 32, requires_grad=True)
    rho0 = torch.full((64, 32), math.log(1e-8) if exp else softplus_inverse(1e-8))
    rho = rho0.clone().requires_grad_()
    g = torch.randn(64, 32)
    torch.manual_seed(5)
    weight = GaussianSample.apply(mu, rho, _sigma(rho, exp).detach(), exp)
    (grad_rho,) = torch.autograd.grad(weight, (rho,), g)
    torch.manual_seed(5)
    eps = torch.randn(64, 32)
    rho_ref = rho0.clone().requires_grad_()
    (expected,) = torch.autograd.grad(mu.detach() + _sigma(rho_ref, exp) * eps, (rho_ref,), g)
    assert expected.abs().min() > 0
    torch.testing.assert_close(grad_rho, expected, rtol=1e-5, atol=0)


def test_per_example_gradients_with_vmap_use_the_transformable_sample():
    layer = BayesLinear(3, 2, posterior_sigma_init=0.1)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(layer, p, (x.unsqueeze(0),)).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0), randomness="different")(
        params, torch.randn(4, 3)
    )
    assert grads["weight_rho"].shape == (4, 2, 3) and torch.isfinite(grads["weight_rho"]).all()


@EXP
@pytest.mark.parametrize("uses", ["both", "weight only", "kl only"])
@pytest.mark.parametrize("prior_mu", [0.0, "zero as None", "tensor"])
def test_sample_and_kl_in_one_node_equal_autograd_of_the_formulas(uses, prior_mu, exp):
    """GaussianSampleKL: the weight sample and its KL from one node, gradients combined."""
    from dnn2bnn.layers._sampling import GaussianSampleKL

    mu, rho = _params()
    sigma = _sigma(rho, exp).detach()
    pm = torch.randn(7, 5, dtype=torch.float64) if prior_mu == "tensor" else torch.tensor(0.0, dtype=torch.float64)
    torch.manual_seed(3)
    weight, kl = GaussianSampleKL.apply(mu, rho, sigma, None if prior_mu == "zero as None" else pm, 0.7, None, exp)
    torch.manual_seed(3)
    eps = torch.randn_like(mu)
    reference_w = mu + _sigma(rho, exp) * eps
    reference_kl = kl_normal(mu, _sigma(rho, exp), pm, torch.tensor(0.7, dtype=torch.float64))
    torch.testing.assert_close(weight, reference_w)
    torch.testing.assert_close(kl, reference_kl)
    g = torch.randn_like(weight)

    def loss(w, k):
        terms = {"both": (w * g).sum() + 0.3 * k, "weight only": (w * g).sum(), "kl only": 0.3 * k}
        return terms[uses]

    grads = torch.autograd.grad(loss(weight, kl), (mu, rho))
    expected = torch.autograd.grad(loss(reference_w, reference_kl), (mu, rho))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_a_training_forward_leaves_its_kl_for_the_loss_and_never_a_stale_one(monkeypatch):
    from dnn2bnn.layers import _kl

    monkeypatch.setattr(_kl, "SMALL_KL_NUMEL", 0)  # this small layer takes the fused path
    torch.manual_seed(0)
    layer = BayesLinear(5, 3, posterior_sigma_init=0.1)
    x = torch.randn(4, 5)
    out = layer(x)
    assert set(layer._pending_kl) == {"weight", "bias"}
    with torch.no_grad():
        logged = layer.kl()  # logging: a detached value, the pending KL stays
    assert logged.grad_fn is None and set(layer._pending_kl) == {"weight", "bias"}
    kl = layer.kl()
    assert layer._pending_kl == {}  # handed out once, with its graph
    torch.testing.assert_close(kl, logged)
    reference = sum(
        kl_normal(getattr(layer, n + "_mu"), layer.posterior_sigma(n), torch.tensor(0.0), torch.tensor(1.0))
        for n in ("weight", "bias")
    )
    torch.testing.assert_close(kl, reference)
    (out.sum() + kl).backward()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x)  # a new pending KL...
    optimizer.step()  # ... made stale by the update
    fresh = layer.kl()
    expected = sum(
        kl_normal(getattr(layer, n + "_mu"), layer.posterior_sigma(n), torch.tensor(0.0), torch.tensor(1.0))
        for n in ("weight", "bias")
    )
    torch.testing.assert_close(fresh, expected)
    assert layer._pending_kl == {}


def _hvp(loss_of, params, v):
    """Hessian-vector product of ``loss_of()`` w.r.t. ``params`` along ``v``."""
    grads = torch.autograd.grad(loss_of(), params, create_graph=True)
    hv = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]


@pytest.mark.parametrize("exp", [True, False], ids=["exp", "softplus"])
@pytest.mark.parametrize("node", ["sample", "sample+kl", "kl", "multi-kl"])
def test_second_derivatives_equal_autograd_of_the_formulas(node, exp):
    """create_graph=True through the custom nodes (Hessian-vector products, gradient
    penalties): their hand-written first derivatives use a detached sigma, so with a graph
    they differentiate the formulas instead; second derivatives in rho included."""
    from dnn2bnn.layers._sampling import GaussianSample, GaussianSampleKL, MultiNormalKL, NormalKL

    mu, rho = _params()
    pm = torch.randn(7, 5, dtype=torch.float64)
    g = torch.randn(7, 5, dtype=torch.float64)
    v = [torch.randn(7, 5, dtype=torch.float64) for _ in range(2)]

    def ours():
        torch.manual_seed(3)
        sigma = _sigma(rho, exp).detach()
        if node == "sample":
            return (GaussianSample.apply(mu, rho, sigma, exp) * g).sum()
        if node == "sample+kl":
            w, kl = GaussianSampleKL.apply(mu, rho, sigma, pm, 0.7, None, exp)
            return (w * g).sum() + 0.3 * kl
        if node == "kl":
            return 0.3 * NormalKL.apply(mu, rho, sigma, pm, 0.7, None, exp)
        return 0.3 * MultiNormalKL.apply([pm], [0.7], [], exp, mu, rho, sigma)

    def reference():
        torch.manual_seed(3)
        eps = torch.randn_like(mu)
        sigma = _sigma(rho, exp)
        kl = kl_normal(mu, sigma, pm, torch.tensor(0.7, dtype=torch.float64))
        w = mu + sigma * eps
        return {"sample": (w * g).sum(), "sample+kl": (w * g).sum() + 0.3 * kl}.get(node, 0.3 * kl)

    torch.testing.assert_close(ours(), reference())
    for got, want in zip(_hvp(ours, (mu, rho), v), _hvp(reference, (mu, rho), v)):
        torch.testing.assert_close(got, want)
