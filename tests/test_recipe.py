import pytest
import torch
from torch import nn

import dnn2bnn
from dnn2bnn import DEFAULT_RHO_LR_FACTOR, bayes_param_groups, kl_divergence, transform_to_bnn_model
from tests.conftest import LeNet5, mlp


def test_groups_partition_the_trainable_parameters():
    bnn = transform_to_bnn_model(LeNet5(), exclude=["classifier.5"])  # last layer stays plain
    means, rhos = bayes_param_groups(bnn, lr=2e-3)
    assert (means["name"], means["lr"]) == ("means", 2e-3)
    assert (rhos["name"], rhos["lr"]) == ("rho", pytest.approx(DEFAULT_RHO_LR_FACTOR * 2e-3))
    names = {id(p): n for n, p in bnn.named_parameters()}
    assert all(names[id(p)].endswith("_rho") for p in rhos["params"])
    assert not any(names[id(p)].endswith("_rho") for p in means["params"])
    assert {"classifier.5.weight", "classifier.5.bias"} <= {names[id(p)] for p in means["params"]}
    listed = [id(p) for p in means["params"] + rhos["params"]]
    assert sorted(listed) == sorted(names) and len(set(listed)) == len(listed)


def test_options_frozen_and_shared_parameters():
    bnn = transform_to_bnn_model(mlp((4, 3, 2)))
    bnn[0].weight_mu.requires_grad_(False)
    shared = nn.ModuleList([bnn, bnn])  # the same parameters reachable twice
    means, rhos = bayes_param_groups(shared, lr=1e-3, rho_lr=0.05, weight_decay=0.0)
    assert rhos["lr"] == 0.05 and means["weight_decay"] == rhos["weight_decay"] == 0.0
    assert all(p is not bnn[0].weight_mu for p in means["params"])
    assert len(means["params"]) == 3 and len(rhos["params"]) == 4


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "lr must be finite and > 0"),
        ({"lr": "1e-3"}, TypeError, "lr must be a real number"),
        ({"lr": 1e-3, "rho_lr": float("nan")}, ValueError, "rho_lr must be finite"),
        ({"lr": 1e-3, "params": []}, TypeError, "'params' is set by the function"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        bayes_param_groups(transform_to_bnn_model(mlp()), **kwargs)


def test_model_without_bayesian_layer_is_an_error():
    with pytest.raises(ValueError, match="Sequential has no Bayesian layer"):
        bayes_param_groups(mlp(), lr=1e-3)


@pytest.mark.parametrize("grouped", [False, True])
def test_rho_moves_by_its_own_learning_rate(grouped):
    # With sigma = 1e-3 far below the N(0, 1) prior, the KL gradient on every rho has a
    # constant sign, so Adam moves each rho by ~lr per step: the posterior can only widen as
    # fast as the rho learning rate allows (the reason for a separate, larger one).
    bnn = transform_to_bnn_model(mlp((6, 5, 3)), posterior_sigma_init=1e-3)
    rho0 = [p.detach().clone() for n, p in bnn.named_parameters() if n.endswith("_rho")]
    params = bayes_param_groups(bnn, lr=1e-3) if grouped else bnn.parameters()
    optimizer = torch.optim.Adam(params, lr=1e-3)
    steps = 50
    for _ in range(steps):
        optimizer.zero_grad()
        kl_divergence(bnn).backward()
        optimizer.step()
    moved = torch.cat(
        [(p.detach() - r).flatten() for (n, p), r in zip(
            ((n, p) for n, p in bnn.named_parameters() if n.endswith("_rho")), rho0)]
    )
    rate = DEFAULT_RHO_LR_FACTOR * 1e-3 if grouped else 1e-3
    assert moved.min() > 0.95 * steps * rate
    assert moved.max() < 1.05 * steps * rate
    assert dnn2bnn.is_bayesian_layer(bnn[0])


def test_numpy_and_0d_tensor_rates_are_accepted():
    import numpy as np

    groups = bayes_param_groups(transform_to_bnn_model(mlp()), lr=np.float32(0.5), rho_lr=torch.tensor(2.0))
    assert [(g["lr"], type(g["lr"])) for g in groups] == [(0.5, float), (2.0, float)]
    with pytest.raises(TypeError, match="lr must be a real number"):
        bayes_param_groups(transform_to_bnn_model(mlp()), lr=True)


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1}])
def test_rho_group_never_decays(options):
    # AdamW's default weight_decay=0.01 on the rho group pulled every rho towards 0 (sigma
    # towards 1) at each step, whatever the gradient: R3 found it through the docs' AdamW.
    torch.manual_seed(0)
    bnn = transform_to_bnn_model(mlp((4, 3, 2)))
    groups = bayes_param_groups(bnn, lr=1e-2, **options)
    optimizer = torch.optim.AdamW(groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [options.get("weight_decay", 0.01), 0.0]
    rho_before = [p.detach().clone() for p in groups[1]["params"]]
    mu_before = bnn[0].weight_mu.detach().clone()
    for p in bnn.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only weight decay can move a parameter
    optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(rho_before, groups[1]["params"]))
    assert not torch.equal(mu_before, bnn[0].weight_mu)  # the means still decay
