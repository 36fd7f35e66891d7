"""Bayesian fully connected layer."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dnn2bnn.layers._base import BayesianLayer

__all__ = ["BayesLinear", "DenseReparam"]


class BayesLinear(BayesianLayer, nn.Linear):
    """``nn.Linear`` with a factorized Gaussian posterior over weight and bias.

    Takes exactly the arguments of :class:`torch.nn.Linear` (``in_features``,
    ``out_features``, ``bias``, ``device``, ``dtype``), plus the keyword-only Bayesian options
    ``config`` (a :class:`~dnn2bnn.BayesConfig`) and its shortcuts ``prior``, ``prior_mean``,
    ``prior_sigma``, ``posterior_sigma_init``, ``moped_delta``, ``estimator``. Each forward
    call draws fresh weights with the configured estimator (default ``"reparam"``: one
    weight sample per call, Blundell et al. 2015) unless the layer is in "mean" mode
    (:func:`dnn2bnn.set_mode`).

    Example:
        >>> layer = BayesLinear(3, 2, prior_sigma=0.1)
        >>> layer(torch.ones(5, 3)).shape
        torch.Size([5, 2])
    """

    dnn_type = nn.Linear

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(input, weight, bias)

    def _sign_shapes(self, input: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(input.shape), (*input.shape[:-1], self.out_features)


DenseReparam = BayesLinear
"""MindSpore-compatible name of :class:`BayesLinear` (the same class)."""
