"""Bayesian fully connected layer."""

from __future__ import annotations

from torch import nn

from dnn2bnn.layers._base import BayesianLayer

__all__ = ["BayesLinear", "DenseReparam"]


class BayesLinear(BayesianLayer, nn.Linear):
    """``nn.Linear`` with a factorized Gaussian posterior over weight and bias.

    Takes exactly the arguments of :class:`torch.nn.Linear` (``in_features``,
    ``out_features``, ``bias``, ``device``, ``dtype``), plus the keyword-only Bayesian options
    ``prior_mean``, ``prior_sigma`` and ``posterior_sigma_init``. Each forward call draws a
    fresh weight sample (reparameterization trick, Blundell et al. 2015) unless the layer is
    in "mean" mode (:func:`dnn2bnn.set_mode`).

    Example:
        >>> layer = BayesLinear(3, 2, prior_sigma=0.1)
        >>> layer(torch.ones(5, 3)).shape
        torch.Size([5, 2])
    """

    dnn_type = nn.Linear


DenseReparam = BayesLinear
"""MindSpore-compatible name of :class:`BayesLinear` (the same class)."""
