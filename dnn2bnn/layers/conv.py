"""Bayesian convolutions (1d, 2d, 3d): thin subclasses sharing :class:`BayesianLayer`."""

from __future__ import annotations

from torch import Tensor, nn

from dnn2bnn.layers._base import BayesianLayer

__all__ = ["BayesConv1d", "BayesConv2d", "BayesConv3d", "ConvReparam"]

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


ConvReparam = BayesConv2d
"""MindSpore-compatible name of :class:`BayesConv2d` (the same class)."""
