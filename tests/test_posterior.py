"""fit_posterior: the curvature against closed forms and brute force, the written posterior, the choices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnn2bnn
from dnn2bnn.posterior import Curvature, Likelihood, diagonal_curvature, evidence_term, marglik_precision
from dnn2bnn.posterior._choose import NEGLIGIBLE_NLL, negligible_temperature
from dnn2bnn.posterior._targets import at_means as _at_means
from dnn2bnn.posterior._targets import find_targets
from tests.conftest import mlp


def _means(bnn: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in bnn.named_parameters() if k.endswith("_mu")}


def _curvature(bnn, x, y, *, likelihood="classification", curvature="ggn", **kw):
    with _at_means(bnn):
        return diagonal_curvature(
            bnn,
            _means(bnn),
            zip(x.split(7), y.split(7)),
            likelihood=Likelihood(likelihood),
            curvature=Curvature(curvature),
            **kw,
        )


def _brute_force_ggn(bnn: nn.Module, x: torch.Tensor, *, likelihood: str = "classification", noise: float = 1.0):
    """sum_n diag(J_n^T H_n J_n) from full per-example Jacobians (torch.autograd.functional)."""
    means = _means(bnn)
    names = list(means)
    total = {k: torch.zeros_like(v) for k, v in means.items()}
    with _at_means(bnn):
        for xn in x:
            def f(*values):
                return torch.func.functional_call(bnn, dict(zip(names, values)), (xn[None],)).squeeze(0)

            jac = torch.autograd.functional.jacobian(f, tuple(means[k] for k in names))
            out = f(*(means[k] for k in names)).detach()
            if likelihood == "classification":
                p = out.softmax(-1)
                hess = torch.diag(p) - torch.outer(p, p)
            else:
                hess = torch.eye(out.numel()) / noise**2
            for k, j in zip(names, jac):
                j = j.reshape(out.numel(), -1)
                total[k] += torch.einsum("op,oq,qp->p", j, hess, j).reshape(total[k].shape)
    return total


# ------------------------------------------------------------------------ curvature
def test_linear_softmax_ggn_equals_analytic_hessian_diagonal():
    """For logits W x + b the GGN is the Hessian: d2/dW_ij^2 = sum_n p_ni (1 - p_ni) x_nj^2."""
    bnn = dnn2bnn.transform_to_bnn_model(nn.Linear(5, 4))
    x, y = torch.randn(30, 5), torch.randint(0, 4, (30,))
    result = _curvature(bnn, x, y)
    p = bnn.weight_mu.detach().mm(x.T).T.add(bnn.bias_mu.detach()).softmax(-1)
    analytic_w = (p * (1 - p)).T.mm(x.square())
    analytic_b = (p * (1 - p)).sum(0)
    torch.testing.assert_close(result.diag["weight_mu"], analytic_w)
    torch.testing.assert_close(result.diag["bias_mu"], analytic_b)
    # and the autograd Hessian of the summed cross-entropy agrees
    def loss(w):
        return F.cross_entropy(x.mm(w.reshape(4, 5).T) + bnn.bias_mu.detach(), y, reduction="sum")

    hess = torch.autograd.functional.hessian(loss, bnn.weight_mu.detach().reshape(-1))
    torch.testing.assert_close(result.diag["weight_mu"].reshape(-1), hess.diagonal())
    assert result.num_examples == 30
    assert result.nll == pytest.approx(float(loss(bnn.weight_mu.detach().reshape(-1))), rel=1e-5)


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.deconv = nn.ConvTranspose2d(3, 2, 2, stride=2)
        self.fc = nn.Linear(2 * 10 * 10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(F.relu(self.deconv(h)).flatten(1))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = self.att(h, h, h)[0]
        return self.head(self.norm(h).mean(1))


_MODELS = {
    "mlp": (lambda: dnn2bnn.transform_to_bnn_model(mlp((6, 8, 8, 4))), (6,)),
    "cnn": (lambda: dnn2bnn.transform_to_bnn_model(_SmallCNN()), (1, 7, 7)),
    "attention": (
        lambda: dnn2bnn.transform_to_bnn_model(
            _Attention(), layer_types=[nn.Linear, nn.MultiheadAttention, nn.LayerNorm]
        ),
        (5, 4),
    ),
}


@pytest.mark.parametrize("kind", list(_MODELS))
def test_ggn_equals_brute_force_per_example_jacobians(kind):
    build, shape = _MODELS[kind]
    bnn = build()
    if kind == "cnn":  # running statistics that are not the identity, used in eval mode
        bnn.bn.running_mean.uniform_(-0.5, 0.5)
        bnn.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(9, *shape)
    y = torch.randint(0, 3, (9,))
    result = _curvature(bnn, x, y)
    expected = _brute_force_ggn(bnn, x)
    assert set(result.diag) == set(expected)
    for k in expected:
        torch.testing.assert_close(result.diag[k], expected[k], rtol=1e-4, atol=1e-6)


def test_fisher_with_sampled_labels_estimates_the_ggn():
    bnn = dnn2bnn.transform_to_bnn_model(mlp((6, 8, 4)))
    x, y = torch.randn(6, 6), torch.randint(0, 4, (6,))
    exact = _curvature(bnn, x, y).diag
    gen = torch.Generator().manual_seed(1)
    fisher = _curvature(bnn, x, y, curvature="fisher", mc_samples=4000, generator=gen).diag
    for k in exact:
        rel = (fisher[k] - exact[k]).norm() / exact[k].norm()
        assert rel < 0.05, (k, float(rel))


def test_regression_ggn_is_jacobian_gram_over_noise_variance():
    bnn = dnn2bnn.transform_to_bnn_model(mlp((3, 6, 2)))
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    result = _curvature(bnn, x, y, likelihood="regression", noise_sigma=0.5)
    expected = _brute_force_ggn(bnn, x, likelihood="regression", noise=0.5)
    for k in expected:
        torch.testing.assert_close(result.diag[k], expected[k], rtol=1e-4, atol=1e-6)
    with _at_means(bnn), torch.no_grad():
        out = bnn(x)
    nll = 0.5 * ((y - out) / 0.5).square().sum() + y.numel() * (math.log(0.5) + 0.5 * math.log(2 * math.pi))
    assert result.nll == pytest.approx(float(nll), rel=1e-5)


@pytest.mark.slow  # importing laplace-torch takes seconds
def test_agrees_with_laplace_torch_diagonal_ggn():
    laplace = pytest.importorskip("laplace")
    pytest.importorskip("curvlinops")
    from laplace.curvature import CurvlinopsGGN

    torch.manual_seed(0)
    net = mlp((6, 8, 4))
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    la = laplace.Laplace(
        net, "classification", subset_of_weights="all", hessian_structure="diag", backend=CurvlinopsGGN
    )
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10))
    bnn = dnn2bnn.transform_to_bnn_model(net)
    ours = _curvature(bnn, x, y).diag
    # laplace-torch orders the parameters as net.parameters(): weight, bias of each Linear
    flat = torch.cat([ours[f"{i}.{n}_mu"].reshape(-1) for i in ("0", "2") for n in ("weight", "bias")])
    torch.testing.assert_close(flat, la.H.detach(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ the written posterior
def test_temperature_per_layer_scales_each_layer_on_its_own():
    x, y = torch.randn(60, 6), torch.randint(0, 4, (60,))
    torch.manual_seed(0)
    net = mlp((6, 8, 4))
    one = dnn2bnn.transform_to_bnn_model(net)
    dnn2bnn.fit_posterior(one, (x, y), prior_precision=1.0, temperature=1.0, progress=False)
    bnn = dnn2bnn.transform_to_bnn_model(net)
    fit = dnn2bnn.fit_posterior(bnn, (x, y), prior_precision=1.0, temperature={"0": 4.0, "2": 0.01}, progress=False)
    assert fit.temperature == {"0": 4.0, "2": 0.01} and "T per layer" in fit.choice
    assert "temperature 0=4, 2=0.01" in str(fit)
    assert "temperature 0=4, 2=0.01" in str(bnn.conversion_report)  # the record keeps the mapping
    for layer, scale in (("0", 2.0), ("2", 0.1)):  # sigma scales as sqrt(T)
        torch.testing.assert_close(
            bnn.get_submodule(layer).posterior_sigma(), scale * one.get_submodule(layer).posterior_sigma(), rtol=1e-5, atol=0
        )


def test_sigma_and_prior_follow_the_formula_and_elbo_runs():
    bnn = dnn2bnn.transform_to_bnn_model(mlp((6, 8, 4)))
    x, y = torch.randn(50, 6), torch.randint(0, 4, (50,))
    curv = _curvature(bnn, x, y).diag
    fit = dnn2bnn.fit_posterior(
        bnn, (x, y), num_train_examples=500, prior_precision={"0": 2.0, "2": 8.0},
        temperature=0.5, curvature="ggn", progress=False,
    )
    assert fit.prior_precision == {"0": 2.0, "2": 8.0}
    for layer, lam in (("0", 2.0), ("2", 8.0)):
        module = bnn.get_submodule(layer)
        for name in ("weight", "bias"):
            expected = (0.5 / (10 * curv[f"{layer}.{name}_mu"] + lam)).sqrt()
            torch.testing.assert_close(module.posterior_sigma(name), expected, rtol=1e-5, atol=1e-7)
            assert float(getattr(module, f"{name}_prior_sigma")) == pytest.approx(1 / math.sqrt(lam))
            assert float(getattr(module, f"{name}_prior_mu")) == 0.0
        assert module.prior == dnn2bnn.NormalPrior(0.0, 1 / math.sqrt(lam))
    # the KL is the closed form against N(0, 1/lambda), and an ELBO step runs from here
    module = bnn.get_submodule("2")
    s, m = module.posterior_sigma("weight"), module.weight_mu.detach()
    p = 1 / math.sqrt(8.0)
    kl_w = (torch.log(p / s) + (s.square() + m.square()) / (2 * p * p) - 0.5).sum()
    s, m = module.posterior_sigma("bias"), module.bias_mu.detach()
    kl_b = (torch.log(p / s) + (s.square() + m.square()) / (2 * p * p) - 0.5).sum()
    torch.testing.assert_close(module.kl().detach(), kl_w + kl_b, rtol=1e-4, atol=1e-5)
    loss_fn = dnn2bnn.WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=500)
    loss = loss_fn(x, y)
    loss.backward()
    assert torch.isfinite(loss) and bnn[0].weight_rho.grad is not None
    assert bnn.conversion_report.posterior_fit["prior_precision"] == {"0": 2.0, "2": 8.0}


def test_mean_mode_prediction_is_the_parent_after_the_fit():
    net = mlp((6, 8, 4))
    bnn = dnn2bnn.transform_to_bnn_model(net)
    x, y = torch.randn(60, 6), torch.randint(0, 4, (60,))
    dnn2bnn.fit_posterior(bnn, (x, y), progress=False)
    with dnn2bnn.set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(x), net(x))
    assert bnn.training  # train/eval and the modes are restored
    assert dnn2bnn.get_mode(bnn) == dnn2bnn.BayesMode.SAMPLE


def test_last_layer_only_model_leaves_the_rest_alone():
    net = mlp((6, 8, 8, 4))
    bnn = dnn2bnn.transform_to_bnn_model(net, include=["4"])
    before = {k: v.clone() for k, v in bnn.state_dict().items() if not k.startswith("4.")}
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    fit = dnn2bnn.fit_posterior(bnn, (x, y), prior_precision=1.0, temperature=1.0, curvature="ggn", progress=False)
    assert list(fit.prior_precision) == ["4"]
    after = bnn.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    # a last-layer posterior: the curvature of a linear softmax head on the features
    with torch.no_grad():
        feats = net[:4](x)
    head = dnn2bnn.transform_to_bnn_model(net[4])
    expected = _curvature(head, feats, y).diag["weight_mu"]
    torch.testing.assert_close(bnn[4].posterior_sigma(), (1 / (expected + 1.0)).sqrt(), rtol=1e-4, atol=1e-6)


def test_regression_fit_runs_with_gaussian_likelihood():
    bnn = dnn2bnn.transform_to_bnn_model(mlp((3, 16, 1)))
    x = torch.randn(200, 3)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(200, 1)
    fit = dnn2bnn.fit_posterior(bnn, (x, y), likelihood="regression", noise_sigma=0.1, progress=False)
    assert fit.likelihood == "regression" and fit.temperature <= max(dnn2bnn.posterior.DEFAULT_TEMPERATURES)
    assert fit.choice and f"T={fit.temperature:.3g}" in fit.choice


# ------------------------------------------------------------------------ choices
def _noisy_threshold_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I) in 2-d, y = [x_0 > 0] with 20% of the labels flipped."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long()
    return x, torch.where(torch.rand(n, generator=g) < 0.2, 1 - y, y)


def test_default_keeps_the_parent_when_held_out_data_gives_no_evidence():
    # a network that fits clean data: on held-out training data any spread costs NLL
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    torch.manual_seed(0)
    net = mlp((4, 16, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bnn = dnn2bnn.transform_to_bnn_model(net)
    fit = dnn2bnn.fit_posterior(bnn, (x, y), progress=False, batch_size=100)
    assert "no evidence" in fit.choice, fit.choice
    assert fit.temperature < min(dnn2bnn.posterior.DEFAULT_TEMPERATURES)
    # the smallest candidate is already worse than the means; the kept posterior is not
    assert fit.val_nll["T=0.001"] > fit.val_nll["means"]
    assert fit.val_nll[f"T={fit.temperature:.3g}"] <= fit.val_nll["means"] + 1e-5
    # on fresh data its Monte Carlo predictive scores as the parent does (within 0.5%), and
    # closer to it than the smallest candidate, which the old rule returned
    smallest = dnn2bnn.transform_to_bnn_model(net)
    dnn2bnn.fit_posterior(smallest, (x, y), progress=False, batch_size=100, temperature=0.001)
    xt = torch.randn(500, 4, generator=g)
    yt = (xt[:, 0] + xt[:, 1] > 0).long()
    parent = F.cross_entropy(net(xt), yt).item()
    torch.manual_seed(0)
    kept = F.nll_loss(dnn2bnn.predict(bnn, xt, num_samples=8).probs.log(), yt).item()
    torch.manual_seed(0)
    old = F.nll_loss(dnn2bnn.predict(smallest, xt, num_samples=8).probs.log(), yt).item()
    assert abs(kept - parent) < 0.005 * parent and abs(kept - parent) < abs(old - parent)


def test_default_picks_spread_when_held_out_data_shows_it():
    # an overconfident linear classifier (logits 20 x_0) of labels with 20% noise: spread helps
    x, y = _noisy_threshold_data(2000, seed=0)
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[-10.0, 0.0], [10.0, 0.0]]))
        net.bias.zero_()
    bnn = dnn2bnn.transform_to_bnn_model(net)
    fit = dnn2bnn.fit_posterior(bnn, (x, y), progress=False, batch_size=100)
    assert fit.num_val_examples == 200
    assert "significant" in fit.choice and fit.temperature > min(dnn2bnn.posterior.DEFAULT_TEMPERATURES)
    assert fit.val_nll[f"T={fit.temperature:g}"] < fit.val_nll["means"] - 0.1


def test_negligible_temperature_is_the_second_order_nll_budget():
    bnn = dnn2bnn.transform_to_bnn_model(nn.Linear(3, 2))
    groups = find_targets(bnn)
    curv = {"weight_mu": torch.full((2, 3), 9.0), "bias_mu": torch.full((2,), 1.0)}
    # P_eff = 6 * 9/10 + 2 * 1/2 = 6.4 with lambda = 1; T = 2 * NEGLIGIBLE_NLL * N / P_eff
    t = negligible_temperature(curv, groups, {"": 1.0}, 640)
    assert t == pytest.approx(2 * NEGLIGIBLE_NLL * 640 / 6.4)
    assert NEGLIGIBLE_NLL <= 1e-6


def test_marglik_precision_is_the_maximum_of_the_evidence():
    h = torch.rand(50) * 30
    sum_sq = 0.7
    lam = marglik_precision(h, sum_sq)
    best = evidence_term(h, sum_sq, lam)
    assert best > evidence_term(h, sum_sq, lam * 1.05) and best > evidence_term(h, sum_sq, lam / 1.05)
    # well-determined weights (huge curvature): lambda = P / ||mu||^2, the prior fits the weights
    assert marglik_precision(torch.full((10,), 1e9), 2.0) == pytest.approx(5.0, rel=1e-6)
    # no curvature at all: the evidence grows as lambda -> 0 (the lower bound)
    assert marglik_precision(torch.zeros(10), 2.0) == dnn2bnn.posterior.prior.LAMBDA_RANGE[0]


def test_auto_temperature_uses_validation_data_and_never_beats_itself():
    bnn = dnn2bnn.transform_to_bnn_model(mlp((6, 8, 4)))
    x, y = torch.randn(100, 6), torch.randint(0, 4, (100,))
    xv, yv = torch.randn(30, 6), torch.randint(0, 4, (30,))
    fit = dnn2bnn.fit_posterior(bnn, (x, y), val_data=(xv, yv), progress=False, temperatures=(1.0, 0.01))
    assert fit.num_val_examples == 30 and fit.num_curvature_examples == 100
    assert {"means", "T=1", "T=0.01"} <= set(fit.val_nll)
    # random labels: no temperature beats the means significantly, so the parent is kept
    assert "no evidence" in fit.choice and fit.temperature < 0.01
    assert fit.val_nll[f"T={fit.temperature:.3g}"] == pytest.approx(fit.val_nll["means"], abs=1e-4)
    # without val_data, 10% of each batch is held out and N counts it
    bnn = dnn2bnn.transform_to_bnn_model(mlp((6, 8, 4)))
    fit = dnn2bnn.fit_posterior(bnn, (x, y), progress=False, batch_size=50)
    assert (fit.num_curvature_examples, fit.num_val_examples, fit.num_train_examples) == (90, 10, 100)


def test_global_and_validation_prior_precision():
    x, y = torch.randn(80, 6), torch.randint(0, 4, (80,))
    bnn = dnn2bnn.transform_to_bnn_model(mlp((6, 8, 4)))
    fit = dnn2bnn.fit_posterior(bnn, (x, y), prior_precision="marglik", temperature=1.0, progress=False)
    assert len(set(fit.prior_precision.values())) == 1
    bnn = dnn2bnn.transform_to_bnn_model(mlp((6, 8, 4)))
    fit = dnn2bnn.fit_posterior(bnn, (x, y), prior_precision="val", progress=False)
    assert fit.temperature == 1.0 and len(set(fit.prior_precision.values())) == 1
    assert any(k.startswith("lambda=") for k in fit.val_nll)


def test_dataloader_input_and_progress_bar(capsys):
    bnn = dnn2bnn.transform_to_bnn_model(mlp((6, 8, 4)))
    ds = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randint(0, 4, (64,)))
    fit = dnn2bnn.fit_posterior(bnn, torch.utils.data.DataLoader(ds, batch_size=16), temperature=0.1)
    assert fit.num_curvature_examples == 64
    assert "fit_posterior" in capsys.readouterr().err


# ------------------------------------------------------------------------ errors
def test_errors_say_what_was_expected():
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    with pytest.raises(ValueError, match="expected a model with Bayesian layers"):
        dnn2bnn.fit_posterior(mlp((6, 4)), (x, y))
    bnn = dnn2bnn.transform_to_bnn_model(mlp((6, 4)))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['temprature'\]"):
        dnn2bnn.fit_posterior(bnn, (x, y), temprature=1.0)
    with pytest.raises(TypeError, match="pair \\(inputs, targets\\)"):
        dnn2bnn.fit_posterior(bnn, x, progress=False)
    with pytest.raises(ValueError, match="missing \\[\\], unknown \\['1'\\]"):
        dnn2bnn.fit_posterior(bnn, (x, y), prior_precision={"0": 1.0, "1": 2.0}, temperature=1.0, progress=False)
    with pytest.raises(ValueError, match="temperature must name every Bayesian layer .* unknown \\['1'\\]"):
        dnn2bnn.fit_posterior(bnn, (x, y), temperature={"0": 1.0, "1": 2.0}, progress=False)
    with pytest.raises(ValueError, match="temperature values must be finite and > 0"):
        dnn2bnn.fit_posterior(bnn, (x, y), temperature={"0": -1.0}, progress=False)
    with pytest.raises(ValueError, match="prior_precision='val' takes one temperature"):
        dnn2bnn.fit_posterior(bnn, (x, y), prior_precision="val", temperature={"0": 1.0}, progress=False)
    mixture = dnn2bnn.transform_to_bnn_model(mlp((6, 4)), prior=dnn2bnn.ScaleMixturePrior())
    with pytest.raises(TypeError, match="layer '0' .* expected a dnn2bnn.NormalPrior"):
        dnn2bnn.fit_posterior(mixture, (x, y), progress=False)


# ------------------------------------------------------------------------ torch.distributed
def _ddp_worker(rank: int, store: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        torch.manual_seed(0)
        bnn = dnn2bnn.transform_to_bnn_model(mlp((6, 8, 4)))
        x, y = torch.randn(40, 6, generator=torch.Generator().manual_seed(5)), torch.arange(40) % 4
        part = slice(rank * 20, rank * 20 + 20)
        ddp = nn.parallel.DistributedDataParallel(bnn)
        fit = dnn2bnn.fit_posterior(
            ddp, (x[part], y[part]), prior_precision=1.0, temperature=1.0, curvature="ggn", progress=False
        )
        if rank == 0:
            torch.save({"sigma": bnn[0].posterior_sigma().detach(), "n": fit.num_train_examples}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sums_the_curvature_across_ranks(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(mlp((6, 8, 4)))
    x, y = torch.randn(40, 6, generator=torch.Generator().manual_seed(5)), torch.arange(40) % 4
    dnn2bnn.fit_posterior(bnn, (x, y), prior_precision=1.0, temperature=1.0, curvature="ggn", progress=False)
    assert got["n"] == 40  # the examples of both ranks
    torch.testing.assert_close(got["sigma"], bnn[0].posterior_sigma().detach())


# ------------------------------------------------------------------------ linearized predictive
@pytest.mark.parametrize("parametrization", ["exp", "softplus"])
def test_linearized_equals_sampled_for_a_model_linear_in_its_weights(parametrization):
    from dnn2bnn.posterior import linearized_samples

    bnn = dnn2bnn.transform_to_bnn_model(nn.Linear(5, 3), parametrization=parametrization)
    with torch.no_grad():
        bnn.weight_rho.fill_(-1.0)
        bnn.bias_rho.fill_(-2.0)
    x = torch.randn(4, 5)
    lin = linearized_samples(bnn, x, 2000, generator=torch.Generator().manual_seed(0))
    mean = x @ bnn.weight_mu.detach().T + bnn.bias_mu.detach()
    sigma_of = torch.exp if parametrization == "exp" else F.softplus
    sw, sb = sigma_of(torch.tensor(-1.0)), sigma_of(torch.tensor(-2.0))
    var = (x.square().sum(1, keepdim=True) * sw**2 + sb**2).expand(4, 3)  # closed form
    torch.testing.assert_close(lin.mean(0), mean, atol=0.1, rtol=0)
    torch.testing.assert_close(lin.var(0), var, rtol=0.1, atol=0)
    assert bnn.training and dnn2bnn.get_mode(bnn) == dnn2bnn.BayesMode.SAMPLE  # restored



@pytest.mark.parametrize(
    ("out", "target", "error", "match"),
    [
        (1, lambda n: torch.randn(n, 1), ValueError, "at least 2 classes on dim 1"),  # a regressor
        (3, lambda n: torch.randint(0, 3, (n,)).float(), TypeError, "class indices"),
        (2, lambda n: torch.randn(n, 2), TypeError, "likelihood='regression'"),  # regression targets
        (3, lambda n: torch.randint(3, 6, (n,)), ValueError, r"in \[0, 2\]"),
        (3, lambda n: torch.randint(0, 3, (n, 1)), ValueError, r"of shape \(\d+,\) .*got shape \(\d+, 1\)"),
        (3, lambda n: F.one_hot(torch.randint(0, 3, (n,)), 3), ValueError, r"one-hot targets need target.argmax\(1\)"),
    ],
    ids=["one-logit", "float-indices", "regression-targets", "out-of-range", "column", "one-hot"],
)
def test_classification_likelihood_refuses_targets_it_cannot_score(out, target, error, match):
    """A regression model fitted with the default likelihood got zero softmax curvature and
    sigma = 1e4 for every weight, silently (cross_entropy reads float targets as probabilities)."""
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(mlp((4, 8, out)))
    x = torch.randn(40, 4)
    with pytest.raises(error, match=match):
        dnn2bnn.fit_posterior(bnn, (x, target(40)), progress=False, temperature=1.0)
    if out > 1:  # the validation data is checked too
        good = torch.randint(0, out, (40,))
        with pytest.raises(error, match=match):
            dnn2bnn.fit_posterior(bnn, (x, good), val_data=(x, target(40)), progress=False)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"temperature": float("inf")}, ValueError, "a finite number > 0"),
        ({"temperatures": [float("nan"), 0.1]}, ValueError, "finite numbers > 0"),
        ({"temperature": {"0": "a", "2": 1.0}}, TypeError, r"temperature\['0'\] must be a number, got 'a'"),
    ],
    ids=["inf", "nan-candidate", "str-per-layer"],
)
def test_temperature_options_must_be_finite_numbers(options, error, match):
    """temperature=inf gave sigma = inf (NaN samples) and a NaN candidate 'best T=nan', silently."""
    bnn = dnn2bnn.transform_to_bnn_model(mlp((4, 8, 3)))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    with pytest.raises(error, match=match):
        dnn2bnn.fit_posterior(bnn, (x, y), progress=False, **options)


def test_temperature_may_be_a_zero_dim_tensor():
    x, y, net = torch.randn(40, 4), torch.randint(0, 3, (40,)), mlp((4, 8, 3))
    fits = [
        dnn2bnn.fit_posterior(dnn2bnn.transform_to_bnn_model(net), (x, y), progress=False, temperature=t)
        for t in (0.5, torch.tensor(0.5))
    ]
    assert fits[1].temperature == 0.5 and fits[0].layers == fits[1].layers


def test_classes_last_logits_are_told_to_move_the_class_dim():
    """[N, T, C] logits with [N, T] targets failed inside F.cross_entropy."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.emb(x))

    bnn = dnn2bnn.transform_to_bnn_model(Tokens())
    data = (torch.randint(0, 10, (20, 5)), torch.randint(0, 4, (20, 5)))
    with pytest.raises(ValueError, match=r"classes are read on dim 1 .* logits.movedim\(-1, 1\)"):
        dnn2bnn.fit_posterior(bnn, data, progress=False, temperature=1.0)


def test_num_train_examples_is_checked_as_for_the_elbo():
    """num_train_examples=5.0 was accepted (WithBNNLoss.elbo refuses it); numpy ints work in both."""
    import numpy as np

    bnn = dnn2bnn.transform_to_bnn_model(mlp((4, 8, 3)))
    data = (torch.randn(20, 4), torch.randint(0, 3, (20,)))
    with pytest.raises(TypeError, match="fit_posterior: num_train_examples must be an int .* got float 5.0"):
        dnn2bnn.fit_posterior(bnn, data, num_train_examples=5.0, progress=False, temperature=1.0)
    fit = dnn2bnn.fit_posterior(bnn, data, num_train_examples=np.int64(50), progress=False, temperature=1.0)
    assert fit.num_train_examples == 50 and type(fit.num_train_examples) is int


def test_integer_targets_of_any_dtype_are_class_indices():
    """int32 class indices raised cross_entropy's 'expected target dtype to be Long or Byte'."""
    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    sigmas = []
    for target in (y, y.int()):
        torch.manual_seed(0)
        bnn = dnn2bnn.transform_to_bnn_model(mlp((4, 8, 3)))
        dnn2bnn.fit_posterior(bnn, (x, target), val_data=(x, target), progress=False)
        sigmas.append(bnn[0].posterior_sigma().detach())
    torch.testing.assert_close(sigmas[0], sigmas[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (lambda y: y[:, :1], r"shaped like the model's output \(\d+, 2\), got shape \(\d+, 1\)"),
        (lambda y: y[:, 0], r"shaped like the model's output \(\d+, 2\), got shape \(\d+,\)"),
        (lambda y: torch.full_like(y, float("nan")), "targets hold .* NaN or infinite"),
    ],
    ids=["one-column", "flat", "nan"],
)
def test_regression_targets_must_fit_the_output(target, match):
    """A (N, 1) target for a 2-output regressor raised "shape '[200, 2]' is invalid for input of
    size 200"; NaN targets gave a NaN held-out gain, so the parent was kept silently."""
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(mlp((3, 8, 2)))
    x, y = torch.randn(40, 3), torch.randn(40, 2)
    with pytest.raises(ValueError, match=match):
        dnn2bnn.fit_posterior(bnn, (x, target(y)), likelihood="regression", progress=False)
    with pytest.raises(ValueError, match=match.replace("targets", "validation targets", 1) if "NaN" not in match else match):
        dnn2bnn.fit_posterior(bnn, (x, y), val_data=(x, target(y)), likelihood="regression", progress=False)


def test_regression_target_without_its_trailing_dim_is_reshaped():
    """[N] targets for a [N, 1] output are read as [N, 1] (not broadcast to [N, N])."""
    x, y, net = torch.randn(50, 3), torch.randn(50, 1), mlp((3, 8, 1))
    fits = []
    for target in (y, y[:, 0]):
        bnn = dnn2bnn.transform_to_bnn_model(net)
        fits.append(dnn2bnn.fit_posterior(bnn, (x, target), likelihood="regression", progress=False, temperature=1.0))
    assert fits[0].log_evidence == fits[1].log_evidence


def test_non_finite_validation_outputs_are_refused():
    """NaN in val_data gave a held-out gain 'nan +- nan' and kept the parent silently."""
    bnn = dnn2bnn.transform_to_bnn_model(mlp((4, 8, 3)))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    xv = x[:10].clone()
    xv[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"holds 3 NaN or infinite value\(s\) .* held-out \(validation\) inputs"):
        dnn2bnn.fit_posterior(bnn, (x, y), val_data=(xv, y[:10]), progress=False)


def test_empty_val_data_and_malformed_batches_say_what_was_found():
    """Empty val_data raised "cannot reshape tensor of 0 elements"; a dict-input batch was
    refused as "must be a tuple ..., got tuple"."""
    bnn = dnn2bnn.transform_to_bnn_model(mlp((4, 8, 3)))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    with pytest.raises(ValueError, match="val_data has no example"):
        dnn2bnn.fit_posterior(bnn, (x, y), val_data=(x[:0], y[:0]), progress=False)
    with pytest.raises(TypeError, match=r"dict inputs are not supported\), got a tuple of 2 \(dict, Tensor\)"):
        dnn2bnn.fit_posterior(bnn, [({"x": x}, y)], progress=False, temperature=1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=10)
    with pytest.raises(TypeError, match=r"got a list of 1 \(Tensor\)"):
        dnn2bnn.fit_posterior(bnn, loader, progress=False, temperature=1.0)


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_non_finite_outputs_are_refused(curvature):
    """NaN inputs gave NaN sigmas for every weight with curvature='ggn', silently."""
    bnn = dnn2bnn.transform_to_bnn_model(mlp((4, 8, 3)))
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="holds 3 NaN or infinite value"):
        dnn2bnn.fit_posterior(bnn, (x, torch.zeros(10, dtype=torch.long)), progress=False, temperature=1.0, curvature=curvature)


@pytest.mark.parametrize(
    ("parametrization", "dtype"),
    [("softplus", torch.float32), ("exp", torch.float32), ("softplus", torch.float64), ("exp", torch.float64)],
)
def test_sigma_equals_the_closed_form_under_every_parametrization(parametrization, dtype):
    """rho was always softplus^-1(sigma): under parametrization="exp" every sigma came out as
    exp(softplus^-1(sigma)) = e^sigma - 1 (5% too large at sigma 0.1), silently."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 3).to(dtype)
    bnn = dnn2bnn.transform_to_bnn_model(nn.Sequential(linear), parametrization=parametrization)
    x, y = torch.randn(300, 4, dtype=dtype), torch.randint(0, 3, (300,))
    lam, temperature = 1.0, 0.5
    dnn2bnn.fit_posterior(bnn, (x, y), progress=False, curvature="ggn", prior_precision=lam, temperature=temperature)
    p = F.softmax(linear(x), 1).detach()
    diag = (p * (1 - p)).T @ x.square() / len(x)  # softmax CE Hessian diagonal in the weights
    expected = torch.sqrt(temperature / (len(x) * diag + lam))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(bnn[0].posterior_sigma("weight").to(dtype), expected, rtol=tol, atol=0)
