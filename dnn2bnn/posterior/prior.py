"""The prior precision of a diagonal Laplace posterior, by marginal likelihood.

With the summed curvature ``H`` (``N`` times the mean per-example GGN diagonal), a prior
``N(0, 1/lambda)`` and the posterior ``N(mu, 1/(H + lambda))``, the Laplace estimate of the
log evidence is, per group of ``P`` weights and up to terms that do not depend on lambda,

    ``-lambda/2 ||mu||^2 + P/2 log(lambda) - 1/2 sum_i log(H_i + lambda)``

plus the log-likelihood of the data at ``mu``. The groups (the Bayesian layers) separate,
so a per-layer lambda maximises each term on its own. The derivative
``-||mu||^2 + sum_i H_i / (lambda (H_i + lambda))`` decreases in lambda, so the maximum is
its unique root, found by bisection on ``log(lambda)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["evidence_term", "marglik_precision"]

#: Bounds of the bisection on lambda.
LAMBDA_RANGE = (1e-8, 1e8)


def _slope(lam: float, h: Tensor, sum_sq: float) -> float:
    return float((h / (lam * (h + lam))).sum()) - sum_sq


def marglik_precision(h: Tensor | list[Tensor], sum_sq: float) -> float:
    """The lambda that maximises the Laplace evidence of one group of weights.

    Args:
        h: the summed curvature of the group's weights (one or several tensors).
        sum_sq: ``||mu||^2`` of the group.

    Returns:
        The maximiser, clipped to :data:`LAMBDA_RANGE`.

    Example:
        >>> # one weight, curvature 1, mu^2 = 1: the root of 1/(lam (1 + lam)) = 1
        >>> round(marglik_precision(torch.tensor([1.0]), 1.0), 4)
        0.618
    """
    flat = _flat(h)
    lo, hi = math.log(LAMBDA_RANGE[0]), math.log(LAMBDA_RANGE[1])
    if _slope(math.exp(lo), flat, sum_sq) <= 0:
        return LAMBDA_RANGE[0]
    if _slope(math.exp(hi), flat, sum_sq) >= 0:
        return LAMBDA_RANGE[1]
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if _slope(math.exp(mid), flat, sum_sq) > 0:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def evidence_term(h: Tensor | list[Tensor], sum_sq: float, lam: float) -> float:
    """``-lambda/2 ||mu||^2 + P/2 log(lambda) - 1/2 sum_i log(H_i + lambda)`` of one group.

    Example:
        >>> round(evidence_term(torch.tensor([0.0]), 0.0, 2.0), 6)  # no data: prior = posterior
        0.0
    """
    flat = _flat(h)
    return (
        -0.5 * lam * sum_sq
        + 0.5 * flat.numel() * math.log(lam)
        - 0.5 * float(torch.log(flat + lam).sum())
    )


def _flat(h: Tensor | list[Tensor]) -> Tensor:
    parts = [h] if isinstance(h, Tensor) else list(h)
    return torch.cat([p.reshape(-1).double() for p in parts])
