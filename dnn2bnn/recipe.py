"""The recommended optimizer set-up for fine-tuning a converted network.

Adam changes each parameter by about its learning rate per step, whatever the gradient's
size. For ``rho`` (``sigma = exp(rho)`` by default, so ``rho = log(sigma)``; about so with softplus for small sigma) that
means the posterior width changes by a factor of about ``exp(lr)`` per step: with the usual
``lr = 1e-3``, two epochs of MNIST (~800 steps) can widen sigma at most ~2x, and a converted
network stays a deterministic one with a negligible posterior. Giving ``rho`` its own, larger
learning rate (10x by default) lets sigma reach the width the ELBO asks for within an epoch,
while the means, already trained, keep a small learning rate. See ``docs/quality.md``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from dnn2bnn.layers._base import is_bayesian_layer
from dnn2bnn.loss import _real

__all__ = ["DEFAULT_RHO_LR_FACTOR", "bayes_param_groups"]

#: ``rho`` learning rate relative to the means' learning rate in :func:`bayes_param_groups`.
DEFAULT_RHO_LR_FACTOR = 10.0


def bayes_param_groups(
    model: nn.Module, *, lr: float, rho_lr: float | None = None, **group_options: Any
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with a separate (larger) learning rate for the ``rho``\\s.

    The first group holds every trainable parameter that is not a posterior ``*_rho`` of a
    Bayesian layer (the posterior means and any deterministic parameters) with ``lr``; the
    second holds the ``*_rho`` parameters with ``rho_lr`` (default
    ``DEFAULT_RHO_LR_FACTOR * lr``) and ``weight_decay=0.0``: weight decay pulls ``rho`` to 0,
    i.e. every sigma towards ``exp(0) = 1`` (``softplus(0) = log 2`` with
    ``parametrization="softplus"``), whatever the data and the prior say; with ``AdamW``'s
    default decay that silently widened the posterior step after step (as
    ``BayesTrainer`` does, the ``rho`` group never decays). Parameters are listed once even
    if shared; frozen ones (``requires_grad=False``) are left out.

    Args:
        model: a network with Bayesian layers (e.g. from :func:`dnn2bnn.transform_to_bnn_model`).
        lr: learning rate of the means and deterministic parameters.
        rho_lr: learning rate of the ``rho`` parameters; ``None`` for ``10 * lr``.
        **group_options: other per-group options (``betas``, ...) for both groups;
            ``weight_decay`` applies to the means' group only.

    Returns:
        A list of two parameter-group dicts (``"name"`` is ``"means"`` or ``"rho"``), to pass
        to any ``torch.optim`` optimizer.

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Linear(4, 2))
        >>> groups = dnn2bnn.bayes_param_groups(bnn, lr=1e-3)
        >>> optimizer = torch.optim.Adam(groups)
        >>> [(g["name"], g["lr"], len(g["params"])) for g in optimizer.param_groups]
        [('means', 0.001, 2), ('rho', 0.01, 2)]
        >>> adamw = torch.optim.AdamW(dnn2bnn.bayes_param_groups(bnn, lr=1e-3))
        >>> [g["weight_decay"] for g in adamw.param_groups]
        [0.01, 0.0]
    """
    lr = _check_rate("lr", lr)
    rho_lr = DEFAULT_RHO_LR_FACTOR * lr if rho_lr is None else _check_rate("rho_lr", rho_lr)
    for key in ("params", "lr", "name"):
        if key in group_options:
            raise TypeError(
                f"bayes_param_groups: {key!r} is set by the function, not by a group option"
            )
    rho_ids: set[int] = set()
    for module in model.modules():
        if is_bayesian_layer(module):
            for name, param in module.named_parameters(recurse=False):
                if name.endswith("_rho"):
                    rho_ids.add(id(param))
    if not rho_ids:
        raise ValueError(
            f"bayes_param_groups: {type(model).__name__} has no Bayesian layer with *_rho "
            "parameters; convert it with dnn2bnn.transform_to_bnn_model first"
        )
    means, rhos = [], []
    for param in model.parameters():  # unique parameters, in registration order
        if param.requires_grad:
            (rhos if id(param) in rho_ids else means).append(param)
    return [
        {"params": means, "lr": lr, "name": "means", **group_options},
        {"params": rhos, "lr": rho_lr, "name": "rho", **group_options, "weight_decay": 0.0},
    ]


def _check_rate(name: str, value: float) -> float:
    try:
        rate = _real(name, value)  # Python, numpy and 0-d tensor reals; not bools
    except TypeError as exc:
        raise TypeError(f"bayes_param_groups: {exc}") from None
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"bayes_param_groups: {name} must be finite and > 0, got {value!r}")
    return rate
