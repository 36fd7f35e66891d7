"""MindSpore-style entry point: ``TransformToBNN`` for users of ``mindspore.nn.probability``.

Unlike MindSpore's, it keeps the trained weights, copies instead of changing the user's
model, reaches layers inside containers, and rebuilds the optimizer with every
hyperparameter of every param group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dnn2bnn.conversion.transform import transform_to_bnn_layer, transform_to_bnn_model
from dnn2bnn.loss import WithBNNLoss

__all__ = ["TransformToBNN"]


class TransformToBNN:
    """Convert a trainable network (a model, or a module holding ``backbone`` and ``loss_fn``).

    Args:
        trainable: a bare ``nn.Module``, or a module with ``backbone`` and ``loss_fn``
            attributes (the shape of MindSpore's ``WithLossCell``).
        dnn_factor: weight of the data loss in the resulting :class:`WithBNNLoss`.
        bnn_factor: weight of the KL term (``1 / num_train_examples`` for the ELBO).
        optimizer: an optimizer over the trainable's parameters. After a transform,
            :attr:`optimizer` is a new optimizer of the same class, with the same param
            groups and hyperparameters, over the Bayesian parameters (``weight`` becomes
            ``weight_mu`` and ``weight_rho``). Optimizer state (e.g. momenta) is not carried.
        **bayes_options: options of the Bayesian layers (``prior_sigma``, ...).

    Attributes:
        bnn: the last result (``None`` before the first transform).
        optimizer: the rebuilt optimizer (``None`` without one).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> t = TransformToBNN(net, optimizer=sgd)
        >>> bnn = t.transform_to_bnn_model()
        >>> t.optimizer.param_groups[0]["momentum"], len(t.optimizer.param_groups[0]["params"])
        (0.9, 4)
    """

    def __init__(
        self,
        trainable: nn.Module,
        dnn_factor: float = 1,
        bnn_factor: float = 1,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        **bayes_options: Any,
    ) -> None:
        if not isinstance(trainable, nn.Module):
            raise TypeError(f"trainable must be an nn.Module, got {type(trainable).__qualname__}")
        if hasattr(trainable, "backbone") and hasattr(trainable, "loss_fn"):
            self._backbone: nn.Module = trainable.backbone
            self._loss_fn = trainable.loss_fn
        else:
            self._backbone, self._loss_fn = trainable, None
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch Optimizer, got {type(optimizer).__qualname__}")
        self._dnn_factor, self._bnn_factor = dnn_factor, bnn_factor
        self._options = bayes_options
        self._dnn_optimizer = optimizer
        self._names = {}
        for name, param in self._backbone.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(param), name)
        if optimizer is not None:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) not in self._names:
                        raise ValueError(
                            f"the optimizer holds a parameter of shape {tuple(param.shape)} that "
                            "is not in the trainable network"
                        )
        self._current = self._backbone
        self.bnn: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def transform_to_bnn_model(self) -> nn.Module:
        """Convert every Linear/Conv layer; returns the BNN (wrapped in WithBNNLoss with a loss)."""
        return self._finish(transform_to_bnn_model(self._current, **self._options))

    def transform_to_bnn_layer(
        self, dnn_layer_type: type[nn.Module], bnn_layer_type: type[nn.Module] | None = None
    ) -> nn.Module:
        """Convert one layer type; successive calls accumulate on the same BNN."""
        return self._finish(
            transform_to_bnn_layer(self._current, dnn_layer_type, bnn_layer_type, **self._options)
        )

    def _finish(self, backbone: nn.Module) -> nn.Module:
        self._current = backbone
        if self._dnn_optimizer is not None:
            self.optimizer = self._rebuild_optimizer(backbone)
        if self._loss_fn is None:
            self.bnn = backbone
        else:
            self.bnn = WithBNNLoss(backbone, self._loss_fn, self._dnn_factor, self._bnn_factor)
        return self.bnn

    def _rebuild_optimizer(self, backbone: nn.Module) -> torch.optim.Optimizer:
        old = self._dnn_optimizer
        assert old is not None
        new_params = dict(backbone.named_parameters())
        groups = []
        for group in old.param_groups:
            params = []
            for param in group["params"]:
                name = self._names[id(param)]
                if name in new_params:
                    params.append(new_params[name])
                    continue
                owner, _, attr = name.rpartition(".")
                prefix = f"{owner}." if owner else ""
                pair = [new_params.get(f"{prefix}{attr}_{s}") for s in ("mu", "rho")]
                if None in pair:
                    raise ValueError(f"optimizer parameter {name!r} has no counterpart in the BNN")
                params.extend(pair)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        return type(old)(groups, **old.defaults)
