"""The hand-written gradients of the weight sample and the KL equal autograd's."""

from __future__ import annotations

import pytest
import torch

from dnn2bnn import BayesLinear, EmpiricalPrior, NormalPrior
from dnn2bnn.layers._sampling import GaussianSample, GaussianSampleTransformable, NormalKL, cached_sigma
from dnn2bnn.priors import kl_normal


def _params():
    mu = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    rho = (torch.randn(7, 5, dtype=torch.float64) - 2).requires_grad_()
    return mu, rho


@pytest.mark.parametrize("function", [GaussianSample, GaussianSampleTransformable], ids=lambda f: f.__name__)
def test_sample_gradient_equals_autograd_of_the_formula(function):
    mu, rho = _params()
    sigma = torch.nn.functional.softplus(rho).detach()
    torch.manual_seed(3)
    weight = function.apply(mu, rho, sigma)
    torch.manual_seed(3)
    eps = torch.randn_like(mu)
    g = torch.randn_like(weight)
    grads = torch.autograd.grad(weight, (mu, rho), g)
    reference = mu + torch.nn.functional.softplus(rho) * eps
    torch.testing.assert_close(weight, reference)
    for got, want in zip(grads, torch.autograd.grad(reference, (mu, rho), g)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("prior_mu", [0.0, 0.3, "tensor"])
def test_fused_normal_kl_value_and_gradient_equal_the_reference(prior_mu):
    mu, rho = _params()
    pm = torch.randn(7, 5, dtype=torch.float64) if prior_mu == "tensor" else torch.tensor(prior_mu, dtype=torch.float64)
    ps = torch.tensor(0.4, dtype=torch.float64)
    sigma = torch.nn.functional.softplus(rho).detach()
    fused = NormalKL.apply(mu, rho, sigma, pm, 0.4)
    reference = kl_normal(mu, torch.nn.functional.softplus(rho), pm, ps)
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


def test_sigma_cache_follows_every_change_of_rho():
    layer = BayesLinear(4, 2, posterior_sigma_init=0.1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(torch.ones(3, 4)).sum().backward()
    optimizer.step()  # in-place update of rho
    torch.testing.assert_close(layer._sigma("weight", layer.weight_rho), layer.posterior_sigma().detach())
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight_rho"].fill_(-1.0)
    layer.load_state_dict(state)
    torch.testing.assert_close(layer._sigma("weight", layer.weight_rho), layer.posterior_sigma().detach())
    cache = {}
    rho = torch.zeros(3)
    first = cached_sigma(cache, "w", rho)
    assert cached_sigma(cache, "w", rho) is first
    rho.add_(1.0)
    torch.testing.assert_close(cached_sigma(cache, "w", rho), torch.nn.functional.softplus(rho))


def test_sigma_is_recomputed_in_training_and_after_inference_mode():
    layer = BayesLinear(4, 2, posterior_sigma_init=0.1)
    with torch.inference_mode():
        layer(torch.ones(1, 4))  # caches an inference tensor
    layer(torch.ones(1, 4)).sum().backward()  # must not save the inference tensor
    assert layer.weight_rho.grad is not None
    with torch.no_grad():
        layer(torch.ones(1, 4))
    layer.weight_rho.data.fill_(-2.0)  # invisible to the version counter ...
    layer(torch.ones(1, 4))  # ... but a training forward recomputes
    torch.testing.assert_close(layer._sigma("weight", layer.weight_rho), layer.posterior_sigma().detach())


def test_per_example_gradients_with_vmap_use_the_transformable_sample():
    layer = BayesLinear(3, 2, posterior_sigma_init=0.1)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(layer, p, (x.unsqueeze(0),)).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0), randomness="different")(
        params, torch.randn(4, 3)
    )
    assert grads["weight_rho"].shape == (4, 2, 3) and torch.isfinite(grads["weight_rho"]).all()


@pytest.mark.parametrize("uses", ["both", "weight only", "kl only"])
@pytest.mark.parametrize("prior_mu", [0.0, "zero as None", "tensor"])
def test_sample_and_kl_in_one_node_equal_autograd_of_the_formulas(uses, prior_mu):
    """GaussianSampleKL: the weight sample and its KL from one node, gradients combined."""
    from dnn2bnn.layers._sampling import GaussianSampleKL

    mu, rho = _params()
    sigma = torch.nn.functional.softplus(rho).detach()
    pm = torch.randn(7, 5, dtype=torch.float64) if prior_mu == "tensor" else torch.tensor(0.0, dtype=torch.float64)
    torch.manual_seed(3)
    weight, kl = GaussianSampleKL.apply(mu, rho, sigma, None if prior_mu == "zero as None" else pm, 0.7, None)
    torch.manual_seed(3)
    eps = torch.randn_like(mu)
    reference_w = mu + torch.nn.functional.softplus(rho) * eps
    reference_kl = kl_normal(mu, torch.nn.functional.softplus(rho), pm, torch.tensor(0.7, dtype=torch.float64))
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
