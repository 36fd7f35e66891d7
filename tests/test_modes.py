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
