"""Priors over the weights of Bayesian layers, declared as typed data.

A prior object says *which* prior a layer uses; its numbers are copied into buffers of the
layer (``weight_prior_mu``, ``weight_prior_sigma``, ... ), so they travel with the
``state_dict`` and a reloaded model computes the same KL. The KL itself is computed from
those buffers only:

* :class:`NormalPrior` and :class:`EmpiricalPrior` (a Normal centred on the trained
  weights): closed form.
* :class:`ScaleMixturePrior` (Blundell et al. 2015): no closed form; the KL is the single-
  sample Monte Carlo estimate ``log q(w) - log p(w)`` at the weight sample ``w`` used by the
  last forward pass (unbiased, with a pathwise gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["EmpiricalPrior", "NormalPrior", "Prior", "ScaleMixturePrior", "kl_normal"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class NormalPrior:
    """An isotropic Gaussian prior ``N(mean, sigma^2)`` on every weight and bias.

    Buffers: ``<param>_prior_mu`` and ``<param>_prior_sigma`` (scalars). KL: closed form.

    Args:
        mean: prior mean of every weight.
        sigma: prior standard deviation, a finite number > 0.

    Example:
        >>> NormalPrior(0.0, 0.1)
        NormalPrior(mean=0.0, sigma=0.1)
    """

    mean: float = 0.0
    sigma: float = 1.0
    #: Whether the KL needs the weight sample of the forward pass (Monte Carlo KL).
    needs_sample: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_finite("NormalPrior.mean", self.mean)
        _check_positive("NormalPrior.sigma", self.sigma)

    def make_buffers(self, trained: Tensor) -> dict[str, Tensor]:
        """The prior's numbers for one parameter, keyed by buffer suffix."""
        factory = {"device": trained.device, "dtype": trained.dtype}
        return {"mu": torch.tensor(self.mean, **factory), "sigma": torch.tensor(self.sigma, **factory)}

    def kl(
        self, mu: Tensor, sigma: Tensor, buffers: dict[str, Tensor], sample: Tensor | None
    ) -> Tensor:
        """``KL(N(mu, sigma^2) || prior)`` summed, from the prior's buffers."""
        return kl_normal(mu, sigma, buffers["mu"], buffers["sigma"])


@dataclass(frozen=True)
class EmpiricalPrior:
    """A weights-centred prior: ``N(w_trained, sigma^2)`` with ``w_trained`` the DNN's weights.

    The prior mean is a copy of the trained tensor, saved in the ``<param>_prior_mu`` buffer
    (full shape), so the KL pulls the posterior towards the deterministic solution rather
    than towards zero. Combine it with MOPED initialisation (``moped_delta``, Krishnan et
    al. 2020) to start the posterior at ``sigma = delta * |w|``. KL: closed form.

    Args:
        sigma: prior standard deviation around the trained weights, a finite number > 0.

    Example:
        >>> EmpiricalPrior(0.1)
        EmpiricalPrior(sigma=0.1)
    """

    sigma: float = 1.0
    needs_sample: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_positive("EmpiricalPrior.sigma", self.sigma)

    def make_buffers(self, trained: Tensor) -> dict[str, Tensor]:
        """The prior's numbers for one parameter, keyed by buffer suffix."""
        sigma = torch.tensor(self.sigma, device=trained.device, dtype=trained.dtype)
        return {"mu": trained.detach().clone(), "sigma": sigma}

    def kl(
        self, mu: Tensor, sigma: Tensor, buffers: dict[str, Tensor], sample: Tensor | None
    ) -> Tensor:
        """``KL(N(mu, sigma^2) || prior)`` summed, from the prior's buffers."""
        return kl_normal(mu, sigma, buffers["mu"], buffers["sigma"])


@dataclass(frozen=True)
class ScaleMixturePrior:
    """Scale mixture ``pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2)`` (Blundell et al. 2015).

    Buffers: ``<param>_prior_pi``, ``<param>_prior_sigma1``, ``<param>_prior_sigma2``.
    The KL has no closed form: :meth:`BayesianLayer.kl` returns the Monte Carlo estimate
    ``sum(log q(w) - log p(w))`` at the weight sample ``w`` of the layer's last forward
    pass (unbiased; gradients flow through ``w``). The layer keeps that sample only until
    ``kl()`` is called or the next forward replaces it; when there is none (``kl()`` before
    any forward, under ``torch.no_grad``, in "mean" mode or with the ``"lrt"`` estimator,
    which never forms a weight sample) ``kl()`` draws a fresh one.

    Args:
        pi: weight of the first component, in (0, 1].
        sigma1: standard deviation of the first (wide) component, > 0.
        sigma2: standard deviation of the second (narrow) component, > 0.

    Example:
        >>> ScaleMixturePrior(pi=0.25, sigma1=1.0, sigma2=0.01).pi
        0.25
    """

    pi: float = 0.5
    sigma1: float = 1.0
    sigma2: float = 0.0025
    needs_sample: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_finite("ScaleMixturePrior.pi", self.pi)
        if not 0.0 < self.pi <= 1.0:
            raise ValueError(f"ScaleMixturePrior.pi must be in (0, 1], got {self.pi!r}")
        _check_positive("ScaleMixturePrior.sigma1", self.sigma1)
        _check_positive("ScaleMixturePrior.sigma2", self.sigma2)

    def make_buffers(self, trained: Tensor) -> dict[str, Tensor]:
        """The prior's numbers for one parameter, keyed by buffer suffix."""
        factory = {"device": trained.device, "dtype": trained.dtype}
        return {
            "pi": torch.tensor(self.pi, **factory),
            "sigma1": torch.tensor(self.sigma1, **factory),
            "sigma2": torch.tensor(self.sigma2, **factory),
        }

    def kl(
        self, mu: Tensor, sigma: Tensor, buffers: dict[str, Tensor], sample: Tensor | None
    ) -> Tensor:
        """Single-sample Monte Carlo ``KL(q || prior)`` at ``sample``, summed."""
        if sample is None:
            raise ValueError("ScaleMixturePrior.kl needs a weight sample")
        dtype = torch.promote_types(mu.dtype, torch.float32)
        w, mu, sigma = sample.to(dtype), mu.to(dtype), sigma.to(dtype)
        log_q = -torch.log(sigma) - 0.5 * ((w - mu) / sigma) ** 2
        return (log_q - mixture_log_prob(w, buffers)).sum() - _LOG_SQRT_2PI * w.numel()


def mixture_log_prob(w: Tensor, buffers: dict[str, Tensor]) -> Tensor:
    """Elementwise ``log p(w)`` of the scale mixture held in ``buffers`` (pi, sigma1, sigma2)."""
    pi = buffers["pi"].to(w.dtype)
    s1, s2 = buffers["sigma1"].to(w.dtype), buffers["sigma2"].to(w.dtype)
    first = torch.log(pi) - torch.log(s1) - 0.5 * (w / s1) ** 2
    if float(pi) == 1.0:
        return first - _LOG_SQRT_2PI
    second = torch.log1p(-pi) - torch.log(s2) - 0.5 * (w / s2) ** 2
    return torch.logaddexp(first, second) - _LOG_SQRT_2PI


#: Any of the built-in priors.
Prior = NormalPrior | EmpiricalPrior | ScaleMixturePrior
PRIOR_TYPES = (NormalPrior, EmpiricalPrior, ScaleMixturePrior)


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
