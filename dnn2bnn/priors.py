"""Priors over the weights of Bayesian layers, declared as typed data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NormalPrior", "kl_normal"]


@dataclass(frozen=True)
class NormalPrior:
    """An isotropic Gaussian prior ``N(mean, sigma^2)`` on every weight and bias.

    Args:
        mean: prior mean of every weight.
        sigma: prior standard deviation, a finite number > 0.

    Example:
        >>> NormalPrior(0.0, 0.1)
        NormalPrior(mean=0.0, sigma=0.1)
    """

    mean: float = 0.0
    sigma: float = 1.0

    def __post_init__(self) -> None:
        _check_finite("NormalPrior.mean", self.mean)
        _check_positive("NormalPrior.sigma", self.sigma)


def kl_normal(mu: Tensor, sigma: Tensor, prior_mu: Tensor, prior_sigma: Tensor) -> Tensor:
    """Closed-form ``KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2))``, summed over all elements.

    This is the direction of the ELBO (posterior first). The sum is taken in float32 (or
    float64 when the inputs are float64) so half-precision parameters do not underflow.
    """
    dtype = torch.promote_types(mu.dtype, torch.float32)
    mu, sigma = mu.to(dtype), sigma.to(dtype)
    prior_mu, prior_sigma = prior_mu.to(dtype), prior_sigma.to(dtype)
    ratio = (sigma / prior_sigma) ** 2
    kl = 0.5 * (ratio + ((mu - prior_mu) / prior_sigma) ** 2 - 1.0 - torch.log(ratio))
    return kl.sum()


def _check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    _check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
