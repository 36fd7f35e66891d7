"""Bayesian convolutions (1d, 2d, 3d): thin subclasses sharing :class:`BayesianLayer`."""

from __future__ import annotations

from torch import nn

from dnn2bnn.layers._base import BayesianLayer

__all__ = ["BayesConv1d", "BayesConv2d", "BayesConv3d", "ConvReparam"]

_DOC = """``nn.{name}`` with a factorized Gaussian posterior over weight and bias.

    Takes exactly the arguments and defaults of :class:`torch.nn.{name}` (stride, padding
    including ``'same'``/``'valid'``, dilation, groups, bias, padding_mode, device, dtype),
    plus the keyword-only Bayesian options ``prior_mean``, ``prior_sigma`` and
    ``posterior_sigma_init``.

    Example:
        >>> conv = Bayes{name}(1, 4, 3, padding="same")
        >>> conv(torch.ones({shape})).shape
        torch.Size({out})
    """


class BayesConv1d(BayesianLayer, nn.Conv1d):
    __doc__ = _DOC.format(name="Conv1d", shape="2, 1, 8", out="[2, 4, 8]")
    dnn_type = nn.Conv1d


class BayesConv2d(BayesianLayer, nn.Conv2d):
    __doc__ = _DOC.format(name="Conv2d", shape="2, 1, 8, 8", out="[2, 4, 8, 8]")
    dnn_type = nn.Conv2d


class BayesConv3d(BayesianLayer, nn.Conv3d):
    __doc__ = _DOC.format(name="Conv3d", shape="2, 1, 4, 4, 4", out="[2, 4, 4, 4, 4]")
    dnn_type = nn.Conv3d


ConvReparam = BayesConv2d
"""MindSpore-compatible name of :class:`BayesConv2d` (the same class)."""
