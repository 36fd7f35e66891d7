"""Bayesian convolutions and transposed convolutions (1d, 2d, 3d).

Thin subclasses sharing :class:`BayesianLayer`: every constructor argument, the argument
checks and ``forward`` (including ``output_size`` of the transposed ones) are torch.nn's.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

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
    plus the keyword-only Bayesian options ``config`` and its shortcuts ``prior``,
    ``prior_mean``, ``prior_sigma``, ``posterior_sigma_init``, ``moped_delta``, ``estimator``.

    Example:
        >>> conv = Bayes{name}(1, 4, 3, padding="same")
        >>> conv(torch.ones({shape})).shape
        torch.Size({out})
    """


class _BayesConvNd(BayesianLayer):
    """What the Bayesian convolutions share: the explicit-weight op and flipout signs."""

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(input, weight, bias)  # type: ignore[attr-defined]

    def _sign_shapes(self, input: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        spatial = len(self.kernel_size)  # type: ignore[attr-defined]
        lead = tuple(input.shape[: -spatial - 1])
        ones = (1,) * spatial
        return (*lead, input.shape[-spatial - 1], *ones), (*lead, self.out_channels, *ones)  # type: ignore[attr-defined]


class BayesConv1d(_BayesConvNd, nn.Conv1d):
    __doc__ = _DOC.format(name="Conv1d", shape="2, 1, 8", out="[2, 4, 8]")
    dnn_type = nn.Conv1d


class BayesConv2d(_BayesConvNd, nn.Conv2d):
    __doc__ = _DOC.format(name="Conv2d", shape="2, 1, 8, 8", out="[2, 4, 8, 8]")
    dnn_type = nn.Conv2d


class BayesConv3d(_BayesConvNd, nn.Conv3d):
    __doc__ = _DOC.format(name="Conv3d", shape="2, 1, 4, 4, 4", out="[2, 4, 4, 4, 4]")
    dnn_type = nn.Conv3d


_TRANSPOSED_DOC = """``nn.{name}`` with a factorized Gaussian posterior over weight and bias.

    Takes exactly the arguments and defaults of :class:`torch.nn.{name}` (stride, padding,
    output_padding, groups, bias, dilation, padding_mode, device, dtype), plus the
    keyword-only Bayesian options ``config`` and its shortcuts ``prior``, ``prior_mean``,
    ``prior_sigma``, ``posterior_sigma_init``, ``moped_delta``, ``estimator``.
    ``forward(input, output_size=None)`` takes torch.nn's ``output_size`` with every estimator.

    Example:
        >>> deconv = Bayes{name}(1, 4, 3, stride=2, output_padding=1)
        >>> deconv(torch.ones({shape})).shape
        torch.Size({out})
    """


class _BayesConvTransposeNd(_BayesConvNd):
    """The transposed convolutions: ``output_size`` reaches every estimator."""

    _TRANSPOSED_OPS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
    _bayes_attrs = (*BayesianLayer._bayes_attrs, "_call_output_padding")

    # (attributes such as stride and kernel_size come from the torch.nn parent)
    def forward(  # type: ignore[override]
        self, input: Tensor, output_size: list[int] | None = None
    ) -> Tensor:
        if self._runs_reparam():
            return type(self).dnn_type.forward(self, input, output_size)
        me: Any = self
        kernel = me.kernel_size
        self._call_output_padding = me._output_padding(
            input, output_size, me.stride, me.padding, kernel, len(kernel), me.dilation
        )
        return super().forward(input)

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        me: Any = self
        op = self._TRANSPOSED_OPS[len(me.kernel_size)]
        padding = self.__dict__.get("_call_output_padding", me.output_padding)
        return op(input, weight, bias, me.stride, me.padding, padding, me.groups, me.dilation)


class BayesConvTranspose1d(_BayesConvTransposeNd, nn.ConvTranspose1d):
    __doc__ = _TRANSPOSED_DOC.format(name="ConvTranspose1d", shape="2, 1, 8", out="[2, 4, 18]")
    dnn_type = nn.ConvTranspose1d


class BayesConvTranspose2d(_BayesConvTransposeNd, nn.ConvTranspose2d):
    __doc__ = _TRANSPOSED_DOC.format(
        name="ConvTranspose2d", shape="2, 1, 8, 8", out="[2, 4, 18, 18]"
    )
    dnn_type = nn.ConvTranspose2d


class BayesConvTranspose3d(_BayesConvTransposeNd, nn.ConvTranspose3d):
    __doc__ = _TRANSPOSED_DOC.format(
        name="ConvTranspose3d", shape="1, 1, 2, 2, 2", out="[1, 4, 6, 6, 6]"
    )
    dnn_type = nn.ConvTranspose3d


ConvReparam = BayesConv2d
"""MindSpore-compatible name of :class:`BayesConv2d` (the same class)."""
