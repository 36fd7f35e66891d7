"""All samples of a model call from one node (dnn2bnn/layers/_batched.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnn2bnn
from dnn2bnn.layers import install_batched_sampling
from dnn2bnn.layers._batched import _draw_all
from dnn2bnn.layers._flat import FlatGaussianSampleKL, FlatSpec, prior_constant
from dnn2bnn.priors import kl_normal


def _sigma(rho, exp):
    return torch.exp(rho) if exp else F.softplus(rho)


@pytest.mark.parametrize("exp", [False, True], ids=["softplus", "exp"])
@pytest.mark.parametrize("prior", ["zero", "scalars", "tensor"])
def test_flat_node_equals_autograd_of_the_formulas(exp, prior):
    """Sample, KL and both gradients of the flat node against autograd in float64, with
    a parameter whose rho is frozen, one whose mu is frozen, and one sample unused."""
    torch.manual_seed(0)
    shapes = [(5, 4), (4,), (3, 2, 2)]
    sizes = [math.prod(s) for s in shapes]
    mus = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    rhos = [(torch.randn(s, dtype=torch.float64) - 2).requires_grad_() for s in shapes]
    rhos[1].requires_grad_(False)
    mus[2].requires_grad_(False)
    prior_sigmas = [1.0, 1.0, 1.0] if prior == "zero" else [0.5, 2.0, 1.5]
    means = [torch.zeros(()) if prior == "zero" else torch.tensor(0.3)] * 3
    if prior == "tensor":
        means = [torch.randn(s, dtype=torch.float64) for s in shapes]
    inv_var = (1.0 if prior == "zero" else torch.cat([torch.full((n,), ps**-2.0, dtype=torch.float64)
                                                   for n, ps in zip(sizes, prior_sigmas)]))
    prior_mean = 0.0 if prior == "zero" else (
        0.3 if prior == "scalars" else torch.cat([m.reshape(-1) for m in means]))
    spec = FlatSpec(exp, sizes, inv_var, prior_mean, prior_constant(sizes, prior_sigmas))
    torch.manual_seed(7)
    flat, kl = FlatGaussianSampleKL.apply(spec, *mus, *rhos)
    samples = [p.view(s) for p, s in zip(flat.split(sizes), shapes)]
    torch.manual_seed(7)
    eps = [e.view(s) for e, s in zip(torch.randn(sum(sizes), dtype=torch.float64).split(sizes), shapes)]
    reference = [m + _sigma(r, exp) * e for m, r, e in zip(mus, rhos, eps)]
    ref_kl = sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(m, _sigma(r, exp)), torch.distributions.Normal(pm, ps)
        ).sum()
        for m, r, pm, ps in zip(mus, rhos, means, prior_sigmas)
    )
    for got, want in zip(samples, reference):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(kl, ref_kl)
    gs = [torch.randn(s, dtype=torch.float64) for s in shapes]
    # the second sample unused: its parameters get gradients from the KL only
    loss = (samples[0] * gs[0]).sum() + (samples[2] * gs[2]).sum() + 0.7 * kl
    ref_loss = (reference[0] * gs[0]).sum() + (reference[2] * gs[2]).sum() + 0.7 * ref_kl
    leaves = [t for t in mus + rhos if t.requires_grad]
    got = torch.autograd.grad(loss, leaves)
    want = torch.autograd.grad(ref_loss, leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("parametrization", ["softplus", "exp"])
def test_a_converted_model_trains_with_one_sampling_node(parametrization):
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(MLP(), posterior_sigma_init=0.1, parametrization=parametrization)
    install_batched_sampling(bnn)
    assert _draw_all in bnn._forward_pre_hooks.values()
    x = torch.randn(4, 6)
    torch.manual_seed(3)
    loss = bnn(x).pow(2).sum() + dnn2bnn.kl_divergence(bnn)
    loss.backward()
    assert bnn.fc1._sample_cache is None
    # reference: the same noise (one randn over all parameters, in module order) through plain autograd
    exp = parametrization == "exp"
    names = [("fc1", "weight"), ("fc1", "bias"), ("fc2", "weight"), ("fc2", "bias")]
    mus = [getattr(getattr(bnn, m), n + "_mu").detach().clone().requires_grad_() for m, n in names]
    rhos = [getattr(getattr(bnn, m), n + "_rho").detach().clone().requires_grad_() for m, n in names]
    torch.manual_seed(3)
    sizes = [m.numel() for m in mus]
    eps = [e.view(m.shape) for e, m in zip(torch.randn(sum(sizes)).split(sizes), mus)]
    w = [m + _sigma(r, exp) * e for m, r, e in zip(mus, rhos, eps)]
    out = F.linear(torch.relu(F.linear(x, w[0], w[1])), w[2], w[3])
    kl = sum(kl_normal(m, _sigma(r, exp), torch.tensor(0.0), torch.tensor(1.0)) for m, r in zip(mus, rhos))
    (out.pow(2).sum() + kl).backward()
    for (m, n), mu, rho in zip(names, mus, rhos):
        layer = getattr(bnn, m)
        torch.testing.assert_close(getattr(layer, n + "_mu").grad, mu.grad)
        torch.testing.assert_close(getattr(layer, n + "_rho").grad, rho.grad)


def test_no_batched_draw_without_autograd_or_for_other_estimators():
    bnn = dnn2bnn.transform_to_bnn_model(MLP(), posterior_sigma_init=0.1)
    install_batched_sampling(bnn)
    seen = []
    bnn.fc1.register_forward_pre_hook(lambda m, a: seen.append(m._sample_cache))
    with torch.no_grad():
        bnn(torch.randn(2, 6))
    dnn2bnn.set_estimator(bnn, "flipout")
    bnn(torch.randn(2, 6))
    assert seen == [None, None]
    dnn2bnn.set_estimator(bnn, "reparam")
    bnn(torch.randn(2, 6))
    assert set(seen[-1]) == {"weight", "bias"}


def test_to_dnn_removes_the_hooks():
    bnn = dnn2bnn.transform_to_bnn_model(MLP())
    install_batched_sampling(bnn)
    dnn = dnn2bnn.to_dnn(bnn)
    assert not dnn._forward_pre_hooks and not dnn._forward_hooks


def test_large_parameters_keep_their_lazy_fused_draw(monkeypatch):
    from dnn2bnn.layers import _batched

    monkeypatch.setattr(_batched, "FLAT_MAX_NUMEL", 10)  # fc1.weight (30) and fc2.weight (15) are large
    bnn = dnn2bnn.transform_to_bnn_model(MLP(), posterior_sigma_init=0.1)
    install_batched_sampling(bnn)
    seen = {}
    bnn.fc1.register_forward_pre_hook(lambda m, a: seen.update(fc1=set(m._sample_cache)))
    bnn(torch.randn(2, 6))
    assert seen["fc1"] == {"bias"}


def test_a_shared_layer_with_a_missing_bias_is_batched():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.fc(x) - F.linear(x, self.fc.weight)

    bnn = dnn2bnn.transform_to_bnn_model(Tied(), posterior_sigma_init=0.5)
    install_batched_sampling(bnn)
    torch.testing.assert_close(bnn(torch.randn(2, 4)), torch.zeros(2, 4))
