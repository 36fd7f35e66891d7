"""Flipout and local reparameterization, written once for every layer type.

Each built-in Bayesian layer provides ``_op(input, weight, bias)`` (``F.linear`` or its
convolution) and ``_sign_shapes(input)``. Because ``_op`` is linear in the weight, with
independent Gaussian weights ``N(mu, sigma^2)`` every output element is Gaussian with mean
``op(x, mu, b_mu)`` and variance ``op(x^2, sigma^2, b_sigma^2)``:

* local reparameterization (Kingma et al. 2015) samples that Gaussian directly, a fresh
  draw per output element, and forms no weight sample;
* flipout (Wen et al. 2018) draws one weight perturbation ``dW = sigma * eps`` per call and
  decorrelates the examples with random signs: ``op(x, mu, b) + op(x * s_in, dW) * s_out``.
  Each example sees a weight with the exact posterior distribution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from dnn2bnn.layers._base import BayesianLayer

__all__ = ["flipout", "local_reparam", "random_signs"]


def random_signs(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A tensor of independent random ``+1``/``-1`` of ``shape``, dtype and device of ``like``."""
    signs = torch.randint(0, 2, shape, dtype=like.dtype, device=like.device)
    return signs.mul_(2.0).sub_(1.0)


def flipout(layer: BayesianLayer, input: Tensor) -> Tensor:
    """One flipout forward pass of ``layer`` (in "sample" mode)."""
    mu = layer.weight_mu
    cache = layer._sample_cache
    delta = None if cache is None else cache.get("weight_delta")
    if delta is None:
        delta = layer.posterior_sigma("weight").to(mu.dtype) * torch.randn_like(mu)
        if cache is not None:
            cache["weight_delta"] = delta
        if layer.prior.needs_sample:
            layer._keep_for_kl("weight", mu + delta)
    bias = layer._draw("bias")
    in_shape, out_shape = layer._sign_shapes(input)
    signs_in = random_signs(in_shape, input)
    signs_out = random_signs(out_shape, input)
    mean = layer._op(input, mu, bias)
    return mean + layer._op(input * signs_in, delta, None) * signs_out


def local_reparam(layer: BayesianLayer, input: Tensor) -> Tensor:
    """One local-reparameterization forward pass of ``layer`` (in "sample" mode)."""
    bias_mu = layer.bias_mu
    bias_var = None if bias_mu is None else layer.posterior_sigma("bias").to(bias_mu.dtype) ** 2
    mean = layer._op(input, layer.weight_mu, bias_mu)
    weight_var = layer.posterior_sigma("weight").to(layer.weight_mu.dtype) ** 2
    var = layer._op(input * input, weight_var, bias_var)
    # clamp: an all-zero input patch without bias has variance 0, where sqrt has no gradient
    return mean + var.clamp_min(1e-20).sqrt() * torch.randn_like(mean)
