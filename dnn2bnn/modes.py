"""Switching Bayesian layers between sampling and posterior-mean inference."""

from __future__ import annotations

import warnings
from types import TracebackType

from torch import nn

from dnn2bnn.config import Estimator, enum_value
from dnn2bnn.layers._base import BayesianLayer, BayesMode

__all__ = ["get_mode", "set_estimator", "set_mode"]


class _ModeSwitch:
    """Returned by :func:`set_mode`; as a context manager it restores the previous modes."""

    def __init__(self, model: nn.Module, mode: BayesMode) -> None:
        self.model = model
        self.mode = mode
        self._previous = [(m, m.bayes_mode) for m in _layers_with_mode(model)]
        if not self._previous:
            warnings.warn(
                f"set_mode: {type(model).__name__} has no Bayesian layer; nothing to switch",
                stacklevel=3,
            )
        for layer, _ in self._previous:
            layer.bayes_mode = mode

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for layer, previous in self._previous:
            layer.bayes_mode = previous

    def __repr__(self) -> str:
        return f"set_mode({type(self.model).__name__}, {self.mode.value!r})"


def _layers_with_mode(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "bayes_mode", None), str)]


def set_mode(model: nn.Module, mode: BayesMode | str) -> _ModeSwitch:
    """Switch every Bayesian layer of ``model`` to ``"sample"`` or ``"mean"``.

    In "sample" mode (the default) every forward call draws fresh weights; in "mean" mode
    the layers use their posterior means and the model is deterministic. The switch happens
    at once; used as a context manager it also restores each layer's previous mode on exit.
    This is independent of ``model.train()``/``model.eval()``.

    Args:
        model: any module; its Bayesian layers are found recursively.
        mode: ``"sample"`` or ``"mean"`` (or a :class:`BayesMode`).

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Linear(3, 2))
        >>> with dnn2bnn.set_mode(bnn, "mean"):
        ...     y = bnn(torch.ones(1, 3))  # deterministic
    """
    return _ModeSwitch(model, enum_value(BayesMode, mode, "mode"))


def get_mode(model: nn.Module) -> BayesMode | None:
    """The common mode of the model's Bayesian layers; ``None`` if none or if they differ."""
    modes = {BayesMode(m.bayes_mode) for m in _layers_with_mode(model)}
    return modes.pop() if len(modes) == 1 else None


def set_estimator(model: nn.Module, estimator: Estimator | str) -> None:
    """Switch the estimator of every built-in Bayesian layer of ``model``, in place.

    All estimators share parameters and KL, so a model trained with one can be evaluated
    with another. Layers that cannot run ``estimator`` (user subclasses with their own
    ``forward``) keep ``"reparam"``; that is warned, naming them. So do shared layers (used
    more than once per call of the model, listed in the conversion report's ``shared``):
    ``"flipout"`` and ``"lrt"`` draw fresh noise at every use, and a shared layer promises
    one weight sample per call; that is warned too, naming them.

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Linear(3, 2))
        >>> dnn2bnn.set_estimator(bnn, "lrt")
        >>> bnn.estimator.value
        'lrt'
    """
    estimator = enum_value(Estimator, estimator, "estimator")
    refused, shared = [], []
    for name, layer in model.named_modules():
        if not isinstance(layer, BayesianLayer):
            continue
        if estimator is not Estimator.REPARAM and not layer.supports_estimators:
            refused.append(name or "<root>")
            continue
        if estimator is not Estimator.REPARAM and layer._share_samples:
            shared.append(name or "<root>")
            layer.estimator = Estimator.REPARAM
            continue
        layer.estimator = estimator
    if refused:
        warnings.warn(
            f"set_estimator: {refused} have their own forward and keep 'reparam'", stacklevel=2
        )
    if shared:
        warnings.warn(
            f"set_estimator: {shared} are used more than once per call (shared) and keep "
            f"'reparam': {estimator.value!r} would draw independent noise at each use, "
            "breaking one weight sample per call",
            stacklevel=2,
        )
