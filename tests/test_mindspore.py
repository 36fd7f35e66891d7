import pytest
import torch
from torch import nn

from dnn2bnn import BayesConv2d, BayesLinear, TransformToBNN, WithBNNLoss
from tests.conftest import LeNet5


class WithLossCell(nn.Module):
    def __init__(self, backbone, loss_fn):
        super().__init__()
        self.backbone = backbone
        self.loss_fn = loss_fn


def test_bare_model_and_optimizer_with_every_hyperparameter():
    net = LeNet5()
    head = list(net.classifier.parameters())
    body = list(net.features.parameters())
    optimizer = torch.optim.SGD(
        [{"params": body, "lr": 0.01}, {"params": head, "lr": 0.1, "weight_decay": 1e-4}],
        lr=0.5,
        momentum=0.9,
        nesterov=True,
    )
    transform = TransformToBNN(net, optimizer=optimizer, prior_sigma=0.5)
    bnn = transform.transform_to_bnn_model()
    assert transform.bnn is bnn and isinstance(bnn.features[0], BayesConv2d)
    new = transform.optimizer
    assert type(new) is torch.optim.SGD and new is not optimizer
    for old_group, new_group in zip(optimizer.param_groups, new.param_groups):
        assert {k: v for k, v in old_group.items() if k != "params"} == {
            k: v for k, v in new_group.items() if k != "params"
        }
        assert len(new_group["params"]) == 2 * len(old_group["params"])
    in_optimizer = {id(p) for g in new.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in bnn.parameters()}
    assert bnn.features[0].prior.sigma == 0.5


def test_with_loss_cell_gives_with_bnn_loss_and_layers_accumulate():
    cell = WithLossCell(LeNet5(), nn.CrossEntropyLoss())
    transform = TransformToBNN(cell, dnn_factor=1, bnn_factor=1e-3)
    first = transform.transform_to_bnn_layer(nn.Linear)
    assert isinstance(first, WithBNNLoss) and first.bnn_factor == 1e-3
    assert isinstance(first.backbone.classifier[1], BayesLinear)
    assert type(first.backbone.features[0]) is nn.Conv2d
    second = transform.transform_to_bnn_layer(nn.Conv2d, BayesConv2d)
    assert isinstance(second.backbone.features[0], BayesConv2d)
    assert isinstance(second.backbone.classifier[1], BayesLinear)
    assert type(cell.backbone.features[0]) is nn.Conv2d  # the user's network is untouched
    loss = second(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]))
    loss.backward()


def test_frozen_parameters_stay_out_of_the_optimizer():
    net = LeNet5()
    optimizer = torch.optim.Adam(net.classifier.parameters(), lr=1e-3, betas=(0.8, 0.9))
    transform = TransformToBNN(net, optimizer=optimizer)
    bnn = transform.transform_to_bnn_model()
    ids = {id(p) for p in transform.optimizer.param_groups[0]["params"]}
    assert ids == {id(p) for p in bnn.classifier.parameters()}
    assert transform.optimizer.param_groups[0]["betas"] == (0.8, 0.9)


def test_errors():
    with pytest.raises(TypeError, match="trainable must be an nn.Module"):
        TransformToBNN(object())
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not in the trainable network"):
        TransformToBNN(LeNet5(), optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
