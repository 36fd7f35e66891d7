"""Bayesian convolutions and transposed convolutions (1d, 2d, 3d).

Thin subclasses sharing :class:`BayesianLayer`: every constructor argument, the argument
checks and ``forward`` (including ``output_size`` of the transposed ones) are torch.nn's.
"""

from __future__ import annotations

from torch import nn

from dnn2bnn.layers._base import BayesianLayer

__all__ = [
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesConvTranspose1d",
    "BayesConvTranspose2d",
    "BayesConvTranspose3d",
    "ConvReparam",
]

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


_TRANSPOSED_DOC = """``nn.{name}`` with a factorized Gaussian posterior over weight and bias.

    Takes exactly the arguments and defaults of :class:`torch.nn.{name}` (stride, padding,
    output_padding, groups, bias, dilation, padding_mode, device, dtype), plus the
    keyword-only Bayesian options ``prior_mean``, ``prior_sigma`` and
    ``posterior_sigma_init``. ``forward(input, output_size=None)`` is torch.nn's.

    Example:
        >>> deconv = Bayes{name}(1, 4, 3, stride=2, output_padding=1)
        >>> deconv(torch.ones({shape})).shape
        torch.Size({out})
    """


class BayesConvTranspose1d(BayesianLayer, nn.ConvTranspose1d):
    __doc__ = _TRANSPOSED_DOC.format(name="ConvTranspose1d", shape="2, 1, 8", out="[2, 4, 18]")
    dnn_type = nn.ConvTranspose1d


class BayesConvTranspose2d(BayesianLayer, nn.ConvTranspose2d):
    __doc__ = _TRANSPOSED_DOC.format(
        name="ConvTranspose2d", shape="2, 1, 8, 8", out="[2, 4, 18, 18]"
    )
    dnn_type = nn.ConvTranspose2d


class BayesConvTranspose3d(BayesianLayer, nn.ConvTranspose3d):
    __doc__ = _TRANSPOSED_DOC.format(
        name="ConvTranspose3d", shape="1, 1, 2, 2, 2", out="[1, 4, 6, 6, 6]"
    )
    dnn_type = nn.ConvTranspose3d


#: MindSpore-compatible name of :class:`BayesConv2d`.
ConvReparam = BayesConv2d
