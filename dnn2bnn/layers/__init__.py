"""Bayesian layers: drop-in replacements of torch.nn layers with Gaussian weight posteriors."""

from dnn2bnn.layers._base import (
    DEFAULT_POSTERIOR_SIGMA_INIT,
    DEFAULT_PRIOR_MEAN,
    DEFAULT_PRIOR_SIGMA,
    BayesianLayer,
    BayesMode,
    bayesian_class,
    is_bayesian_layer,
)
from dnn2bnn.layers.conv import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    ConvReparam,
)
from dnn2bnn.layers._batched import install_batched_sampling
from dnn2bnn.layers.linear import BayesLinear, DenseReparam
from dnn2bnn.layers.params import BayesianParameters, BayesMultiheadAttention, parameter_converter

__all__ = [
    "DEFAULT_POSTERIOR_SIGMA_INIT",
    "DEFAULT_PRIOR_MEAN",
    "DEFAULT_PRIOR_SIGMA",
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesConvTranspose1d",
    "BayesConvTranspose2d",
    "BayesConvTranspose3d",
    "BayesLinear",
    "BayesMode",
    "BayesMultiheadAttention",
    "BayesianLayer",
    "BayesianParameters",
    "ConvReparam",
    "DenseReparam",
    "bayesian_class",
    "install_batched_sampling",
    "is_bayesian_layer",
    "parameter_converter",
]
