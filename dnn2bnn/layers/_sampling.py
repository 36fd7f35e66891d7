"""Weight sampling and the closed-form KL with hand-written gradients.

``sigma`` is a function of ``rho`` chosen by the layer's parametrization (see
:class:`~dnn2bnn.Parametrization`): ``softplus(rho)`` or ``exp(rho)``. Autograd through
``mu + sigma(rho) * eps`` keeps ``rho``, ``sigma`` and ``eps`` alive and computes sigma again
for the KL. Here:

* ``sigma`` is computed once per draw, detached, and handed to the KL of the same training
  step (see ``_kl``); no value computed from ``rho`` outlives the step it was computed in.
* :class:`GaussianSample` returns ``mu + sigma * eps`` and keeps ``eps`` for its backward:
  ``grad_mu = g``, ``grad_rho = g * eps * dsigma/drho`` with ``dsigma/drho = sigmoid(rho)``
  (softplus) or ``sigma`` (exp). No division by sigma, so the gradient is exact however
  small sigma is.
* :class:`NormalKL` returns the summed closed-form KL with reductions (dot products) instead
  of elementwise temporaries, and its gradient in closed form; ``log sigma`` is ``rho``
  itself under the exp parametrization.
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
    "posterior_std",
    "sample",
    "formula_grads",
    "softplus32",
    "transforms_active",
]


def softplus32(rho: Tensor) -> Tensor:
    """``softplus(rho)`` computed in float32 (or wider) whatever the dtype of ``rho``.

    Keeps sigma from underflowing to 0 (and the KL's ``log(sigma)`` from becoming -inf) in
    float16/bfloat16 models and under autocast. A no-op cast for float32 parameters.
    """
    return F.softplus(rho.to(torch.promote_types(rho.dtype, torch.float32)))


def posterior_std(rho: Tensor, exp: bool) -> Tensor:
    """``sigma`` of ``rho`` in float32 (or wider): ``exp(rho)`` if ``exp`` else ``softplus(rho)``."""
    if rho.dtype not in _WIDE:  # float16/bfloat16: computed in float32
        rho = rho.to(torch.promote_types(rho.dtype, torch.float32))
    return torch.exp(rho) if exp else F.softplus(rho)


#: dtypes in which sigma is computed as they are (no ``promote_types``/``to`` dispatch per call)
_WIDE = frozenset({torch.float32, torch.float64})


_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad, ...) is running."""
    return bool(_transforms_active())


def _grad_rho(grad: Tensor, rho: Tensor, sigma: Tensor, eps: Tensor, exp: bool) -> Tensor:
    """``g * eps * dsigma/drho``: ``sigma`` (exp) or ``sigmoid(rho)`` (softplus)."""
    out = torch.mul(eps, grad)
    return out.mul_(sigma) if exp else out.mul_(torch.sigmoid(rho))


def formula_grads(
    outputs: list[Tensor], grads: list[Tensor], inputs: list[Tensor | None], needed: list[bool]
) -> list[Tensor | None]:
    """Gradients of ``outputs`` (recomputed by the caller from its inputs with differentiable
    operations) w.r.t. the ``needed`` ``inputs``, with a graph (``create_graph=True``).

    The hand-written backwards use ``sigma`` computed detached in the forward, which is exact
    for first derivatives but drops every term through ``sigma(rho)`` of a second derivative
    (Hessian-vector products, gradient penalties). When a backward runs with a graph (grad
    mode on: ``create_graph=True``), the nodes differentiate their formulas instead.
    """
    wanted = [x for x, need in zip(inputs, needed) if need and x is not None and x.requires_grad]
    found = iter(
        torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True)
        if outputs and wanted else [None] * len(wanted)
    )
    out: list[Tensor | None] = []
    for x, need in zip(inputs, needed):
        if need and x is not None and x.requires_grad:
            g = next(found)
            out.append(torch.zeros_like(x) if g is None else g)
        else:
            out.append(None)
    return out


def _sample_backward(
    ctx: Any, grad: Tensor, rho: Tensor, sigma: Tensor, eps: Tensor
) -> tuple[Tensor | None, ...]:
    grad_rho = None
    if ctx.needs_input_grad[1] and torch.is_grad_enabled():  # create_graph: differentiable in rho
        live = torch.exp(rho) if ctx.exp else torch.sigmoid(rho)
        grad_rho = grad * eps * live.to(grad.dtype)
    elif ctx.needs_input_grad[1]:
        grad_rho = _grad_rho(grad, rho, sigma, eps, ctx.exp)
    return (grad if ctx.needs_input_grad[0] else None), grad_rho, None, None


class GaussianSample(torch.autograd.Function):
    """``mu + sigma * eps`` with ``eps ~ N(0, 1)``; ``sigma`` (of ``rho``) precomputed.

    Saves ``rho`` (a parameter), ``sigma`` and the noise ``eps``; backward returns
    ``grad_mu = g`` and ``grad_rho = g * eps * dsigma/drho`` without dividing by sigma (exact
    for any sigma > 0, even where ``mu + sigma * eps`` rounds to ``mu``).

    The ``ctx``-in-forward form: ``Function.apply`` binds arguments with ``inspect`` on every
    call when ``setup_context`` is defined, which costs more than the arithmetic on small
    layers. :class:`GaussianSampleTransformable` is the same under torch.func transforms.
    """

    @staticmethod
    def forward(ctx: Any, mu: Tensor, rho: Tensor, sigma: Tensor, exp: bool = False) -> Tensor:  # type: ignore[override]
        eps = torch.randn_like(mu)
        ctx.save_for_backward(rho, sigma, eps)
        ctx.exp = exp
        return torch.addcmul(mu, sigma, eps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return _sample_backward(ctx, grad, *ctx.saved_tensors)


class GaussianSampleTransformable(torch.autograd.Function):
    """:class:`GaussianSample` in the ``setup_context`` form that ``torch.func.vmap`` needs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(mu: Tensor, rho: Tensor, sigma: Tensor, exp: bool = False) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        eps = torch.randn_like(mu)
        return torch.addcmul(mu, sigma, eps), eps

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.save_for_backward(inputs[1], inputs[2], output[1])
        ctx.exp = inputs[3]
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_eps: Tensor | None = None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return _sample_backward(ctx, grad, *ctx.saved_tensors)


def sample(mu: Tensor, rho: Tensor, sigma: Tensor, exp: bool = False) -> Tensor:
    """One reparameterized sample; the cheapest path when no gradient is needed."""
    if torch.is_grad_enabled() and (mu.requires_grad or rho.requires_grad):
        if _transforms_active():
            return GaussianSampleTransformable.apply(mu, rho, sigma, exp)[0]
        return GaussianSample.apply(mu, rho, sigma, exp)
    return torch.randn_like(mu).mul_(sigma).add_(mu)


def _normal_kl_value(
    mu: Tensor, sigma: Tensor, prior_mu: Tensor | None, prior_sigma: float,
    rho: Tensor | None = None,
) -> Tensor:
    """Summed closed-form ``KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2))``, float32+.
    ``prior_mu=None`` means a zero prior mean (one pass fewer); ``rho`` given means
    ``log sigma = rho`` (the exp parametrization: no log pass)."""
    dtype = torch.promote_types(mu.dtype, torch.float32)
    m, s = mu.to(dtype).flatten(), sigma.to(dtype).flatten()
    # broadcasts a scalar prior mean
    diff = m if prior_mu is None else m - prior_mu.to(dtype).flatten()
    # 0.5 * sum(s^2 + d^2) / ps^2 - sum(log s) + n * (log ps - 1/2), with reductions only
    # out of place: under FSDP2 the dot products are partial sums (DTensor Partial)
    kl = (torch.dot(s, s) + torch.dot(diff, diff)) * (0.5 / prior_sigma**2)
    logs = torch.log(s).sum() if rho is None else rho.to(dtype).sum()
    return kl - logs + m.numel() * (math.log(prior_sigma) - 0.5)


def _kl_grad_rho(
    grad_kl: Tensor, rho: Tensor, sigma: Tensor, prior_sigma: float, exp: bool
) -> Tensor:
    """``c * dKL/drho`` for the closed-form Normal KL: ``(sigma / ps^2 - 1 / sigma) *
    sigmoid(rho)`` (softplus) or ``sigma^2 / ps^2 - 1`` (exp), times ``c``."""
    c = grad_kl.to(sigma.dtype)
    if exp:
        return torch.mul(sigma, sigma).mul_(c / prior_sigma**2).sub_(c)
    out = sigma.reciprocal().mul_(-c).add_(sigma * (c / prior_sigma**2))
    return out.mul_(torch.sigmoid(rho))


class GaussianSampleKL(torch.autograd.Function):
    """:class:`GaussianSample` and :class:`NormalKL` of the same parameter in ONE node.

    Returns ``(weight, kl)``. The layer keeps ``kl`` for :func:`dnn2bnn.kl_divergence` of
    the same step, so the backward receives both gradients at once and combines them::

        grad_mu  = g + c (mu - prior_mu) / prior_sigma^2
        grad_rho = g eps dsigma/drho + c dKL/drho

    with ``g`` the weight's gradient and ``c`` the KL's, and no gradient accumulation
    between two nodes. Either gradient may be absent (weight or KL unused).
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
        exp: bool = False,
    ) -> tuple[Tensor, Tensor]:
        eps = torch.randn_like(mu)
        weight = torch.addcmul(mu, sigma, eps)
        kl = _normal_kl_value(mu, sigma, prior_mu, prior_sigma, rho if exp else None)
        ctx.save_for_backward(mu, rho, sigma, eps, prior_mu)
        ctx.prior_sigma, ctx.release, ctx.exp = prior_sigma, release, exp
        ctx.set_materialize_grads(False)
        return weight, kl

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor | None, grad_kl: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        mu, rho, sigma, eps, prior_mu = ctx.saved_tensors
        grad_mu = grad_rho = None
        if torch.is_grad_enabled():  # create_graph: the formulas, differentiated with a graph
            live = posterior_std(rho, ctx.exp)
            outputs, grads = [], []
            if grad is not None:
                outputs.append(mu + live * eps)
                grads.append(grad)
            if grad_kl is not None:
                outputs.append(_normal_kl_value(mu, live, prior_mu, ctx.prior_sigma, rho if ctx.exp else None))
                grads.append(grad_kl)
            grad_mu, grad_rho = formula_grads(outputs, grads, [mu, rho], list(ctx.needs_input_grad[:2]))
            if ctx.release is not None:
                ctx.release()
            return grad_mu, grad_rho, None, None, None, None, None
        c = _cpu_scalar(grad_kl)
        if c is not None and grad is not None and ctx.exp and mu.dtype in _WIDE:
            # both gradients, exp parametrization, incoming KL scale known on the host: the
            # same sums in fewer passes over the weights (2 + 4 instead of 2 + 6, one
            # allocation each instead of two)
            k = c / ctx.prior_sigma**2
            if ctx.needs_input_grad[0]:  # g + k (mu - prior_mu)
                grad_mu = torch.add(grad, mu, alpha=k)
                if prior_mu is not None:
                    grad_mu.sub_(prior_mu, alpha=k)
            if ctx.needs_input_grad[1]:  # g eps sigma + c (sigma^2 / ps^2 - 1) = sigma (g eps + k sigma) - c
                grad_rho = torch.mul(eps, grad).add_(sigma, alpha=k).mul_(sigma).sub_(c)
            if ctx.release is not None:
                ctx.release()
            return grad_mu, grad_rho, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            if grad_kl is None:
                grad_mu = grad if grad is not None else torch.zeros_like(mu)
            else:
                scale = grad_kl.to(sigma.dtype) / ctx.prior_sigma**2
                grad_mu = torch.mul(mu, scale) if prior_mu is None else torch.sub(mu, prior_mu).mul_(scale)
                if grad is not None:
                    grad_mu.add_(grad)
        if ctx.needs_input_grad[1]:
            if grad is not None:
                grad_rho = _grad_rho(grad, rho, sigma, eps, ctx.exp)
                if grad_kl is not None:
                    grad_rho.add_(_kl_grad_rho(grad_kl, rho, sigma, ctx.prior_sigma, ctx.exp))
            elif grad_kl is not None:
                grad_rho = _kl_grad_rho(grad_kl, rho, sigma, ctx.prior_sigma, ctx.exp)
            else:
                grad_rho = torch.zeros_like(rho)
        if ctx.release is not None:
            ctx.release()  # rho changes at the next optimizer step: do not hold sigma meanwhile
        return grad_mu, grad_rho, None, None, None, None, None


def _cpu_scalar(value: Tensor | None) -> float | None:
    """``value`` as a float if it is a CPU scalar outside autograd (reading it costs no device
    synchronisation), else ``None``."""
    if value is None or value.device.type != "cpu" or value.requires_grad or value.numel() != 1:
        return None
    return value.item()


class NormalKL(torch.autograd.Function):
    """Summed ``KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2))``, scalar prior sigma.

    ``sigma`` is the detached ``sigma(rho)`` of the layer's parametrization (``exp`` True:
    ``exp(rho)``, else ``softplus(rho)``). ``prior_sigma`` is a Python float, so the forward
    is a handful of reductions. Computed in float32 or wider. Gradients:
    ``(mu - prior_mu) / prior_sigma^2`` and ``(sigma / prior_sigma^2 - 1 / sigma) *
    dsigma/drho``.
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
        exp: bool = False,
    ) -> Tensor:
        kl = _normal_kl_value(mu, sigma, prior_mu, prior_sigma, rho if exp else None)
        ctx.save_for_backward(mu, rho, sigma, prior_mu)
        ctx.prior_sigma, ctx.release, ctx.exp = prior_sigma, release, exp
        return kl

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        mu, rho, sigma, prior_mu = ctx.saved_tensors
        grad_mu = grad_rho = None
        if torch.is_grad_enabled():  # create_graph: the formula, differentiated with a graph
            kl = _normal_kl_value(mu, posterior_std(rho, ctx.exp), prior_mu, ctx.prior_sigma,
                                  rho if ctx.exp else None)
            grad_mu, grad_rho = formula_grads([kl], [grad], [mu, rho], list(ctx.needs_input_grad[:2]))
            if ctx.release is not None:
                ctx.release()
            return grad_mu, grad_rho, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            grad_mu = torch.sub(mu, prior_mu).mul_(grad.to(rho.dtype) / ctx.prior_sigma**2)
        if ctx.needs_input_grad[1]:
            grad_rho = _kl_grad_rho(grad, rho, sigma, ctx.prior_sigma, ctx.exp)
        if ctx.release is not None:
            ctx.release()  # rho changes at the next optimizer step: do not hold sigma meanwhile
        return grad_mu, grad_rho, None, None, None, None, None


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
        exp: bool,
        *tensors: Tensor,
    ) -> Tensor:
        n = len(prior_sigmas)
        mus, rhos, sigmas = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        # a zero prior mean (the default prior) needs no difference: no copy of the means
        diffs = mus if _zero_means(prior_means) else _diffs(mus, prior_means)
        inv_var = [1.0 / ps**2 for ps in prior_sigmas]
        # one vector [|sigma_i|, |mu_i - prior_mu_i|, sum(log sigma_i)] and one dot product
        parts = torch.stack([
            *torch._foreach_norm(sigmas),
            *torch._foreach_norm(diffs),
            *[r.sum() if exp else torch.log(s).sum() for r, s in zip(rhos, sigmas)],
        ])
        parts[: 2 * n].square_()
        const = sum(m.numel() * (math.log(ps) - 0.5) for m, ps in zip(mus, prior_sigmas))
        weights = torch.tensor(
            [0.5 * iv for iv in inv_var] * 2 + [-1.0] * n, dtype=parts.dtype, device=parts.device
        )
        kl = torch.dot(parts, weights) + const
        ctx.save_for_backward(*tensors)
        ctx.prior_means, ctx.inv_var, ctx.releases, ctx.exp = prior_means, inv_var, releases, exp
        return kl

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        tensors = ctx.saved_tensors
        n = len(ctx.inv_var)
        mus, rhos, sigmas = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        if torch.is_grad_enabled():  # create_graph: the formulas, differentiated with a graph
            kl = sum(
                _normal_kl_value(m, posterior_std(r, ctx.exp),
                                 pm if isinstance(pm, Tensor) else torch.tensor(pm, dtype=m.dtype, device=m.device),
                                 iv**-0.5, r if ctx.exp else None)
                for m, r, pm, iv in zip(mus, rhos, ctx.prior_means, ctx.inv_var)
            )
            found = formula_grads([kl], [grad], [*mus, *rhos], list(ctx.needs_input_grad[4 : 4 + 2 * n]))
            for release in ctx.releases:
                release()
            return None, None, None, None, *found, *([None] * n)
        # On the CPU the incoming scalar is folded into the per-tensor scalars (one pass
        # fewer per tensor); elsewhere it stays a tensor (no device synchronisation).
        g = _cpu_scalar(grad)
        scaled: list[float] | float = ctx.inv_var if g is None else [iv * g for iv in ctx.inv_var]
        if all(v == scaled[0] for v in scaled):  # one prior sigma: a scalar, not a list
            scaled = scaled[0]
        grad_mu = grad_rho = [None] * n
        if any(ctx.needs_input_grad[4 : 4 + n]):
            # (mu - prior_mu) / prior_sigma^2, times the incoming gradient
            if _zero_means(ctx.prior_means):
                grad_mu = list(torch._foreach_mul(mus, scaled))
            else:
                grad_mu = _diffs(mus, ctx.prior_means)
                torch._foreach_mul_(grad_mu, scaled)
            if g is None:
                torch._foreach_mul_(grad_mu, grad)
        if any(ctx.needs_input_grad[4 + n : 4 + 2 * n]):
            if ctx.exp:  # sigma^2 / prior_sigma^2 - 1, times the incoming gradient
                grad_rho = torch._foreach_mul(sigmas, sigmas)
                torch._foreach_mul_(grad_rho, scaled)
                if g is None:
                    torch._foreach_sub_(grad_rho, 1.0)
                    torch._foreach_mul_(grad_rho, grad)
                else:
                    torch._foreach_sub_(grad_rho, g)
            else:  # (sigma / prior_sigma^2 - 1 / sigma) * sigmoid(rho)
                grad_rho = torch._foreach_mul(sigmas, ctx.inv_var)
                torch._foreach_sub_(grad_rho, torch._foreach_reciprocal(sigmas))
                torch._foreach_mul_(grad_rho, torch._foreach_sigmoid(rhos))
                torch._foreach_mul_(grad_rho, grad)
        for release in ctx.releases:
            release()  # rho changes at the next optimizer step: do not hold sigma meanwhile
        return None, None, None, None, *grad_mu, *grad_rho, *([None] * n)


def _zero_means(prior_means: list[float | Tensor]) -> bool:
    return all(isinstance(p, float) and p == 0.0 for p in prior_means)


def _diffs(mus: tuple[Tensor, ...], prior_means: list[float | Tensor]) -> list[Tensor]:
    if all(isinstance(p, float) for p in prior_means):
        return list(torch._foreach_sub(mus, prior_means))  # type: ignore[arg-type]
    return [torch.sub(m, p) for m, p in zip(mus, prior_means)]
