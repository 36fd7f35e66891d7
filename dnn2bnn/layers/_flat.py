"""Samples and closed-form KL of many Bayesian parameters over ONE flat buffer (issue 17).

Per Bayesian tensor, a lazy draw costs a custom autograd node and about ten small aten
operations in forward and backward, plus its share of the KL; on a dispatch-bound step
(LeNet-5 on CPU, any small step on a GPU) that fixed cost, not arithmetic, sets the time,
and the number of operations of a training step grows with the number of Bayesian tensors.
``torch._foreach_*`` does not help on the CPU: it loops in C++, one aten operation per tensor.

:class:`FlatGaussianSampleKL` works on one flat buffer per group of parameters instead: the
means and ``rho`` of all of them are concatenated (one ``cat`` each), then one ``exp`` (or
``softplus``), one ``randn``, one ``addcmul`` give the flat sample, of which every layer's
weight is a view (made in one C++ call, ``unflatten_dense_tensors``); the closed-form KL of
the whole group comes from the same node (three reductions). Its backward gathers the
per-layer weight gradients into one flat tensor (one C++ ``flatten_dense_tensors``), and
``grad_mu``/``grad_rho`` (sample + KL) are a handful of flat operations, handed back to each
parameter as views. The number of non-view operations is the same for 2 or 200 tensors, and
no Python code runs per tensor in the node (a Python ``view`` call costs about 4 us).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._utils import _flatten_dense_tensors as _flatten
from torch._utils import _unflatten_dense_tensors as _unflatten

from dnn2bnn.layers._sampling import _cpu_scalar, formula_grads

__all__ = ["FlatGaussianSampleKL", "FlatKL", "FlatSpec", "prior_constant"]


#: Read the KL's incoming gradient as a Python float on the CPU (no device synchronisation
#: there); elsewhere it stays a tensor. (A switch so that tests cover both branches.)
_FOLD_ON_CPU = True


@dataclasses.dataclass
class FlatSpec:
    """What :class:`FlatGaussianSampleKL` needs besides the parameters.

    Attributes:
        exp: ``sigma = exp(rho)`` (else ``softplus(rho)``).
        sizes: number of elements of each parameter, in order.
        inv_var: ``1 / prior_sigma^2``, one float for all, or a flat tensor per element.
        prior_mean: the prior mean, one float for all, or a flat tensor per element.
        const: ``sum_i n_i (log prior_sigma_i - 1/2)``.
        spent: set by the backward (the KL tensor must not be handed out again).
    """

    exp: bool
    sizes: list[int]
    inv_var: float | Tensor
    prior_mean: float | Tensor
    const: float
    spent: bool = False


class FlatGaussianSampleKL(torch.autograd.Function):
    """``(*samples, summed KL)`` of ``n`` parameters ``(*mus, *rhos)`` (see the module doc).

    Outputs the samples ``mu + sigma * eps`` (views, shaped as the means, of one flat sample)
    and ``KL(N(mu, sigma^2) || N(prior_mean, prior_sigma^2))`` summed over all elements.
    Backward, with ``g`` the samples' gradients gathered into one flat tensor and ``c`` the
    KL's::

        grad_mu  = g + c (mu - prior_mean) / prior_sigma^2
        grad_rho = g eps dsigma/drho + c dKL/drho

    either part absent when its output was unused.
    """

    @staticmethod
    def forward(ctx: Any, spec: FlatSpec, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        n = len(spec.sizes)
        mu = _flat(tensors[:n])
        rho = _flat(tensors[n:])
        sigma = torch.exp(rho) if spec.exp else F.softplus(rho)
        eps = torch.randn_like(mu)
        sample = torch.addcmul(mu, sigma, eps)
        diff = mu if isinstance(spec.prior_mean, float) and spec.prior_mean == 0.0 else mu - spec.prior_mean
        iv = spec.inv_var
        if isinstance(iv, float):
            quad = (torch.dot(sigma, sigma) + torch.dot(diff, diff)) * (0.5 * iv)
        else:  # prior sigmas differ between parameters: one value per element
            quad = torch.dot(torch.addcmul(sigma * sigma, diff, diff), iv) * 0.5
        logs = rho.sum() if spec.exp else torch.log(sigma).sum()
        kl = quad - logs + spec.const
        ctx.save_for_backward(diff, rho, sigma, eps)
        ctx.spec, ctx.like = spec, tensors[:n]  # (the means: shapes for the gradients' views)
        ctx.inputs = tensors  # (create_graph=True: the backward differentiates them again)
        ctx.set_materialize_grads(False)
        like = tensors[:n]
        samples = _unflatten(sample, like) if n > 1 else (sample.view(like[0].shape),)
        return *samples, kl

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        spec: FlatSpec = ctx.spec
        spec.spent = True
        if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated
            return _differentiable_backward(ctx, grads)
        diff, rho, sigma, eps = ctx.saved_tensors
        n = len(spec.sizes)
        grad, grad_kl = _gather(grads[:n], ctx.like), grads[n]
        needs = ctx.needs_input_grad[1:]
        c: float | Tensor | None = None
        if grad_kl is not None:
            # on the CPU the scalar folds into the scalars of the flat operations
            c = _cpu_scalar(grad_kl) if _FOLD_ON_CPU else None
            if c is None:
                c = grad_kl.to(sigma.dtype)
        grad_mu = grad_rho = None
        if any(needs[:n]):
            if c is None:
                grad_mu = grad if grad is not None else torch.zeros_like(diff)
            else:
                civ = _times(spec.inv_var, c)
                if grad is not None and isinstance(civ, float):
                    grad_mu = torch.add(grad, diff, alpha=civ)  # one pass
                else:
                    grad_mu = torch.mul(diff, civ)
                    if grad is not None:
                        grad_mu.add_(grad)
        if any(needs[n:]):
            grad_rho = _grad_rho(grad, c, rho, sigma, eps, spec)
        mus = _pieces(grad_mu, ctx.like, needs[:n])
        rhos = _pieces(grad_rho, ctx.like, needs[n:])
        return None, *mus, *rhos


def _differentiable_backward(ctx: Any, grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """The backward as autograd of the formulas on the original inputs (same noise), so
    that its result has a graph (Hessian-vector products, gradient penalties): the fast
    backward uses saved tensors that are detached."""
    spec: FlatSpec = ctx.spec
    n = len(spec.sizes)
    eps = ctx.saved_tensors[3]
    inputs = ctx.inputs
    needs = ctx.needs_input_grad[1:]
    with torch.enable_grad():
        mu = torch.cat([t.reshape(-1) for t in inputs[:n]])
        rho = torch.cat([t.reshape(-1) for t in inputs[n:]])
        sigma = torch.exp(rho) if spec.exp else F.softplus(rho)
        outputs, grad_outputs = [], []
        if any(g is not None for g in grads[:n]):
            sample = mu + sigma * eps
            for piece, like, g in zip(sample.split(spec.sizes), inputs[:n], grads[:n]):
                if g is not None:
                    outputs.append(piece.view(like.shape))
                    grad_outputs.append(g)
        if grads[n] is not None:
            diff = mu - spec.prior_mean
            log_sigma = rho if spec.exp else torch.log(sigma)
            kl = ((sigma * sigma + diff * diff) * spec.inv_var).sum() * 0.5 - log_sigma.sum() + spec.const
            outputs.append(kl)
            grad_outputs.append(grads[n])
    return None, *formula_grads(outputs, grad_outputs, list(inputs), list(needs))


def _flat(tensors: tuple[Tensor, ...]) -> Tensor:
    """The tensors concatenated, flat: one C++ call (a Python ``reshape`` each costs more)."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1)
    return _flatten(tensors)


def _gather(grads: tuple[Tensor | None, ...], like: tuple[Tensor, ...]) -> Tensor | None:
    """The samples' gradients as one flat tensor (zeros for an unused sample); None if none."""
    if all(g is None for g in grads):
        return None
    if any(g is None for g in grads):
        grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, like))
    return _flat(grads)  # type: ignore[arg-type]


def _times(inv_var: float | Tensor, c: float | Tensor) -> float | Tensor:
    return inv_var * c


def _grad_rho(
    grad: Tensor | None, c: float | Tensor | None, rho: Tensor, sigma: Tensor, eps: Tensor,
    spec: FlatSpec,
) -> Tensor:
    """``g eps dsigma/drho + c dKL/drho``; ``dKL/dsigma = sigma / ps^2 - 1 / sigma``."""
    if grad is None and c is None:
        return torch.zeros_like(rho)
    # exp: dsigma/drho = sigma, so the whole is sigma (g eps + c sigma / ps^2) - c
    # softplus: (g eps + c sigma / ps^2 - c / sigma) sigmoid(rho)
    out = torch.mul(eps, grad) if grad is not None else None
    if c is not None:
        civ = _times(spec.inv_var, c)
        if out is None:
            out = torch.mul(sigma, civ)
        elif isinstance(civ, float):
            out.add_(sigma, alpha=civ)
        else:
            out.addcmul_(sigma, civ)
    if spec.exp:
        out.mul_(sigma)
        if c is not None:
            out.sub_(c)
        return out
    if c is not None:
        out.sub_(torch.reciprocal(sigma).mul_(c))
    return out.mul_(torch.sigmoid(rho))


def _pieces(
    flat: Tensor | None, like: tuple[Tensor, ...], needs: tuple[bool, ...]
) -> list[Tensor | None]:
    """``flat`` as views in the shapes of ``like``, None where no gradient is needed.

    One C++ call (``unflatten_dense_tensors``, as DDP uses): the views one by one from
    Python cost about 4 us each, 160 us per step for LeNet-5's 20 parameters."""
    if flat is None:
        return [None] * len(like)
    parts = _unflatten(flat, like) if len(like) > 1 else (flat.view(like[0].shape),)
    return [p if need else None for p, need in zip(parts, needs)]


def prior_constant(sizes: list[int], prior_sigmas: list[float]) -> float:
    """``sum_i n_i (log prior_sigma_i - 1/2)``, the KL's constant."""
    return sum(n * (math.log(ps) - 0.5) for n, ps in zip(sizes, prior_sigmas))


@dataclasses.dataclass(eq=False)
class FlatKL:
    """The summed KL of a group drawn by :class:`FlatGaussianSampleKL`, as left on each of
    its layers (``layer._pending_kl[name] = (FlatKL, stamp)``) for :func:`dnn2bnn.kl_divergence`.

    It is used only when every member is taken, unchanged, before the node's backward ran;
    a member taken alone (``layer.kl()``) gets its own KL computed afresh.
    """

    kl: Tensor
    spec: FlatSpec
    members: int
