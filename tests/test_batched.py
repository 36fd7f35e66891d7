"""All samples of a model call from one node (dnn2bnn/layers/_batched.py)."""

from __future__ import annotations

import copy
import math
import warnings

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


@pytest.mark.parametrize("fold", [True, False], ids=["float-kl-grad", "tensor-kl-grad"])
@pytest.mark.parametrize("exp", [False, True], ids=["softplus", "exp"])
@pytest.mark.parametrize("prior", ["zero", "scalars", "tensor"])
def test_flat_node_equals_autograd_of_the_formulas(exp, prior, fold, monkeypatch):
    """Sample, KL and both gradients of the flat node against autograd in float64, with
    a parameter whose rho is frozen, one whose mu is frozen, and one sample unused."""
    from dnn2bnn.layers import _flat

    monkeypatch.setattr(_flat, "_FOLD_ON_CPU", fold)  # (off: the accelerators' branch)
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
    *samples, kl = FlatGaussianSampleKL.apply(spec, *mus, *rhos)
    assert [s.shape for s in samples] == [torch.Size(s) for s in shapes]
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


# ---------------------------------------------------------------- the flat node on whole models


class Mixed(nn.Module):
    """A shared layer (used twice, no bias), a mean-mode layer, a frozen layer, a layer with
    frozen rho and one with frozen mu."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 6, bias=False)
        self.fc3 = nn.Linear(6, 4)
        self.fc4 = nn.Linear(4, 4)
        self.fc5 = nn.Linear(4, 3)
        self.fc6 = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(torch.tanh(self.fc2(h))))
        for fc in (self.fc3, self.fc4, self.fc5):
            h = torch.tanh(fc(h))
        return self.fc6(h)


def _mixed_bnn(parametrization):
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(
        Mixed().double(), posterior_sigma_init=0.2, parametrization=parametrization
    )
    assert bnn.conversion_report.shared == ["fc2"]
    bnn.fc3.bayes_mode = dnn2bnn.layers.BayesMode.MEAN
    for p in bnn.fc4.parameters():
        p.requires_grad_(False)
    bnn.fc5.weight_rho.requires_grad_(False)
    bnn.fc6.bias_mu.requires_grad_(False)
    bnn.fc1.prior = dnn2bnn.NormalPrior(0.2, 0.5)
    bnn.fc6.prior = dnn2bnn.EmpiricalPrior(0.3)
    with torch.no_grad():
        for name, p in bnn.named_parameters():
            if name.endswith("_rho"):
                p.add_(0.3 * torch.randn_like(p))  # sigmas differ per element
    return bnn


def _capture(bnn):
    """The samples each layer read in the next call, by layer name."""
    seen = {}

    def hook(module, args, name):
        if module._sample_cache is None:  # a lazy layer: its draw fills this call's cache
            module._sample_cache = {}
        seen.setdefault(name, module._sample_cache)

    for name, module in bnn.named_modules():
        if isinstance(module, dnn2bnn.layers.BayesianLayer):
            module.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
    return seen


@pytest.mark.parametrize("parametrization", ["softplus", "exp"])
def test_flat_gradients_equal_autograd_of_the_formulas_on_a_mixed_model(parametrization):
    bnn = _mixed_bnn(parametrization)
    lazy_kl = dnn2bnn.kl_divergence(copy.deepcopy(bnn)).detach()
    install_batched_sampling(bnn)
    seen = _capture(bnn)
    x = torch.randn(7, 5, dtype=torch.float64)
    loss = bnn(x).pow(2).sum() + 0.3 * dnn2bnn.kl_divergence(bnn)
    loss.backward()
    assert {k for k, v in seen.items() if v} == {"fc1", "fc2", "fc4", "fc5", "fc6"}  # fc3: mean
    exp = parametrization == "exp"
    ref, kls = {}, []
    for name in ("fc1", "fc2", "fc3", "fc4", "fc5", "fc6"):
        layer = getattr(bnn, name)
        for p in ("weight", "bias"):
            mu = getattr(layer, p + "_mu")
            if mu is None:
                ref[name, p] = None
                continue
            mu = mu.detach().clone().requires_grad_(getattr(layer, p + "_mu").requires_grad)
            rho = getattr(layer, p + "_rho").detach().clone()
            rho.requires_grad_(getattr(layer, p + "_rho").requires_grad)
            sigma = _sigma(rho, exp)
            if name == "fc3":
                w = mu
            else:  # the node's noise, recovered from its sample
                eps = ((seen[name][p] - mu) / sigma).detach()
                w = mu + sigma * eps
            ref[name, p] = (w, mu, rho)
            prior = torch.distributions.Normal(
                getattr(layer, p + "_prior_mu"), getattr(layer, p + "_prior_sigma"))
            kls.append(torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma), prior).sum())
    kl = sum(kls)
    torch.testing.assert_close(kl.detach(), lazy_kl)

    def fc(name, h):
        w, b = ref[name, "weight"][0], ref[name, "bias"]
        return F.linear(h, w, None if b is None else b[0])

    h = torch.tanh(fc("fc1", x))
    h = torch.tanh(fc("fc2", torch.tanh(fc("fc2", h))))
    for name in ("fc3", "fc4", "fc5"):
        h = torch.tanh(fc(name, h))
    (fc("fc6", h).pow(2).sum() + 0.3 * kl).backward()
    torch.testing.assert_close(loss.detach(), (fc("fc6", h).pow(2).sum() + 0.3 * kl).detach())
    for (name, p), entry in ref.items():
        if entry is None:
            continue
        layer = getattr(bnn, name)
        for got, want in ((getattr(layer, p + "_mu"), entry[1]), (getattr(layer, p + "_rho"), entry[2])):
            if not want.requires_grad:
                assert got.grad is None
            else:
                torch.testing.assert_close(got.grad, want.grad, msg=f"{name}.{p}")


def test_flat_samples_have_the_posterior_mean_and_std_per_layer():
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(MLP(), posterior_sigma_init=0.1)
    with torch.no_grad():
        bnn.fc2.weight_rho.fill_(math.log(0.5))  # another sigma in another layer
        bnn.fc1.bias_rho.copy_(torch.linspace(-4.0, 0.0, 5))
    install_batched_sampling(bnn)
    seen = {"fc1.weight": [], "fc1.bias": [], "fc2.weight": [], "fc2.bias": []}

    def keep(module, args, name):
        for p in ("weight", "bias"):
            seen[f"{name}.{p}"].append(module._sample_cache[p].detach())

    bnn.fc1.register_forward_pre_hook(lambda m, a: keep(m, a, "fc1"))
    bnn.fc2.register_forward_pre_hook(lambda m, a: keep(m, a, "fc2"))
    x = torch.randn(1, 6)
    draws = 4000
    for _ in range(draws):
        bnn(x)
    for key, samples in seen.items():
        layer, p = key.split(".")
        mu = getattr(getattr(bnn, layer), p + "_mu").detach()
        sigma = getattr(getattr(bnn, layer), "posterior_sigma")(p).detach()
        stacked = torch.stack(samples)
        # mean: 5 standard errors; std: relative standard error ~ 1 / sqrt(2 n)
        assert ((stacked.mean(0) - mu).abs() <= 5 * sigma / math.sqrt(draws)).all(), key
        torch.testing.assert_close(stacked.std(0), sigma, rtol=5 / math.sqrt(2 * draws), atol=0)
    # and not the same noise in two layers of the same shape position
    assert not torch.allclose(seen["fc1.bias"][0], seen["fc1.bias"][1])


_VIEW_OPS = frozenset({
    "view", "reshape", "_reshape_alias", "as_strided", "slice", "narrow", "split", "split_with_sizes",
    "t", "transpose", "unsqueeze", "squeeze", "expand", "detach", "alias", "empty", "empty_like",
    "empty_strided", "select", "_unsafe_view", "permute", "lift_fresh",
})


def _non_view_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in _VIEW_OPS:
                Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.ops


def _deep(depth):
    layers = [nn.Linear(8, 16), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 3))


def test_forward_backward_operations_do_not_grow_with_depth():
    """Non-view aten operations of forward + KL + backward: the flat path adds the same
    number to the DNN's at depth 2 and 8 (the lazy path adds about ten per tensor)."""
    x = torch.randn(4, 8)
    counts = {}
    for depth in (2, 8):
        torch.manual_seed(0)
        dnn = _deep(depth)
        lazy = dnn2bnn.transform_to_bnn_model(dnn)
        flat = dnn2bnn.transform_to_bnn_model(dnn)
        install_batched_sampling(flat)
        for name, model in (("dnn", dnn), ("lazy", lazy), ("flat", flat)):
            def step(model=model, name=name):
                model.zero_grad(set_to_none=True)  # as a training step does
                loss = model(x).pow(2).sum()
                if name != "dnn":
                    loss = loss + dnn2bnn.kl_divergence(model) / 100
                loss.backward()

            step()
            counts[name, depth] = _non_view_ops(step)
    dnn_growth = counts["dnn", 8] - counts["dnn", 2]
    assert counts["flat", 8] - counts["flat", 2] == dnn_growth
    # (the lazy path: about ten more per Bayesian tensor, 12 more tensors at depth 8)
    assert counts["lazy", 8] - counts["lazy", 2] >= dnn_growth + 12 * 5


def test_state_dict_copies_and_optimizer_steps_with_flat_sampling(tmp_path):
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(MLP(), posterior_sigma_init=0.1)
    install_batched_sampling(bnn)
    x = torch.randn(3, 6)
    optimizer = torch.optim.Adam(bnn.parameters(), lr=0.1)
    loss = bnn(x).pow(2).sum() + dnn2bnn.kl_divergence(bnn)
    loss.backward()
    optimizer.step()
    # the next sample reads the stepped parameters: mu + sigma * eps for the same noise
    torch.manual_seed(4)
    seen = _capture(bnn)
    bnn(x)
    torch.manual_seed(4)
    sizes = [30, 5, 15, 3]
    eps = torch.randn(sum(sizes)).split(sizes)
    for (layer, p), e in zip([("fc1", "weight"), ("fc1", "bias"), ("fc2", "weight"), ("fc2", "bias")], eps):
        module = getattr(bnn, layer)
        want = getattr(module, p + "_mu") + module.posterior_sigma(p) * e.view(getattr(module, p + "_mu").shape)
        torch.testing.assert_close(seen[layer][p], want.detach())
    # a state_dict holds the parameters as before; it loads into a fresh model
    path = tmp_path / "bnn.pt"
    torch.save(bnn.state_dict(), path)
    fresh = dnn2bnn.transform_to_bnn_model(MLP())
    install_batched_sampling(fresh)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for copy_ in (fresh, copy.deepcopy(bnn)):
        torch.manual_seed(9)
        a = copy_(x)
        torch.manual_seed(9)
        torch.testing.assert_close(a, bnn(x))
    wide = copy.deepcopy(bnn).to(torch.float64)  # a float64 group
    out = wide(x.double())
    (out.sum() + dnn2bnn.kl_divergence(wide)).backward()
    assert out.dtype == torch.float64 and wide.fc1.weight_rho.grad.dtype == torch.float64
    assert wide.fc1.weight_rho.grad.abs().sum() > 0


def test_save_bnn_round_trip_after_flat_training_steps(tmp_path):
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(MLP(), posterior_sigma_init=0.1)
    install_batched_sampling(bnn)
    optimizer = torch.optim.SGD(bnn.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        (bnn(torch.randn(3, 6)).pow(2).sum() + dnn2bnn.kl_divergence(bnn)).backward()
        optimizer.step()
    path = dnn2bnn.save_bnn(bnn, tmp_path / "bnn.safetensors", example_inputs=torch.randn(2, 6))
    loaded = dnn2bnn.load_bnn(path)
    saved, restored = bnn.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)


def test_a_kl_taken_for_part_of_a_group_is_computed_afresh():
    """``layer.kl()`` of one layer after a flat forward is that layer's KL, not the group's;
    kl_divergence of the whole model then computes the remaining members afresh."""
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(MLP(), posterior_sigma_init=0.1)
    reference = copy.deepcopy(bnn)
    install_batched_sampling(bnn)
    bnn(torch.randn(2, 6))
    torch.testing.assert_close(bnn.fc1.kl(), reference.fc1.kl())
    total = dnn2bnn.kl_divergence(bnn)
    torch.testing.assert_close(total, dnn2bnn.kl_divergence(reference))
    total.backward()
    assert bnn.fc2.weight_rho.grad is not None
    with torch.no_grad():  # logging after the step's forward: detached, and it stays
        bnn(torch.randn(2, 6))
    bnn(torch.randn(2, 6))
    with torch.no_grad():
        logged = dnn2bnn.kl_divergence(bnn)
    assert not logged.requires_grad
    torch.testing.assert_close(dnn2bnn.kl_divergence(bnn), logged)


def test_the_call_caches_close_after_a_failing_forward_and_a_nested_call():
    bnn = dnn2bnn.transform_to_bnn_model(MLP(), posterior_sigma_init=0.1)
    install_batched_sampling(bnn)
    with pytest.raises(RuntimeError):
        bnn(torch.randn(2, 7))  # wrong width: fc1 raises after the flat draw
    assert bnn.fc1._sample_cache is None and bnn.fc2._sample_cache is None
    assert "_dnn2bnn_flat_opened" not in bnn.__dict__
    outer = nn.Sequential(bnn)
    install_batched_sampling(outer)  # the inner model's hook draws nothing: caches are open
    outer(torch.randn(2, 6)).sum().backward()
    assert bnn.fc1._sample_cache is None and bnn.fc1.weight_rho.grad is not None


def test_a_model_with_flat_sampling_compiles_and_draws_lazily_there():
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(MLP(), posterior_sigma_init=0.1)
    install_batched_sampling(bnn)
    compiled = torch.compile(bnn, backend="eager", fullgraph=True)
    x = torch.randn(3, 6)
    first, second = compiled(x), compiled(x)
    assert not torch.allclose(first, second)
    (first.sum() + dnn2bnn.kl_divergence(bnn)).backward()
    assert bnn.fc1.weight_rho.grad is not None
    assert bnn.fc1._sample_cache is None and "_dnn2bnn_flat_opened" not in bnn.__dict__
    bnn(x).sum().backward()  # eager again: the flat node
    assert "_dnn2bnn_flat_opened" not in bnn.__dict__


class _Checkpointed(nn.Module):
    def __init__(self, checkpointed: bool, reentrant: bool) -> None:
        super().__init__()
        self.a, self.b, self.o = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 2)
        self.checkpointed, self.reentrant = checkpointed, reentrant

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(self.b, h, use_reentrant=self.reentrant)
        else:
            h = self.b(h)
        return self.o(torch.tanh(h))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_blocks_get_their_own_calls_flat_sample(reentrant):
    """Two calls before one backward, a block under torch.utils.checkpoint: its recomputation
    must use the sample of ITS call (the second call's sample gave the first call's block
    wrong gradients, silently), and under use_reentrant=True it must not run the flat
    node's backward a second time ("Trying to backward through the graph a second time")."""
    x = torch.randn(4, 5, dtype=torch.float64)

    def step(bnn):
        loss = bnn(x).pow(2).sum() + bnn(x * 2).pow(2).sum() + dnn2bnn.kl_divergence(bnn)
        loss.backward()

    _assert_checkpointing_keeps_the_gradients(step, reentrant)


def _assert_checkpointing_keeps_the_gradients(step, reentrant):
    """``step(bnn)`` (forward + backward, flat sampling installed) gives the same gradients
    with the model's block under torch.utils.checkpoint as without."""

    def grads(checkpointed):
        torch.manual_seed(0)
        bnn = dnn2bnn.transform_to_bnn_model(_Checkpointed(checkpointed, reentrant)).double()
        install_batched_sampling(bnn)
        torch.manual_seed(1)
        step(bnn)
        return {n: p.grad for n, p in bnn.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_install_rejects_what_it_cannot_batch():
    """A non-module raised a bare AttributeError ('int' object has no attribute
    '_forward_pre_hooks'), and a model not converted yet (the DNN) was accepted and silently
    drew nothing flat; installing twice stays one pair of hooks."""
    with pytest.raises(TypeError, match=r"nn\.Module.*got int"):
        install_batched_sampling(42)
    dnn = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"Sequential has no Bayesian layer.*transform_to_bnn_model"):
        install_batched_sampling(dnn)
    assert not dnn._forward_pre_hooks
    bnn = dnn2bnn.transform_to_bnn_model(dnn)
    install_batched_sampling(bnn)
    install_batched_sampling(bnn)
    assert len(bnn._forward_pre_hooks) == 1 and len(bnn._forward_hooks) == 1


@pytest.mark.parametrize("between", ["no_grad call", "direct checkpointed call"])
def test_a_lazy_draw_between_forward_and_backward_keeps_the_flat_replay(between):
    """A call drawing lazily between the training forward and its backward (validation
    under torch.no_grad, or the checkpointed block called on its own) dropped or mixed up
    the flat samples the checkpointed block must get again in its recomputation: wrong
    gradients, silently, or a crash in the recomputation."""
    x = torch.randn(4, 5, dtype=torch.float64)

    def step(bnn):
        loss = bnn(x).pow(2).sum() + dnn2bnn.kl_divergence(bnn)
        if between == "no_grad call":
            with torch.no_grad():
                bnn(x)
        else:
            torch.utils.checkpoint.checkpoint(bnn.b, torch.randn(3, 7, dtype=torch.float64),
                                              use_reentrant=False).sum().backward()
            for p in bnn.parameters():
                p.grad = None
        loss.backward()

    _assert_checkpointing_keeps_the_gradients(step, reentrant=False)


@pytest.mark.parametrize("exp", [False, True], ids=["softplus", "exp"])
def test_flat_node_second_order_gradients_equal_autograd_of_the_formulas(exp):
    """create_graph=True (Hessian-vector products, gradient penalties): the flat node's
    backward used detached saved tensors, so a Hessian of the KL alone raised "element 0 of
    tensors does not require grad" and with a data term the KL's Hessian and every term
    through sigma(rho) were dropped, silently."""
    torch.manual_seed(0)
    shapes = [(4, 3), (3,)]
    sizes = [math.prod(s) for s in shapes]
    mus = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    rhos = [(torch.randn(s, dtype=torch.float64) - 2).requires_grad_() for s in shapes]
    spec = FlatSpec(exp, sizes, torch.cat([torch.full((n,), ps**-2.0, dtype=torch.float64)
                                            for n, ps in zip(sizes, [0.5, 2.0])]),
                    0.3, prior_constant(sizes, [0.5, 2.0]))
    torch.manual_seed(7)
    *samples, kl = FlatGaussianSampleKL.apply(spec, *mus, *rhos)
    torch.manual_seed(7)
    eps = [e.view(s) for e, s in zip(torch.randn(sum(sizes), dtype=torch.float64).split(sizes), shapes)]
    reference = [m + _sigma(r, exp) * e for m, r, e in zip(mus, rhos, eps)]
    ref_kl = sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(m, _sigma(r, exp)), torch.distributions.Normal(0.3, ps)
        ).sum()
        for m, r, ps in zip(mus, rhos, [0.5, 2.0])
    )
    leaves = mus + rhos
    vs = [torch.randn_like(t) for t in leaves]
    for with_data in (False, True):
        loss, ref_loss = 0.7 * kl, 0.7 * ref_kl
        if with_data:
            loss = loss + samples[0].pow(3).sum()
            ref_loss = ref_loss + reference[0].pow(3).sum()
        got = torch.autograd.grad(loss, leaves, create_graph=True)
        want = torch.autograd.grad(ref_loss, leaves, create_graph=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(got, vs)), leaves,
                                 retain_graph=True)
        ref_hv = torch.autograd.grad(sum((w * v).sum() for w, v in zip(want, vs)), leaves,
                                     retain_graph=True)
        for h, r in zip(hv, ref_hv):
            torch.testing.assert_close(h, r)


def test_install_warns_when_no_parameter_can_be_drawn_flat():
    """A model whose every parameter is too large (or otherwise ineligible) got hooks that
    change nothing, without a word."""
    large = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Linear(300, 300)))  # 90,000 weights, 300 biases
    large[0].bias_mu.requires_grad_(False)
    large[0].bias_rho.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"no Bayesian parameter of Sequential can be drawn flat now.*65,536"):
        install_batched_sampling(large)
    small = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Linear(3, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        install_batched_sampling(small)
