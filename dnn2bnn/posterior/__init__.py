"""A posterior from the trained network's curvature: the diagonal Laplace approximation.

:func:`fit_posterior` sets every Bayesian parameter's sigma of a converted model from the
diagonal curvature of the loss at the trained weights (no training), and its prior to the
matching ``N(0, 1/lambda)``; see ``docs/posterior.md``.
"""

from dnn2bnn.posterior._independence import BatchMixingWarning
from dnn2bnn.posterior.curvature import Curvature, Likelihood, diagonal_curvature
from dnn2bnn.posterior.fit import DEFAULT_TEMPERATURES, PosteriorFit, fit_posterior
from dnn2bnn.posterior.linearized import linearized_samples
from dnn2bnn.posterior.prior import evidence_term, marglik_precision

__all__ = [
    "BatchMixingWarning",
    "DEFAULT_TEMPERATURES",
    "Curvature",
    "Likelihood",
    "PosteriorFit",
    "diagonal_curvature",
    "evidence_term",
    "fit_posterior",
    "linearized_samples",
    "marglik_precision",
]
