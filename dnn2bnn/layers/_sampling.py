"""Weight sampling and the closed-form KL with hand-written gradients.

Autograd through ``mu + softplus(rho) * eps`` keeps ``rho``, ``sigma`` and ``eps`` alive and
computes softplus again for the KL. Here:

* ``sigma = softplus(rho)`` is computed once per optimizer step and cached (detached, keyed
  by the version counter of ``rho``, so any in-place update or ``load_state_dict``
  invalidates it); repeated Monte Carlo passes in inference never recompute it.
* :class:`GaussianSample` returns ``mu + sigma * eps`` and saves only ``eps`` (and ``rho``,
  which is a parameter anyway); backward is ``grad_mu = g``,
  ``grad_rho = g * eps * sigmoid(rho)``.
* :class:`NormalKL` returns the summed closed-form KL with reductions (dot products) instead
  of elementwise temporaries, and its gradient in closed form.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GaussianSample", "NormalKL", "cached_sigma", "sample"]


def cached_sigma(cache: dict[str, tuple[int, int, Tensor]], name: str, rho: Tensor) -> Tensor:
    """``softplus(rho)``, detached, recomputed only when ``rho`` changed since the last call."""
    key = (rho._version, rho.data_ptr())
    entry = cache.get(name)
    if entry is not None and entry[:2] == key and entry[2].shape == rho.shape:
        return entry[2]
    with torch.no_grad():
        sigma = F.softplus(rho)
    cache[name] = (*key, sigma)
    return sigma


class GaussianSample(torch.autograd.Function):
    """``mu + sigma * eps`` with ``eps ~ N(0, 1)``; ``sigma = softplus(rho)`` precomputed.

    Returns ``(sample, eps)``; ``eps`` is not differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(mu: Tensor, rho: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        eps = torch.randn_like(mu)
        return torch.addcmul(mu, sigma, eps), eps

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
        _, rho, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(rho, output[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        rho, eps = ctx.saved_tensors
        grad_rho = None
        if ctx.needs_input_grad[1]:
            grad_rho = torch.sigmoid(rho).mul_(eps).mul_(grad)
        return (grad if ctx.needs_input_grad[0] else None), grad_rho, None


def sample(mu: Tensor, rho: Tensor, sigma: Tensor) -> Tensor:
    """One reparameterized sample; the cheapest path when no gradient is needed."""
    if torch.is_grad_enabled() and (mu.requires_grad or rho.requires_grad):
        return GaussianSample.apply(mu, rho, sigma)[0]
    return torch.randn_like(mu).mul_(sigma).add_(mu)


class NormalKL(torch.autograd.Function):
    """Summed ``KL(N(mu, softplus(rho)^2) || N(prior_mu, prior_sigma^2))``, scalar prior sigma.

    Computed in float32 or wider. Gradients: ``(mu - prior_mu) / prior_sigma^2`` and
    ``(sigma / prior_sigma^2 - 1 / sigma) * sigmoid(rho)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, mu: Tensor, rho: Tensor, sigma: Tensor, prior_mu: Tensor, prior_sigma: Tensor
    ) -> Tensor:
        dtype = torch.promote_types(mu.dtype, torch.float32)
        m, s = mu.to(dtype).flatten(), sigma.to(dtype).flatten()
        pm, ps = prior_mu.to(dtype), prior_sigma.to(dtype)
        n = m.numel()
        if pm.numel() == 1:  # sum((m - pm)^2) without a temporary
            squares = torch.dot(m, m) - 2 * pm.reshape(()) * m.sum() + n * pm.reshape(()) ** 2
        else:
            diff = m - pm.flatten()
            squares = torch.dot(diff, diff)
        inv_var = 1.0 / (ps * ps)
        kl = 0.5 * inv_var * (torch.dot(s, s) + squares)
        kl = kl - torch.log(s).sum() + n * (torch.log(ps) - 0.5)
        ctx.save_for_backward(mu, rho, sigma, prior_mu, prior_sigma)
        return kl

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        mu, rho, sigma, prior_mu, prior_sigma = ctx.saved_tensors
        inv_var = (grad / (prior_sigma * prior_sigma)).to(mu.dtype)
        grad_mu = grad_rho = None
        if ctx.needs_input_grad[0]:
            grad_mu = (mu - prior_mu).mul_(inv_var)
        if ctx.needs_input_grad[1]:
            grad_rho = (sigma * inv_var).sub_(sigma.reciprocal().mul_(grad.to(mu.dtype)))
            grad_rho.mul_(torch.sigmoid(rho))
        return grad_mu, grad_rho, None, None, None
