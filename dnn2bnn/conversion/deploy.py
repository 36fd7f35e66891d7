"""``to_dnn``: a plain deterministic network from a Bayesian one, for deployment."""

from __future__ import annotations

import copy
from enum import Enum

import torch
from torch import nn

from dnn2bnn.layers._base import BayesianLayer, is_bayesian_layer

__all__ = ["to_dnn"]


class _Mode(str, Enum):
    MEAN = "mean"
    SAMPLE = "sample"


def to_dnn(model: nn.Module, mode: str = "mean") -> nn.Module:
    """A deterministic copy of ``model`` with every Bayesian layer made plain again.

    ``mode="mean"`` keeps the posterior means: the result computes exactly what ``model``
    computes in "mean" mode (:func:`dnn2bnn.set_mode`), with plain ``nn.Linear``/``nn.Conv*``
    layers (or your subclasses of them) and no dnn2bnn hooks, ready to export.
    ``mode="sample"`` draws one network from the posterior (``mu + sigma(rho) * eps``
    for every weight and bias), e.g. to build a deep ensemble from ``S`` draws. ``model``
    itself is not modified; a layer used at several places stays one shared module.

    Args:
        model: a network with Bayesian layers (a single Bayesian layer works too).
        mode: ``"mean"`` or ``"sample"``.

    Raises:
        TypeError: for ``mode="sample"`` when a user-written Bayesian layer (one that
            does not derive from :class:`dnn2bnn.BayesianLayer`) cannot be sampled.

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> dnn = dnn2bnn.to_dnn(bnn)
        >>> type(dnn[0]).__name__
        'Linear'
        >>> with dnn2bnn.set_mode(bnn, "mean"):
        ...     torch.equal(dnn(torch.ones(1, 3)), bnn(torch.ones(1, 3)))
        True
    """
    try:
        chosen = _Mode(mode)
    except ValueError as exc:
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}") from exc
    if is_bayesian_layer(model):
        return _plain(model, chosen, type(model).__name__)
    result = copy.deepcopy(model)
    _remove_sample_hooks(result)
    memo: dict[int, nn.Module] = {}
    for parent_name, parent in list(result.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            if child is None or not is_bayesian_layer(child):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) not in memo:
                memo[id(child)] = _plain(child, chosen, name)
            parent._modules[child_name] = memo[id(child)]
    result.__dict__.pop("conversion_report", None)
    return result


def _plain(layer: nn.Module, mode: _Mode, name: str) -> nn.Module:
    to_dnn_method = getattr(layer, "to_dnn", None)
    if not callable(to_dnn_method):
        raise TypeError(f"{name} ({type(layer).__qualname__}) is a Bayesian layer without to_dnn()")
    plain = to_dnn_method()
    if mode is _Mode.MEAN:
        return plain
    if not isinstance(layer, BayesianLayer):
        raise TypeError(
            f"to_dnn(mode='sample') samples layers derived from dnn2bnn.BayesianLayer; {name} "
            f"is a {type(layer).__qualname__}"
        )
    with torch.no_grad():
        for param in layer.bayes_params:
            mu = layer._parameters[param + "_mu"]
            if mu is None:
                continue
            sigma = layer.posterior_sigma(param)  # float32+: no underflow in half precision
            getattr(plain, param).copy_(mu + sigma * torch.randn_like(sigma))
    return plain


def _remove_sample_hooks(model: nn.Module) -> None:
    """Drop the forward hooks that conversion installs for one-sample-per-call sharing."""
    from dnn2bnn.conversion._sharing import _close_sample_scope, _open_sample_scope
    from dnn2bnn.layers._batched import _draw_all, _drop_all

    for module in model.modules():
        pairs = (
            (module._forward_pre_hooks, _open_sample_scope),
            (module._forward_hooks, _close_sample_scope),
            (module._forward_pre_hooks, _draw_all),
            (module._forward_hooks, _drop_all),
        )
        for hooks, hook in pairs:
            for key in [k for k, h in hooks.items() if h is hook]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
