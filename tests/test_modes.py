import warnings

import pytest
import torch

import dnn2bnn
from dnn2bnn import BayesMode, get_mode, set_mode, transform_to_bnn_model
from tests.conftest import mlp


def test_set_mode_switches_and_context_restores():
    bnn = transform_to_bnn_model(mlp())
    x = torch.randn(3, 20)
    assert get_mode(bnn) is BayesMode.SAMPLE
    with set_mode(bnn, "mean") as same:
        assert same is bnn and get_mode(bnn) is BayesMode.MEAN
        assert torch.equal(bnn(x), bnn(x))
    assert get_mode(bnn) is BayesMode.SAMPLE
    set_mode(bnn, BayesMode.MEAN)  # also works without `with`
    assert get_mode(bnn) is BayesMode.MEAN


def test_nested_contexts_restore_per_layer_modes():
    bnn = transform_to_bnn_model(mlp())
    set_mode(bnn[0], "mean")
    assert get_mode(bnn) is None  # mixed
    with set_mode(bnn, "sample"):
        with set_mode(bnn, "mean"):
            assert get_mode(bnn) is BayesMode.MEAN
        assert get_mode(bnn) is BayesMode.SAMPLE
    assert bnn[0].bayes_mode is BayesMode.MEAN and bnn[2].bayes_mode is BayesMode.SAMPLE


def test_mode_is_independent_of_train_eval():
    bnn = transform_to_bnn_model(mlp()).eval()
    x = torch.randn(2, 20)
    assert not torch.equal(bnn(x), bnn(x))


def test_bad_mode_and_model_without_bayesian_layers():
    bnn = transform_to_bnn_model(mlp())
    with pytest.raises(ValueError, match="mode must be one of \\['sample', 'mean'\\], got 'avg'"):
        set_mode(bnn, "avg")
    with pytest.warns(UserWarning, match="no Bayesian layer"):
        set_mode(mlp(), "mean")
    assert dnn2bnn.get_mode(mlp()) is None


class _Twice(torch.nn.Module):
    """``layer`` used twice per call, next to an unshared ``head``; returns the gap."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.head = layer, torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.layer(x) - self.layer(x), self.head(x.flatten(1)[:, :2])


class _Mixed(_Twice):  # a module call plus a functional read of its weight
    def forward(self, x):
        gap = self.layer(x) - torch.nn.functional.linear(x, self.layer.weight, self.layer.bias)
        return gap, self.head(x[:, :2])


class _Alias(_Twice):  # one module registered under two names
    def __init__(self, layer):
        super().__init__(layer)
        self.other = layer

    def forward(self, x):
        return self.layer(x) - self.other(x), self.head(x[:, :2])


_SHARED = {
    "linear": (lambda: _Twice(torch.nn.Linear(4, 4)), (3, 4)),
    "conv2d": (lambda: _Twice(torch.nn.Conv2d(2, 2, 3, padding=1)), (2, 2, 5, 5)),
    "mixed": (lambda: _Mixed(torch.nn.Linear(4, 4)), (3, 4)),
    "alias": (lambda: _Alias(torch.nn.Linear(4, 4)), (3, 4)),
}


@pytest.mark.parametrize("estimator", ["flipout", "lrt"])
@pytest.mark.parametrize("family", sorted(_SHARED))
def test_set_estimator_keeps_shared_layers_on_reparam_with_a_warning(family, estimator):
    # H's D7: flipout/lrt drew independent noise per use of a shared layer
    build, shape = _SHARED[family]
    torch.manual_seed(0)
    bnn = transform_to_bnn_model(build(), posterior_sigma_init=0.2)
    assert bnn.conversion_report.shared == ["layer"]
    with pytest.warns(UserWarning, match=r"\['layer'\] are used more than once per call"):
        dnn2bnn.set_estimator(bnn, estimator)
    assert bnn.layer.estimator is dnn2bnn.Estimator.REPARAM
    assert bnn.head.estimator.value == estimator  # unshared layers switch as asked
    gap, _ = bnn(torch.randn(shape))
    assert gap.abs().max().item() == 0.0


@pytest.mark.parametrize("estimator", ["flipout", "lrt"])
@pytest.mark.parametrize("family", sorted(_SHARED))
def test_shared_layer_with_an_assigned_estimator_still_draws_one_sample_per_call(
    family, estimator
):
    build, shape = _SHARED[family]
    torch.manual_seed(0)
    bnn = transform_to_bnn_model(build(), posterior_sigma_init=0.2)
    bnn.layer.estimator = dnn2bnn.Estimator(estimator)  # bypasses set_estimator's check
    gap, _ = bnn(torch.randn(shape))
    assert gap.abs().max().item() == 0.0
    with set_mode(bnn, "mean"):
        gap, _ = bnn(torch.randn(shape))
    assert gap.abs().max().item() == 0.0


def test_set_estimator_back_to_reparam_on_a_shared_layer_is_silent():
    bnn = transform_to_bnn_model(_SHARED["linear"][0]())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dnn2bnn.set_estimator(bnn, "reparam")
    assert bnn.layer.estimator is dnn2bnn.Estimator.REPARAM


class _DeconvTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.ConvTranspose2d(2, 2, 3, stride=2)

    def forward(self, x):
        return self.layer(x, output_size=[12, 12]) - self.layer(x, output_size=[12, 12])


@pytest.mark.parametrize("estimator", ["flipout", "lrt"])
def test_shared_transposed_conv_keeps_output_size_and_one_sample(estimator):
    bnn = transform_to_bnn_model(_DeconvTwice(), posterior_sigma_init=0.2)
    bnn.layer.estimator = dnn2bnn.Estimator(estimator)
    gap = bnn(torch.randn(1, 2, 5, 5))
    assert gap.shape == (1, 2, 12, 12) and gap.abs().max().item() == 0.0
