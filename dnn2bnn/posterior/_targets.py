"""Find the Bayesian parameters of a converted model, and write a fitted posterior into them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dnn2bnn.layers._base import BayesianLayer, BayesMode
from dnn2bnn.priors import NormalPrior

__all__ = ["BayesTarget", "at_means", "find_targets", "set_posterior_"]


@dataclass(frozen=True)
class BayesTarget:
    """One Bayesian parameter: its layer, the layer's qualified name, the parameter name."""

    layer: BayesianLayer
    layer_name: str
    name: str

    @property
    def key(self) -> str:
        """The qualified name of its posterior mean, as ``functional_call`` expects it."""
        prefix = f"{self.layer_name}." if self.layer_name else ""
        return f"{prefix}{self.name}_mu"

    @property
    def mu(self) -> Tensor:
        return self.layer._parameters[self.name + "_mu"]  # type: ignore[return-value]


def find_targets(model: nn.Module) -> dict[str, list[BayesTarget]]:
    """The Bayesian parameters of ``model`` grouped by layer (qualified name -> targets).

    Raises ``ValueError`` when there is none and ``TypeError`` naming a layer whose prior is
    not a :class:`~dnn2bnn.NormalPrior` (the Laplace posterior pairs with a Gaussian prior).
    """
    groups: dict[str, list[BayesTarget]] = {}
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, BayesianLayer):
            continue
        if not isinstance(layer.prior, NormalPrior):
            raise TypeError(
                f"fit_posterior: layer {layer_name or '<root>'!r} ({type(layer).__name__}) has "
                f"prior {layer.prior}; expected a dnn2bnn.NormalPrior (convert with the default "
                "prior or prior=NormalPrior(...)): the fitted prior is N(0, 1/lambda)"
            )
        targets = [
            BayesTarget(layer, layer_name, name)
            for name in layer.bayes_params
            if layer._parameters.get(name + "_mu") is not None
        ]
        if targets:
            groups[layer_name] = targets
    if not groups:
        raise ValueError(
            f"fit_posterior: expected a model with Bayesian layers (from "
            f"dnn2bnn.transform_to_bnn_model), found none in {type(model).__name__}"
        )
    return groups


def rho_for(layer: BayesianLayer, name: str, sigma: Tensor) -> Tensor:
    """``rho`` giving ``sigma`` under the layer's parametrization.

    A layer that defines ``rho_from_sigma(name, sigma)`` is asked; otherwise ``sigma =
    exp(rho)`` (``parametrization="exp"``) or ``sigma = softplus(rho)`` is inverted (stably
    for small sigma), in float64.
    """
    helper = getattr(layer, "rho_from_sigma", None)
    if callable(helper):
        return helper(name, sigma)
    sigma = sigma.double()
    if getattr(layer, "_exp", False):
        return torch.log(sigma)
    return sigma + torch.log(-torch.expm1(-sigma))


def set_posterior_(
    target: BayesTarget, sigma: Tensor, prior_precision: float
) -> None:
    """Write ``sigma`` into the target's ``rho`` and ``N(0, 1/prior_precision)`` as its prior."""
    layer, name = target.layer, target.name
    rho: Tensor = layer._parameters[name + "_rho"]  # type: ignore[assignment]
    prior_sigma = 1.0 / math.sqrt(prior_precision)
    with torch.no_grad():
        rho.copy_(rho_for(layer, name, sigma).to(rho.dtype))
        layer._buffers[f"{name}_prior_mu"].fill_(0.0)  # type: ignore[union-attr]
        layer._buffers[f"{name}_prior_sigma"].fill_(prior_sigma)  # type: ignore[union-attr]
    layer.__dict__["prior"] = NormalPrior(0.0, prior_sigma)  # a label: the buffers are written above
    # the prior scalars are cached on the buffers' version counters, which fill_ bumped
    layer._scalar_cache.clear()


class at_means:  # noqa: N801 (used as a context manager)
    """Eval mode and "mean" mode for the duration; both restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.modes = [(m, m.bayes_mode) for m in self.model.modules() if hasattr(m, "bayes_mode")]
        self.model.eval()
        for m, _ in self.modes:
            m.bayes_mode = BayesMode.MEAN
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.flags:
            m.training = flag
        for m, mode in self.modes:
            m.bayes_mode = mode

