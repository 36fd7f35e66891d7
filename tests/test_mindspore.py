import warnings

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


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False))


#: Every optimizer class of torch.optim, with non-default hyperparameters per group.
OPTIMIZERS = {
    "SGD": ({"lr": 0.05, "momentum": 0.8, "dampening": 0.1, "weight_decay": 1e-3}, {"lr": 0.2}),
    "Adam": ({"lr": 2e-3, "betas": (0.8, 0.95), "amsgrad": True}, {"weight_decay": 0.1}),
    "AdamW": ({"lr": 2e-3, "weight_decay": 0.05, "eps": 1e-6}, {"betas": (0.7, 0.9)}),
    "RMSprop": ({"lr": 3e-3, "alpha": 0.9, "centered": True, "momentum": 0.5}, {"eps": 1e-5}),
    "Adagrad": ({"lr": 0.05, "lr_decay": 1e-3, "initial_accumulator_value": 0.1}, {"lr": 0.3}),
    "Adadelta": ({"lr": 0.5, "rho": 0.8}, {"weight_decay": 0.01}),
    "Adamax": ({"lr": 4e-3, "betas": (0.85, 0.99)}, {"eps": 1e-6}),
    "NAdam": ({"lr": 4e-3, "momentum_decay": 3e-3, "decoupled_weight_decay": True}, {"lr": 1e-2}),
    "RAdam": ({"lr": 4e-3, "decoupled_weight_decay": True, "weight_decay": 0.1}, {"lr": 1e-2}),
    "ASGD": ({"lr": 0.02, "lambd": 1e-3, "alpha": 0.7, "t0": 10.0}, {"lr": 0.05}),
    "Rprop": ({"lr": 0.02, "etas": (0.4, 1.3), "step_sizes": (1e-5, 10.0)}, {"lr": 0.05}),
    "LBFGS": ({"lr": 0.5, "max_iter": 3, "history_size": 7}, None),  # one group only
    "SparseAdam": ({"lr": 2e-3, "betas": (0.8, 0.9)}, {"lr": 4e-3}),
    "Adafactor": ({"lr": 0.02, "beta2_decay": -0.7, "d": 2.0}, {"weight_decay": 0.1}),
    "Muon": ({"lr": 0.02, "momentum": 0.9, "ns_steps": 3, "nesterov": False}, {"lr": 0.05}),
}


def test_every_torch_optim_optimizer_is_listed():
    classes = {
        name
        for name, value in vars(torch.optim).items()
        if isinstance(value, type)
        and issubclass(value, torch.optim.Optimizer)
        and value is not torch.optim.Optimizer
    }
    assert classes <= set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_is_rebuilt_with_each_group_and_its_state(name):
    """Regression: AdamW raised TypeError (decoupled_weight_decay is not a constructor argument)."""
    cls = getattr(torch.optim, name, None)
    if cls is None:
        pytest.skip(f"torch.optim.{name} is not in this torch")
    net = _mlp()
    first, second = OPTIMIZERS[name]
    if second is None:
        optimizer = cls(net.parameters(), **first)
    else:
        optimizer = cls(
            [{"params": net[0].parameters()}, {"params": net[2].parameters(), **second}], **first
        )
    if name != "SparseAdam":  # it needs sparse gradients; the rebuild is what is tested
        def closure():
            optimizer.zero_grad()
            loss = net(torch.randn(5, 4)).square().mean()
            loss.backward()
            return loss

        optimizer.step(closure)
    transform = TransformToBNN(net, optimizer=optimizer)
    bnn = transform.transform_to_bnn_model()
    new = transform.optimizer
    assert type(new) is cls and len(new.param_groups) == len(optimizer.param_groups)
    for old_group, new_group in zip(optimizer.param_groups, new.param_groups):
        assert {k: v for k, v in old_group.items() if k != "params"} == {
            k: v for k, v in new_group.items() if k != "params"
        }
        assert len(new_group["params"]) == 2 * len(old_group["params"])
    assert {id(p) for g in new.param_groups for p in g["params"]} == {
        id(p) for p in bnn.parameters()
    }
    old_state = optimizer.state[net[0].weight]
    new_state = new.state[bnn[0].weight_mu]
    if name == "LBFGS" or not old_state:
        assert not new_state  # LBFGS: one state for all parameters together, reset
    else:
        assert old_state.keys() == new_state.keys()
        for key, value in old_state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(new_state[key])), key
    rho_state = new.state[bnn[0].weight_rho]  # fresh (Adagrad fills it in its constructor)
    assert float(rho_state.get("step", 0)) == 0
    if name != "SparseAdam":
        new.step(lambda: bnn(torch.randn(5, 4)).square().mean().backward() or torch.tensor(0.0))


def test_an_attached_lr_scheduler_is_warned_about():
    net = _mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    transform = TransformToBNN(net, optimizer=optimizer)
    with pytest.warns(UserWarning, match="LR scheduler is attached.*create the scheduler again"):
        transform.transform_to_bnn_model()
    rebuilt = torch.optim.lr_scheduler.StepLR(
        transform.optimizer, step_size=2, last_epoch=scheduler.last_epoch
    )
    assert rebuilt.get_last_lr() == scheduler.get_last_lr()


def test_weight_decay_reaching_rho_is_warned():
    """Regression (R3): AdamW's default weight decay silently pulled every rho of the rebuilt optimizer towards 0."""
    net = nn.Sequential(nn.Linear(4, 3))
    t = TransformToBNN(net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-2))
    with pytest.warns(UserWarning, match=r"weight_decay=0.01 applies to 0.weight_rho, 0.bias_rho"):
        t.transform_to_bnn_model()
    t = TransformToBNN(net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.transform_to_bnn_model()
    assert all(g["weight_decay"] == 0.0 for g in t.optimizer.param_groups)
