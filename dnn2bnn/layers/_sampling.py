"""Weight sampling and the closed-form KL with hand-written gradients.

Autograd through ``mu + softplus(rho) * eps`` keeps ``rho``, ``sigma`` and ``eps`` alive and
computes softplus again for the KL. Here:

* ``sigma = softplus(rho)`` is computed once per optimizer step and cached (detached, keyed
  by the version counter of ``rho``, so any in-place update or ``load_state_dict``
  invalidates it); repeated Monte Carlo passes in inference never recompute it. In
  training the KL's backward, the last use before the optimizer changes ``rho``, drops it.
* :class:`GaussianSample` returns ``mu + sigma * eps`` and allocates nothing for its
  backward (see there); ``grad_mu = g``, ``grad_rho = g * eps * sigmoid(rho)``.
* :class:`NormalKL` returns the summed closed-form KL with reductions (dot products) instead
  of elementwise temporaries, and its gradient in closed form.
* :class:`GaussianSampleKL` is both in one node (training: the KL of a parameter meets its
  sample's gradient in one backward); :class:`MultiNormalKL` is :class:`NormalKL` for many
  small parameters with multi-tensor ops; :class:`MixtureKL` is the scale-mixture prior's
  Monte Carlo KL, fused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GaussianSample",
    "GaussianSampleKL",
    "GaussianSampleTransformable",
    "MixtureKL",
    "MultiNormalKL",
    "NormalKL",
    "cached_sigma",
    "sample",
    "softplus32",
    "transforms_active",
]


def softplus32(rho: Tensor) -> Tensor:
    """``softplus(rho)`` computed in float32 (or wider) whatever the dtype of ``rho``.

    Keeps sigma from underflowing to 0 (and the KL's ``log(sigma)`` from becoming -inf) in
    float16/bfloat16 models and under autocast. A no-op cast for float32 parameters.
    """
    return F.softplus(rho.to(torch.promote_types(rho.dtype, torch.float32)))


_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad, ...) is running."""
    return bool(_transforms_active())


def cached_sigma(
    cache: dict[str, tuple[int, int, Tensor]], name: str, rho: Tensor, *, reuse: bool = True
) -> Tensor:
    """``softplus(rho)``, detached; with ``reuse``, recomputed only when ``rho`` changed.

    "Changed" means a new version of ``rho`` (any in-place update through autograd-visible
    ops: optimizer steps, ``load_state_dict``, ``with torch.no_grad(): rho.fill_(...)``) or a
    different tensor. Writes through ``rho.data`` bypass the version counter and are not seen
    until the next training forward, which always recomputes (``reuse=False``).

    Bypassed under torch.compile (dynamo cannot trace the version/pointer check, and the
    compiled graph fuses softplus into the sampling kernel anyway) and under torch.func
    transforms (their wrappers have no storage to key on).
    """
    if torch.compiler.is_compiling() or _transforms_active():
        # detach, not no_grad: torch.export turns a no_grad block into a submodule call
        return softplus32(rho).detach()
    key = (rho._version, rho.data_ptr())
    entry = cache.get(name)
    if (
        reuse
        and entry is not None
        and entry[:2] == key
        and entry[2].shape == rho.shape
        and (torch.is_inference_mode_enabled() or not entry[2].is_inference())
    ):
        return entry[2]
    with torch.no_grad():
        sigma = softplus32(rho)
    cache[name] = (*key, sigma)
    return sigma


def _sample_backward(
    ctx: Any, grad: Tensor, mu: Tensor, rho: Tensor, sigma: Tensor, weight: Tensor
) -> tuple[Tensor | None, ...]:
    grad_rho = None
    if ctx.needs_input_grad[1]:
        grad_rho = torch.sub(weight, mu).div_(sigma).mul_(torch.sigmoid(rho)).mul_(grad)
    return (grad if ctx.needs_input_grad[0] else None), grad_rho, None


class GaussianSample(torch.autograd.Function):
    """``mu + sigma * eps`` with ``eps ~ N(0, 1)``; ``sigma = softplus(rho)`` precomputed.

    Saves nothing new: the sample itself (which the layer's op keeps for its own backward
    anyway), ``mu`` and ``rho`` (parameters) and ``sigma`` (cached). Backward recovers
    ``eps = (w - mu) / sigma`` (the noise actually applied, after rounding) and returns
    ``grad_mu = g``, ``grad_rho = g * eps * sigmoid(rho)``.

    The ``ctx``-in-forward form: ``Function.apply`` binds arguments with ``inspect`` on every
    call when ``setup_context`` is defined, which costs more than the arithmetic on small
    layers. :class:`GaussianSampleTransformable` is the same under torch.func transforms.
    """

    @staticmethod
    def forward(ctx: Any, mu: Tensor, rho: Tensor, sigma: Tensor) -> Tensor:  # type: ignore[override]
        weight = torch.addcmul(mu, sigma, torch.randn_like(mu))
        ctx.save_for_backward(mu, rho, sigma, weight)
        return weight

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return _sample_backward(ctx, grad, *ctx.saved_tensors)


class GaussianSampleTransformable(torch.autograd.Function):
    """:class:`GaussianSample` in the ``setup_context`` form that ``torch.func.vmap`` needs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(mu: Tensor, rho: Tensor, sigma: Tensor) -> Tensor:  # type: ignore[override]
        return torch.addcmul(mu, sigma, torch.randn_like(mu))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs, output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return _sample_backward(ctx, grad, *ctx.saved_tensors)


def sample(mu: Tensor, rho: Tensor, sigma: Tensor) -> Tensor:
    """One reparameterized sample; the cheapest path when no gradient is needed."""
    if torch.is_grad_enabled() and (mu.requires_grad or rho.requires_grad):
        if _transforms_active():
            return GaussianSampleTransformable.apply(mu, rho, sigma)
        return GaussianSample.apply(mu, rho, sigma)
    return torch.randn_like(mu).mul_(sigma).add_(mu)


def _normal_kl_value(
    mu: Tensor, sigma: Tensor, prior_mu: Tensor | None, prior_sigma: float
) -> Tensor:
    """Summed closed-form ``KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2))``, float32+.
    ``prior_mu=None`` means a zero prior mean (one pass fewer)."""
    dtype = torch.promote_types(mu.dtype, torch.float32)
    m, s = mu.to(dtype).flatten(), sigma.to(dtype).flatten()
    # broadcasts a scalar prior mean
    diff = m if prior_mu is None else m - prior_mu.to(dtype).flatten()
    # 0.5 * sum(s^2 + d^2) / ps^2 - sum(log s) + n * (log ps - 1/2), with reductions only
    # out of place: under FSDP2 the dot products are partial sums (DTensor Partial)
    kl = (torch.dot(s, s) + torch.dot(diff, diff)) * (0.5 / prior_sigma**2)
    return kl - torch.log(s).sum() + m.numel() * (math.log(prior_sigma) - 0.5)


class GaussianSampleKL(torch.autograd.Function):
    """:class:`GaussianSample` and :class:`NormalKL` of the same parameter in ONE node.

    Returns ``(weight, kl)``. The layer keeps ``kl`` for :func:`dnn2bnn.kl_divergence` of
    the same step, so the backward receives both gradients at once and combines them::

        grad_mu  = g + c (mu - prior_mu) / prior_sigma^2
        grad_rho = sigmoid(rho) * ((g (w - mu) - c) / sigma + c sigma / prior_sigma^2)

    with ``g`` the weight's gradient and ``c`` the KL's: about ten passes over the weights
    instead of fifteen for the two nodes, one ``sigmoid`` instead of two, and no gradient
    accumulation between them. Either gradient may be absent (weight or KL unused).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mu: Tensor,
        rho: Tensor,
        sigma: Tensor,
        prior_mu: Tensor | None,
        prior_sigma: float,
        release: Callable[[], None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        weight = torch.addcmul(mu, sigma, torch.randn_like(mu))
        kl = _normal_kl_value(mu, sigma, prior_mu, prior_sigma)
        ctx.save_for_backward(mu, rho, sigma, weight, prior_mu)
        ctx.prior_sigma, ctx.release = prior_sigma, release
        ctx.set_materialize_grads(False)
        return weight, kl

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor | None, grad_kl: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        mu, rho, sigma, weight, prior_mu = ctx.saved_tensors
        scale = None if grad_kl is None else grad_kl.to(sigma.dtype) / ctx.prior_sigma**2
        grad_mu = grad_rho = None
        if ctx.needs_input_grad[0]:
            if scale is None:
                grad_mu = grad if grad is not None else torch.zeros_like(mu)
            else:
                grad_mu = torch.mul(mu, scale) if prior_mu is None else torch.sub(mu, prior_mu).mul_(scale)
                if grad is not None:
                    grad_mu.add_(grad)
        if ctx.needs_input_grad[1]:
            grad_rho = torch.sub(weight, mu)  # sigma * eps
            if grad is not None:
                grad_rho.mul_(grad)
            else:
                grad_rho.zero_()
            if scale is not None:
                grad_rho.sub_(grad_kl.to(sigma.dtype)).div_(sigma).addcmul_(sigma, scale)
            else:
                grad_rho.div_(sigma)
            grad_rho.mul_(torch.sigmoid(rho))
        if ctx.release is not None:
            ctx.release()  # rho changes at the next optimizer step: do not hold sigma meanwhile
        return grad_mu, grad_rho, None, None, None, None


class NormalKL(torch.autograd.Function):
    """Summed ``KL(N(mu, softplus(rho)^2) || N(prior_mu, prior_sigma^2))``, scalar prior sigma.

    ``prior_sigma`` is a Python float (the layer reads its buffer once per change), so the
    forward is a handful of reductions. Computed in float32 or wider. Gradients:
    ``(mu - prior_mu) / prior_sigma^2`` and ``(sigma / prior_sigma^2 - 1 / sigma) * sigmoid(rho)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mu: Tensor,
        rho: Tensor,
        sigma: Tensor,
        prior_mu: Tensor,
        prior_sigma: float,
        release: Callable[[], None] | None = None,
    ) -> Tensor:
        kl = _normal_kl_value(mu, sigma, prior_mu, prior_sigma)
        ctx.save_for_backward(mu, rho, sigma, prior_mu)
        ctx.prior_sigma = prior_sigma
        ctx.release = release
        return kl

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        mu, rho, sigma, prior_mu = ctx.saved_tensors
        grad = grad.to(rho.dtype)
        inv_var = grad / ctx.prior_sigma**2
        grad_mu = grad_rho = None
        if ctx.needs_input_grad[0]:
            grad_mu = torch.sub(mu, prior_mu).mul_(inv_var)
        if ctx.needs_input_grad[1]:
            grad_rho = sigma.reciprocal().mul_(-grad).add_(sigma * inv_var)
            grad_rho.mul_(torch.sigmoid(rho))
        if ctx.release is not None:
            ctx.release()  # rho changes at the next optimizer step: do not hold sigma meanwhile
        return grad_mu, grad_rho, None, None, None, None


class MixtureKL(torch.autograd.Function):
    """Single-sample Monte Carlo ``KL(q || p)`` for the scale-mixture prior, summed, fused.

    ``p = pi N(0, s1^2) + (1 - pi) N(0, s2^2)`` with scalar ``0 < pi < 1``; ``w`` is the weight
    sample, ``q = N(mu, sigma^2)``. With ``eps = (w - mu) / sigma`` and
    ``u = c w^2 + d`` (``c = 1/(2 s2^2) - 1/(2 s1^2)``, ``d = log(pi s2 / ((1 - pi) s1))``),
    ``log p(w) = log((1 - pi) / s2) - w^2 / (2 s2^2) + softplus(u) - log sqrt(2 pi)``, so

        KL = -sum(log sigma) - sum(eps^2) / 2 - n log((1 - pi) / s2)
             + sum(w^2) / (2 s2^2) - sum(softplus(u))

    a handful of passes and reductions instead of the two-component ``logaddexp`` through
    autograd (about 5x fewer passes over the weights). Gradients are the partial derivatives
    in ``w``, ``mu`` and ``sigma``; autograd composes them with the sample's own.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, w: Tensor, mu: Tensor, sigma: Tensor, pi: float, s1: float, s2: float
    ) -> Tensor:
        dtype = torch.promote_types(w.dtype, torch.float32)
        w, mu, sigma = w.to(dtype), mu.to(dtype), sigma.to(dtype)
        c = 0.5 / s2**2 - 0.5 / s1**2
        d = math.log(pi * s2 / ((1.0 - pi) * s1))
        eps = torch.sub(w, mu).div_(sigma)
        flat_w, flat_eps = w.flatten(), eps.flatten()
        sq = flat_w * flat_w
        u = sq.mul_(c).add_(d)  # c w^2 + d, in place of w^2 (its sum comes from a dot)
        kl = (torch.dot(flat_w, flat_w) * (0.5 / s2**2) - 0.5 * torch.dot(flat_eps, flat_eps)
              - torch.log(sigma).sum() - F.softplus(u).sum()
              - w.numel() * math.log((1.0 - pi) / s2))
        ctx.save_for_backward(w, sigma, eps, torch.sigmoid_(u))
        ctx.c, ctx.s2 = c, s2
        return kl

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        w, sigma, eps, sig_u = ctx.saved_tensors
        grad_w = grad_mu = grad_sigma = None
        eps_over_sigma = eps / sigma
        if ctx.needs_input_grad[0]:
            # d/dw: -eps/sigma - dlog p/dw, dlog p/dw = w (2 c sigmoid(u) - 1/s2^2)
            grad_w = sig_u.view_as(w).mul(2.0 * ctx.c).sub_(1.0 / ctx.s2**2).mul_(w)
            grad_w.add_(eps_over_sigma).mul_(-grad)
        if ctx.needs_input_grad[1]:
            grad_mu = eps_over_sigma.mul(grad)
        if ctx.needs_input_grad[2]:
            grad_sigma = eps.square().sub_(1.0).div_(sigma).mul_(grad)  # (eps^2 - 1) / sigma
        return grad_w, grad_mu, grad_sigma, None, None, None


class MultiNormalKL(torch.autograd.Function):
    """The summed :class:`NormalKL` of many parameters in ONE autograd node.

    For small tensors the cost of :class:`NormalKL` is per-op dispatch, not arithmetic, so
    :func:`dnn2bnn.kl_divergence` hands all of a model's small parameters with a closed-form
    KL to this node, which does the same computation with multi-tensor (``torch._foreach_*``)
    ops: a few dispatches for the whole model instead of about 20 per parameter. Float32
    only (the caller checks); ``prior_means`` holds floats (scalar prior means) or tensors.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        prior_means: list[float | Tensor],
        prior_sigmas: list[float],
        releases: list[Callable[[], None]],
        *tensors: Tensor,
    ) -> Tensor:
        n = len(prior_sigmas)
        mus, sigmas = tensors[:n], tensors[2 * n :]
        diffs = _diffs(mus, prior_means)
        inv_var = [1.0 / ps**2 for ps in prior_sigmas]
        squares = torch.stack(torch._foreach_norm(sigmas)).square_() + torch.stack(
            torch._foreach_norm(diffs)
        ).square_()
        logs = torch.stack([torch.log(s).sum() for s in sigmas])
        const = sum(m.numel() * (math.log(ps) - 0.5) for m, ps in zip(mus, prior_sigmas))
        weights = torch.tensor(inv_var, dtype=squares.dtype, device=squares.device)
        kl = torch.dot(squares, weights) * 0.5 - logs.sum() + const
        ctx.save_for_backward(*tensors)
        ctx.prior_means, ctx.inv_var, ctx.releases = prior_means, inv_var, releases
        return kl

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        tensors = ctx.saved_tensors
        n = len(ctx.inv_var)
        mus, rhos, sigmas = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        grad_mu = grad_rho = [None] * n
        if any(ctx.needs_input_grad[3 : 3 + n]):
            grad_mu = _diffs(mus, ctx.prior_means)  # (mu - prior_mu) / prior_sigma^2
            torch._foreach_mul_(grad_mu, ctx.inv_var)
            torch._foreach_mul_(grad_mu, grad)
        if any(ctx.needs_input_grad[3 + n : 3 + 2 * n]):
            # (sigma / prior_sigma^2 - 1 / sigma) * sigmoid(rho)
            grad_rho = torch._foreach_mul(sigmas, ctx.inv_var)
            torch._foreach_sub_(grad_rho, torch._foreach_reciprocal(sigmas))
            torch._foreach_mul_(grad_rho, torch._foreach_sigmoid(rhos))
            torch._foreach_mul_(grad_rho, grad)
        for release in ctx.releases:
            release()  # rho changes at the next optimizer step: do not hold sigma meanwhile
        return None, None, None, *grad_mu, *grad_rho, *([None] * n)


def _diffs(mus: tuple[Tensor, ...], prior_means: list[float | Tensor]) -> list[Tensor]:
    if all(isinstance(p, float) for p in prior_means):
        return list(torch._foreach_sub(mus, prior_means))  # type: ignore[arg-type]
    return [torch.sub(m, p) for m, p in zip(mus, prior_means)]
