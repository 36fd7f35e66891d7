"""MindSpore-style entry point: ``TransformToBNN`` for users of ``mindspore.nn.probability``.

Unlike MindSpore's, it keeps the trained weights, copies instead of changing the user's
model, reaches layers inside containers, and rebuilds the optimizer with every
hyperparameter of every param group.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from dnn2bnn.conversion.transform import transform_to_bnn_layer, transform_to_bnn_model
from dnn2bnn.loss import WithBNNLoss

__all__ = ["TransformToBNN", "rebuild_optimizer"]


class TransformToBNN:
    """Convert a trainable network (a model, or a module holding ``backbone`` and ``loss_fn``).

    Args:
        trainable: a bare ``nn.Module``, or a module with ``backbone`` and ``loss_fn``
            attributes (the shape of MindSpore's ``WithLossCell``).
        dnn_factor: weight of the data loss in the resulting :class:`WithBNNLoss`.
        bnn_factor: weight of the KL term (``1 / num_train_examples`` for the ELBO).
        optimizer: an optimizer over the trainable's parameters. After a transform,
            :attr:`optimizer` is a new optimizer of the same class, with the same param
            groups and every hyperparameter of each group, over the Bayesian parameters
            (``weight`` becomes ``weight_mu`` and ``weight_rho`` in the same group). It is
            built from the class's constructor signature: only the defaults the
            constructor accepts are passed to it. The state of each parameter (momenta,
            step counts) moves to its new parameter (``weight``'s to ``weight_mu``);
            ``weight_rho`` starts with the state of a new parameter. ``LBFGS`` keeps one state for all
            parameters together, which is reset. An LR scheduler attached to the old
            optimizer keeps scheduling the old one: create it again on :attr:`optimizer`
            (that is warned when the scheduler is detectable).
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
            raise TypeError(
                f"optimizer must be a torch Optimizer, got {type(optimizer).__qualname__}"
            )
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
        groups, moves, decayed = [], [], []
        for group in old.param_groups:
            params, names = [], []
            for param in group["params"]:
                name = self._names[id(param)]
                if name in new_params:
                    targets = [(name, True)]
                else:
                    owner, _, attr = name.rpartition(".")
                    prefix = f"{owner}." if owner else ""
                    targets = [(f"{prefix}{attr}_mu", True), (f"{prefix}{attr}_rho", False)]
                    if any(n not in new_params for n, _ in targets):
                        raise ValueError(
                            f"optimizer parameter {name!r} has no counterpart in the BNN "
                            f"(expected {name!r} or {targets[0][0]!r} and {targets[1][0]!r})"
                        )
                for new_name, keeps_state in targets:
                    params.append(new_params[new_name])
                    names.append(new_name)
                    if keeps_state:
                        moves.append((param, new_params[new_name]))
            new_group = {k: v for k, v in group.items() if k != "params"}
            if "param_names" in group:  # built from named_parameters()
                new_group["param_names"] = names
            groups.append({**new_group, "params": params})
            if new_group.get("weight_decay"):
                decayed += [(n, float(new_group["weight_decay"])) for n in names if n.endswith("_rho")]
        if decayed:
            _warn_decayed_rho(type(old).__name__, decayed)
        new = rebuild_optimizer(old, groups)
        if not isinstance(old, torch.optim.LBFGS):  # its one state is for all params at once
            for old_param, new_param in moves:
                if old_param in old.state and old_param.shape == new_param.shape:
                    new.state[new_param] = _copy_state(old.state[old_param])
        if getattr(old.step, "_wrapped_by_lr_sched", False):
            warnings.warn(
                f"TransformToBNN: an LR scheduler is attached to the original "
                f"{type(old).__name__} and keeps scheduling it, not TransformToBNN.optimizer; "
                "create the scheduler again on the new optimizer (its param groups keep "
                "'initial_lr', so pass last_epoch=scheduler.last_epoch to resume)",
                stacklevel=4,  # the user's transform_to_bnn_* call
            )
        return new


def rebuild_optimizer(
    old: torch.optim.Optimizer, groups: list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """A new optimizer of ``old``'s class over ``groups``, with ``old``'s defaults.

    Only the defaults the class's constructor accepts are passed (``AdamW`` records
    ``decoupled_weight_decay`` in its defaults but does not take it); every other
    hyperparameter travels in the param groups.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> old = torch.optim.AdamW([w], lr=0.01, weight_decay=0.5)
        >>> new = rebuild_optimizer(old, [{"params": [torch.nn.Parameter(torch.ones(2))]}])
        >>> type(new).__name__, new.param_groups[0]["lr"], new.param_groups[0]["weight_decay"]
        ('AdamW', 0.01, 0.5)
    """
    cls = type(old)
    signature = inspect.signature(cls)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    defaults = {
        k: v
        for k, v in old.defaults.items()
        if k != "params" and (takes_any or k in signature.parameters)
    }
    try:
        return cls(groups, **defaults)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"rebuilding {cls.__qualname__} over the Bayesian parameters failed ({exc}); build "
            "the optimizer yourself over transform.bnn.parameters() (or "
            "dnn2bnn.bayes_param_groups)"
        ) from exc


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in state.items()}


def _warn_decayed_rho(optimizer: str, decayed: list[tuple[str, float]]) -> None:
    """Warn that weight decay reaches ``*_rho`` (it pulls every sigma towards 1 at each step)."""
    names = [name for name, _ in decayed]
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
    warnings.warn(
        f"TransformToBNN: the rebuilt {optimizer} keeps each weight's rho in its original param "
        f"group, so weight_decay={max(d for _, d in decayed):g} applies to {shown}, pulling every "
        "sigma towards exp(0) = 1 (softplus: log 2) at each step whatever the data say; give the "
        "original optimizer weight_decay=0, or build the BNN's optimizer from "
        "dnn2bnn.bayes_param_groups(bnn, lr=..., weight_decay=...) (its rho group never decays)",
        stacklevel=5,  # the user's transform_to_bnn_* call
    )
