import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import dnn2bnn
from dnn2bnn import (
    BayesConv2d,
    BayesLinear,
    ConversionError,
    ConversionWarning,
    set_mode,
    transform_to_bnn_layer,
    transform_to_bnn_model,
)
from tests.conftest import LeNet5, mlp, state_equal


def _check_equivalent(dnn, x, atol=1e-5, **options):
    dnn.eval()
    before = copy.deepcopy(dnn.state_dict())
    bnn = transform_to_bnn_model(dnn, **options)
    assert state_equal(dnn, dnn) and all(torch.equal(before[k], v) for k, v in dnn.state_dict().items())
    with torch.no_grad(), set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(x), dnn(x), rtol=0, atol=atol)
    with torch.no_grad():
        assert not torch.equal(bnn(x), bnn(x))
    return bnn


def _bayes_layers(model):
    return [m for m in model.modules() if isinstance(m, dnn2bnn.BayesianLayer)]


@pytest.mark.parametrize(
    "make, shape, expected",
    [
        (lambda: mlp(), (4, 20), 3),
        (LeNet5, (2, 1, 28, 28), 5),
        (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (2, 3, 32, 32), 21),
    ],
    ids=["mlp", "lenet5", "resnet18"],
)
def test_mean_mode_equals_dnn_and_means_are_trained_weights(make, shape, expected):
    dnn = make()
    bnn = _check_equivalent(dnn, torch.randn(shape))
    layers = _bayes_layers(bnn)
    assert len(layers) == expected
    dnn_modules = dict(dnn.named_modules())
    for name, module in bnn.named_modules():
        if isinstance(module, dnn2bnn.BayesianLayer):
            assert torch.equal(module.weight_mu, dnn_modules[name].weight)
    report = bnn.conversion_report
    assert report.method == "torch.fx" and len(report.converted) == expected and not report.skipped


def test_input_model_is_untouched_and_inplace_converts_it():
    dnn = LeNet5()
    keys = list(dnn.state_dict())
    bnn = transform_to_bnn_model(dnn)
    assert list(dnn.state_dict()) == keys and type(dnn.features[0]) is nn.Conv2d
    assert bnn is not dnn and type(bnn) is LeNet5
    same = transform_to_bnn_model(dnn, inplace=True)
    assert same is dnn and type(dnn.features[0]) is BayesConv2d


def test_containers_user_attributes_buffers_and_other_params_are_kept():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh())])
            self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})
            self.norm = nn.LayerNorm(4)
            self.scale = nn.Parameter(torch.tensor(1.5))
            self.register_buffer("offset", torch.arange(2.0))
            self.label = "mine"

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            x = self.norm(x)
            return self.heads["a"](x) * self.scale + self.heads["b"](x) + self.offset

        def describe(self):
            return self.label

    dnn = Net()
    bnn = _check_equivalent(dnn, torch.randn(3, 4))
    assert len(_bayes_layers(bnn)) == 4
    assert isinstance(bnn.blocks[1][0], BayesLinear) and isinstance(bnn.heads["b"], BayesLinear)
    assert bnn.describe() == "mine" and torch.equal(bnn.offset, dnn.offset)
    assert torch.equal(bnn.scale, dnn.scale) and torch.equal(bnn.norm.weight, dnn.norm.weight)
    assert "scale" in dict(bnn.named_parameters())


def test_shared_layer_is_one_bayesian_layer_with_one_sample_per_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            return self.fc(x), self.fc(x)

    bnn = transform_to_bnn_model(Shared(), posterior_sigma_init=0.5)
    assert len(_bayes_layers(bnn)) == 1 and bnn.conversion_report.shared == ["fc"]
    x = torch.randn(2, 5)
    first, second = bnn(x)
    torch.testing.assert_close(first, second)  # the same weight sample within one call
    again, _ = bnn(x)
    assert not torch.allclose(first, again)  # a new sample on the next call
    assert bnn.fc._sample_cache is None  # nothing is kept between calls
    assert not torch.equal(bnn.fc(x), bnn.fc(x))  # called alone, each call samples


class _SharedTwice(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x) - self.layer(x)


class _SharedMixed(nn.Module):  # a module call plus a functional read of its weight
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        return self.layer(x) - F.linear(x, self.layer.weight, self.layer.bias)


class _SharedAlias(nn.Module):  # one module registered under two names
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.alias = self.layer

    def forward(self, x):
        return self.layer(x) - self.alias(x)


_SHARED = {
    "linear": (lambda: _SharedTwice(nn.Linear(4, 4)), (3, 4)),
    "conv2d": (lambda: _SharedTwice(nn.Conv2d(2, 2, 3, padding=1)), (2, 2, 5, 5)),
    "mixed": (_SharedMixed, (3, 4)),
    "alias": (_SharedAlias, (3, 4)),
}


@pytest.mark.parametrize("estimator", ["flipout", "lrt"])
@pytest.mark.parametrize("family", sorted(_SHARED))
def test_shared_layer_falls_back_to_reparam_under_flipout_or_lrt(family, estimator):
    # flipout/lrt draw fresh noise at every use; a shared layer must give one sample per call
    build, shape = _SHARED[family]
    torch.manual_seed(0)
    with pytest.warns(ConversionWarning, match=f"estimator '{estimator}'.*'reparam' instead"):
        bnn = transform_to_bnn_model(build(), posterior_sigma_init=0.2, estimator=estimator)
    report = bnn.conversion_report
    assert report.shared == ["layer"]
    assert any("shared" in n and "'reparam' instead" in n for n in report.notes)
    assert bnn.layer.estimator is dnn2bnn.Estimator.REPARAM
    assert torch.equal(bnn(torch.randn(*shape)), torch.zeros(shape))


def test_shared_layer_reconfigured_to_flipout_keeps_reparam():
    bnn = transform_to_bnn_model(_SharedTwice(nn.Linear(4, 4)), posterior_sigma_init=0.2)
    with pytest.warns(ConversionWarning, match="'reparam' instead"):
        again = transform_to_bnn_model(bnn, estimator="lrt")
    assert again.layer.estimator is dnn2bnn.Estimator.REPARAM
    assert torch.equal(again(torch.ones(2, 4)), torch.zeros(2, 4))


def test_unshared_layers_keep_flipout():
    bnn = transform_to_bnn_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), estimator="flipout")
    assert bnn.conversion_report.shared == [] and not bnn.conversion_report.notes
    assert all(layer.estimator is dnn2bnn.Estimator.FLIPOUT for layer in bnn)


def test_same_module_under_two_names_is_converted_once():
    inner = nn.Linear(3, 3)
    dnn = nn.Sequential(inner, nn.ReLU(), inner)
    bnn = _check_equivalent(dnn, torch.randn(2, 3))
    assert bnn[0] is bnn[2] and len(_bayes_layers(bnn)) == 1


def test_functional_use_of_layer_weights_is_bayesian():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            h = F.conv2d(x, self.conv.weight, self.conv.bias).flatten(1)[:, :6]
            return F.linear(h, self.fc.weight, self.fc.bias)

    bnn = _check_equivalent(Functional(), torch.randn(2, 1, 5, 5))
    assert {c.name for c in bnn.conversion_report.converted} == {"fc", "conv"}
    assert all(c.traced_use for c in bnn.conversion_report.converted)


def test_functional_and_module_use_share_one_sample():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.fc(x) - F.linear(x, self.fc.weight)

    bnn = transform_to_bnn_model(Tied(), posterior_sigma_init=0.5)
    assert bnn.conversion_report.shared == ["fc"]
    torch.testing.assert_close(bnn(torch.randn(2, 4)), torch.zeros(2, 4))


def test_raw_parameter_used_functionally_is_converted_on_its_owner():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return F.linear(self.fc(x), self.w)

    bnn = _check_equivalent(Raw(), torch.randn(4, 3))
    assert isinstance(bnn, Raw) and isinstance(bnn, dnn2bnn.BayesianParameters)
    report = bnn.conversion_report
    root = [c for c in report.converted if c.name == ""]
    assert root and root[0].params == ("w",) and "the weight of linear()" in root[0].reason
    assert not report.skipped
    transform_to_bnn_model(Raw(), strict=True)  # nothing is left deterministic


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 3.0


def test_subclasses_convert_and_keep_their_forward():
    dnn = nn.Sequential(ScaledConv(1, 2, 3), nn.Flatten(), torchvision.ops.misc.MLP(8, [4]))
    dnn.append(nn.modules.linear.NonDynamicallyQuantizableLinear(4, 2))
    bnn = _check_equivalent(dnn, torch.randn(2, 1, 4, 4))
    assert isinstance(bnn[0], ScaledConv) and isinstance(bnn[0], BayesConv2d)
    assert isinstance(bnn[3], BayesLinear) and isinstance(bnn[3], nn.modules.linear.NonDynamicallyQuantizableLinear)
    report = {c.name: c.new_type for c in bnn.conversion_report.converted}
    assert report["0"] == "BayesScaledConv" and report["3"] == "BayesNonDynamicallyQuantizableLinear"


def test_untraceable_model_falls_back_warns_once_and_reports():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Sequential(nn.Linear(3, 3))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing
                return self.a(x)
            return self.b(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnn = transform_to_bnn_model(Branchy())
    conversion = [w for w in caught if issubclass(w.category, ConversionWarning)]
    assert len(conversion) == 1 and "walking the module tree" in str(conversion[0].message)
    report = bnn.conversion_report
    assert report.method == "module tree" and "TraceError" in report.fallback_reason
    assert {c.name for c in report.converted} == {"a", "b.0"}
    assert "tracing failed" in str(report)
    x = torch.ones(1, 3)
    with set_mode(bnn, "mean"):
        assert torch.equal(bnn(x), Branchy.forward(bnn, x))


def test_unreached_layers_are_still_converted_and_flagged():
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.aux = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x)

    report = transform_to_bnn_model(Aux()).conversion_report
    flags = {c.name: c.traced_use for c in report.converted}
    assert flags == {"fc": True, "aux": False}
    assert "not reached by the traced forward" in str(report)


def test_include_exclude_and_layer_types():
    dnn = torchvision.models.resnet18(weights=None, num_classes=10)
    last = transform_to_bnn_model(dnn, include="fc")
    assert [c.name for c in last.conversion_report.converted] == ["fc"]
    assert sum(s.reason == "not matched by include" for s in last.conversion_report.skipped) == 20
    block = transform_to_bnn_model(dnn, include=["layer4"], exclude="layer4.0.downsample.*")
    names = [c.name for c in block.conversion_report.converted]
    assert names and all(n.startswith("layer4.") for n in names) and "layer4.0.downsample.0" not in names
    linear_only = transform_to_bnn_model(dnn, layer_types=[nn.Linear])
    assert [type(m) for m in _bayes_layers(linear_only)] == [BayesLinear]
    with pytest.raises(ConversionError, match="include pattern 'fcc' matches no module"):
        transform_to_bnn_model(dnn, include="fcc")
    with pytest.raises(TypeError, match="layer_types: no Bayesian layer for nn.PReLU"):
        transform_to_bnn_model(dnn, layer_types=[nn.PReLU])


def test_unknown_and_invalid_options_fail_before_anything_changes():
    dnn = mlp()
    with pytest.raises(TypeError, match="unknown Bayesian option 'prior_sgma'"):
        transform_to_bnn_model(dnn, prior_sgma=0.1)
    with pytest.raises(ValueError, match="posterior_sigma_init must be > 0"):
        transform_to_bnn_model(dnn, inplace=True, posterior_sigma_init=-1)
    assert type(dnn[0]) is nn.Linear
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        transform_to_bnn_model("resnet18")


def test_options_reach_the_layers():
    bnn = transform_to_bnn_model(mlp(), prior_mean=0.0, prior_sigma=0.2, posterior_sigma_init=0.01)
    for layer in _bayes_layers(bnn):
        assert layer.prior.sigma == 0.2 and layer.posterior_sigma_init == 0.01
        torch.testing.assert_close(layer.posterior_sigma(), torch.full_like(layer.weight_mu, 0.01))


def test_transform_to_bnn_layer_by_type_and_custom_class():
    dnn = LeNet5()
    convs = transform_to_bnn_layer(dnn, nn.Conv2d)
    assert [type(m).__name__ for m in _bayes_layers(convs)] == ["BayesConv2d"] * 2

    class MyBayesLinear(nn.Module):
        """A user-written layer following the protocol (from_dnn, kl)."""

        def __init__(self, linear):
            super().__init__()
            self.linear = linear
            self.log_noise = nn.Parameter(torch.tensor(-3.0))

        @classmethod
        def from_dnn(cls, module, *, noise=0.1):
            return cls(copy.deepcopy(module))

        def kl(self):
            return self.log_noise.exp()

        def forward(self, x):
            return self.linear(x) + self.log_noise.exp() * torch.randn_like(self.linear(x))

    custom = transform_to_bnn_layer(dnn, nn.Linear, MyBayesLinear, noise=0.2)
    assert sum(isinstance(m, MyBayesLinear) for m in custom.modules()) == 3
    torch.testing.assert_close(dnn2bnn.kl_divergence(custom), 3 * torch.tensor(-3.0).exp())
    with pytest.raises(TypeError, match="unknown Bayesian option 'sigma'"):
        transform_to_bnn_layer(dnn, nn.Linear, MyBayesLinear, sigma=0.2)
    with pytest.raises(TypeError, match="from_dnn"):
        transform_to_bnn_layer(dnn, nn.Linear, nn.Linear)
    with pytest.raises(TypeError, match="no built-in Bayesian layer for nn.PReLU"):
        transform_to_bnn_layer(dnn, nn.PReLU)


def test_bare_layer_as_model_and_repeated_conversion():
    bnn = transform_to_bnn_model(nn.Linear(3, 2))
    assert isinstance(bnn, BayesLinear)
    again = transform_to_bnn_model(bnn)
    assert not again.conversion_report.skipped
    mixed = transform_to_bnn_layer(transform_to_bnn_layer(LeNet5(), nn.Conv2d), nn.Linear)
    assert len(mixed.conversion_report.converted) == 5


def test_weight_tying_is_reported():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.emb(idx))

    with pytest.warns(ConversionWarning, match="head.weight was tied to emb.weight"):
        bnn = transform_to_bnn_model(Tied())
    assert bnn.conversion_report.notes


def test_report_counts_parameters():
    dnn = mlp((4, 3, 2))
    report = transform_to_bnn_model(dnn).conversion_report
    n = sum(p.numel() for p in dnn.parameters())
    assert (report.params_before, report.params_after) == (n, 2 * n)
    assert "BayesLinear" in str(report)


def test_state_dict_round_trip_reproduces_mean_outputs(tmp_path):
    dnn = LeNet5()
    bnn = transform_to_bnn_model(dnn)
    with torch.no_grad():
        for layer in _bayes_layers(bnn):
            layer.weight_mu.add_(0.01 * torch.randn_like(layer.weight_mu))
            layer.weight_rho.add_(torch.randn_like(layer.weight_rho))
    torch.save(bnn.state_dict(), tmp_path / "bnn.pt")
    fresh = transform_to_bnn_model(LeNet5())
    fresh.load_state_dict(torch.load(tmp_path / "bnn.pt", weights_only=True))
    x = torch.randn(3, 1, 28, 28)
    with set_mode(bnn, "mean"), set_mode(fresh, "mean"):
        torch.testing.assert_close(fresh(x), bnn(x), rtol=0, atol=0)
    torch.testing.assert_close(dnn2bnn.kl_divergence(fresh), dnn2bnn.kl_divergence(bnn))


class SharedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.fc(x))


def test_whole_model_pickles_with_sample_sharing(tmp_path):
    bnn = transform_to_bnn_model(SharedTwice())
    torch.save(bnn, tmp_path / "bnn.pt")
    loaded = torch.load(tmp_path / "bnn.pt", weights_only=False)
    x = torch.randn(2, 3)
    with set_mode(loaded, "mean"), set_mode(bnn, "mean"):
        torch.testing.assert_close(loaded(x), bnn(x))
    assert loaded.fc._share_samples


def test_converted_model_trains():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, 0] + x[:, 1] > 0).long()
    bnn = transform_to_bnn_model(mlp((10, 32, 2)), posterior_sigma_init=0.05)
    criterion = dnn2bnn.WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=256)
    optimizer = torch.optim.Adam(bnn.parameters(), lr=1e-2)
    losses, data_losses = [], []
    for _ in range(60):
        optimizer.zero_grad()
        loss = criterion(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        data_losses.append(criterion.last_data_loss.item())
    assert sum(data_losses[-5:]) < 0.5 * sum(data_losses[:5])
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])
    for layer in _bayes_layers(bnn):
        assert layer.weight_rho.grad is not None and layer.weight_rho.grad.abs().sum() > 0
