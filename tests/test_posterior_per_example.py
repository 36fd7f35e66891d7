"""Hook-based per-example squares (posterior/_per_example.py) against torch.func and brute force."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnn2bnn
from dnn2bnn.posterior import Curvature, Likelihood, diagonal_curvature
from dnn2bnn.posterior import curvature as curvature_module
from dnn2bnn.posterior._targets import at_means
from tests.test_posterior import _brute_force_ggn, _means


def _run(bnn, x, y, *, curvature="ggn", likelihood="classification", seed=0, vmap_only=False, monkeypatch=None, **kw):
    if vmap_only:  # every layer through torch.func: the reference
        monkeypatch.setattr(curvature_module, "hook_reason", lambda layer: "forced by the test")
    try:
        with at_means(bnn):
            return diagonal_curvature(
                bnn,
                _means(bnn),
                zip(x.split(5), y.split(5)),
                likelihood=Likelihood(likelihood),
                curvature=Curvature(curvature),
                generator=torch.Generator().manual_seed(seed),
                **kw,
            )
    finally:
        if vmap_only:
            monkeypatch.undo()


def _assert_same(result, reference):
    assert set(result.diag) == set(reference)
    for k, v in reference.items():
        torch.testing.assert_close(result.diag[k], v, rtol=1e-4, atol=1e-6 * float(v.abs().max()) + 1e-9)


class _Wrap(nn.Module):
    """One layer, then a flatten and a small head so that the output is [batch, 3]."""

    def __init__(self, layer: nn.Module, features: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layer(x)).flatten(1))


_LAYERS = {
    "linear-2d": (lambda: nn.Linear(6, 5), (6,), 5),
    "linear-3d": (lambda: nn.Linear(4, 5), (3, 4), 15),  # 3 positions: the (n, l, l') product
    "linear-3d-long": (lambda: nn.Linear(4, 5), (8, 4), 40),  # 8 positions: per-example bmm
    "conv1d": (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2), (2, 9), 4 * 5),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 6, 5), 6 * 3 * 3),
    "conv2d-reflect-dilation": (lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2, padding_mode="reflect"), (2, 5, 5), 75),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(2, 3, (2, 4), padding="same", bias=False), (2, 5, 6), 90),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1)), (2, 3, 5, 3), 3 * 4 * 2 * 4),
}


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("kind", list(_LAYERS))
def test_hooks_equal_brute_force_for_each_layer_type(kind):
    build, shape, features = _LAYERS[kind]
    bnn = dnn2bnn.transform_to_bnn_model(_Wrap(build(), features))
    x, y = torch.randn(7, *shape), torch.randint(0, 3, (7,))
    expected = _brute_force_ggn(bnn, x)
    for budget in (1, 2**20):  # one example per chunk, and all at once
        result = _run(bnn, x, y, memory_budget=budget)
        assert result.methods == {"head": "hooks", "layer": "hooks"}
        _assert_same(result, expected)


class _ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 6, 1, stride=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.stem(x)), inplace=True)
        h = F.relu(h + self.bn2(self.conv(h)))  # residual add
        return self.fc(self.down(h).mean((2, 3)))


def _residual_cnn() -> nn.Module:
    bnn = dnn2bnn.transform_to_bnn_model(_ResidualCNN())
    for bn in (bnn.bn1, bnn.bn2):  # running statistics that are not the identity (eval mode)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bnn


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_cnn_with_batchnorm_and_residual_equals_vmap(curvature, monkeypatch):
    bnn = _residual_cnn()
    x, y = torch.randn(11, 2, 6, 6), torch.randint(0, 3, (11,))
    hooked = _run(bnn, x, y, curvature=curvature, mc_samples=2)
    assert set(hooked.methods.values()) == {"hooks"}
    reference = _run(bnn, x, y, curvature=curvature, mc_samples=2, vmap_only=True, monkeypatch=monkeypatch)
    assert set(reference.methods.values()) == {"vmap (forced by the test)"}
    _assert_same(hooked, reference.diag)  # the same generator: the same sampled labels
    assert hooked.nll == pytest.approx(reference.nll, rel=1e-6)
    if curvature == "ggn":
        _assert_same(hooked, _brute_force_ggn(bnn, x))


def test_regression_hooks_equal_brute_force():
    bnn = dnn2bnn.transform_to_bnn_model(_Wrap(nn.Conv1d(1, 2, 3), 2 * 4))
    bnn.head = dnn2bnn.transform_to_bnn_model(nn.Linear(8, 2))
    x, y = torch.randn(6, 1, 6), torch.randn(6, 2)
    result = _run(bnn, x, y, likelihood="regression", noise_sigma=0.5)
    assert set(result.methods.values()) == {"hooks"}
    _assert_same(result, _brute_force_ggn(bnn, x, likelihood="regression", noise=0.5))


class _Shared(nn.Module):
    """A layer called twice, a layer whose weight is also read outside its forward, a deconv."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = nn.Linear(4, 4)
        self.outside = nn.Linear(4, 4)
        self.deconv = nn.ConvTranspose1d(1, 1, 2)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.twice(torch.relu(self.twice(x)))
        h = self.outside(h) + h @ self.outside.weight  # a second, functional read of the weight
        return self.head(self.deconv(h.unsqueeze(1)).squeeze(1))


def test_layers_the_hooks_cannot_see_go_through_vmap_and_stay_exact():
    bnn = dnn2bnn.transform_to_bnn_model(_Shared())
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    result = _run(bnn, x, y)
    assert result.methods == {
        "deconv": "vmap (transposed convolution)",
        "head": "hooks",
        "outside": "vmap (hooks disagreed with torch.func on the first examples)",
        "twice": "hooks",  # its two calls are summed per example before squaring
    }
    _assert_same(result, _brute_force_ggn(bnn, x))


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)  # left deterministic: integer inputs, no input gradient
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x)).mean(1)


def test_integer_inputs_and_hooks_removed_and_model_untouched():
    bnn = dnn2bnn.transform_to_bnn_model(_Tokens())
    x, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 3, (6,))
    before = {k: v.clone() for k, v in bnn.state_dict().items()}
    result = _run(bnn, x, y)
    assert result.methods == {"fc": "hooks"}
    _assert_same(result, _brute_force_ggn(bnn, x))
    assert all(not m._forward_hooks for m in bnn.modules())
    for k, v in bnn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in bnn.parameters())


def test_fit_posterior_reports_the_method_of_each_layer():
    bnn = dnn2bnn.transform_to_bnn_model(_Shared())
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    fit = dnn2bnn.fit_posterior(bnn, (x, y), progress=False, temperature=1.0)
    assert fit.per_example["head"] == "hooks"
    assert fit.per_example["deconv"] == "vmap (transposed convolution)"
    assert fit.to_dict()["per_example"] == fit.per_example
    # the fall-back to torch.func is said in the summary too, with its reason; hooked layers are not listed
    line = next(line for line in str(fit).splitlines() if line.startswith("per-example gradients by torch.func"))
    assert "deconv (transposed convolution)" in line and "head" not in line


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_keep_the_hooks(dtype):
    """The first-examples check compared float32 hook sums with torch.func's bfloat16/float16
    ones at rtol 1e-3: every layer of a half-precision model fell back to vmap ("hooks
    disagreed")."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 16), nn.ReLU(), nn.Linear(16, 3))
    bnn = dnn2bnn.transform_to_bnn_model(net.to(dtype))
    x, y = torch.randn(32, 1, 8, 8).to(dtype), torch.randint(0, 3, (32,))
    fit = dnn2bnn.fit_posterior(bnn, (x, y), progress=False, temperature=1.0)
    assert fit.per_example == {"0": "hooks", "3": "hooks", "5": "hooks"}
