"""dnn2bnn.to_dnn: plain networks holding the posterior means, or one posterior draw."""

import pytest
import torch
from torch import nn

import dnn2bnn
from dnn2bnn import BayesianLayer
from tests.conftest import LeNet5, mlp, state_equal


def _conv_bn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


@pytest.mark.parametrize(
    "build, shape", [(mlp, (4, 20)), (LeNet5, (2, 1, 28, 28)), (_conv_bn, (2, 3, 12, 12))],
    ids=["mlp", "lenet", "conv-batchnorm"],
)
def test_mean_mode_equals_to_dnn_exactly(build, shape):
    bnn = dnn2bnn.transform_to_bnn_model(build(), posterior_sigma_init=0.1).eval()
    before = {k: v.clone() for k, v in bnn.state_dict().items()}
    dnn = dnn2bnn.to_dnn(bnn)
    assert type(dnn) is type(bnn)
    assert not any(isinstance(m, BayesianLayer) for m in dnn.modules())
    assert not dnn._forward_hooks and not dnn._forward_pre_hooks
    x = torch.randn(shape)
    with torch.no_grad(), dnn2bnn.set_mode(bnn, "mean"):
        assert torch.equal(dnn(x), bnn(x))
    assert all(torch.equal(before[k], v) for k, v in bnn.state_dict().items())  # untouched
    assert any(isinstance(m, BayesianLayer) for m in bnn.modules())


def test_round_trip_restores_the_original_weights():
    dnn = LeNet5()
    back = dnn2bnn.to_dnn(dnn2bnn.transform_to_bnn_model(dnn))
    assert state_equal(dnn, back)


def test_sample_mode_draws_one_network_from_the_posterior():
    layer = nn.Linear(200, 100)
    bnn = dnn2bnn.transform_to_bnn_model(nn.Sequential(layer), posterior_sigma_init=0.5)
    drawn = dnn2bnn.to_dnn(bnn, mode="sample")
    x = torch.randn(3, 200)
    assert torch.equal(drawn(x), drawn(x))  # deterministic once drawn
    z = (drawn[0].weight - bnn[0].weight_mu) / 0.5
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.std().item() - 1) < 5 * (0.5 / n) ** 0.5
    other = dnn2bnn.to_dnn(bnn, mode="sample")
    assert not torch.equal(other[0].weight, drawn[0].weight)


def test_a_shared_layer_stays_shared():
    shared = nn.Linear(4, 4)
    bnn = dnn2bnn.transform_to_bnn_model(nn.Sequential(shared, nn.ReLU(), shared))
    dnn = dnn2bnn.to_dnn(bnn, mode="sample")
    assert dnn[0] is dnn[2] and type(dnn[0]) is nn.Linear


def test_single_layer_and_bad_mode():
    layer = dnn2bnn.BayesLinear(3, 2)
    assert type(dnn2bnn.to_dnn(layer)) is nn.Linear
    with pytest.raises(ValueError, match="'mean' or 'sample'"):
        dnn2bnn.to_dnn(layer, mode="median")
