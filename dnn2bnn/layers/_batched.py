"""Small weight samples of a model call drawn by ONE autograd node (issue 17, dispatch-bound steps).

Opt-in: ``dnn2bnn.layers.install_batched_sampling(bnn)``.

Per Bayesian parameter, a lazy draw costs a Python property call, a custom autograd node and
about ten small operations in forward and backward. For small layers that fixed cost, not
arithmetic, dominates the step. :func:`install_batched_sampling` registers hooks on a model
that, at the start of each training call (autograd recording), draw the samples of every
eligible parameter of the model at once in :class:`MultiGaussianSample`: multi-tensor
(``torch._foreach_*``) operations for sigma, ``mu + sigma * eps`` and their gradients (one
kernel for all tensors on CUDA; a loop in C++ on the CPU), and one ``randn`` per parameter in
module order, which is the random stream of the lazy path wherever the modules are defined
in the order they are used. Each layer finds its sample in its per-call cache
(the same cache that gives one sample per call), so nothing else changes: every read within
the call returns that sample, the KL of the step reuses its sigma, and a
``torch.utils.checkpoint`` recomputation finds the sample again.

Eligible: built-in layers in "sample" mode with the "reparam" estimator, float32 parameters
of at most ``SMALL_KL_NUMEL`` elements that are plain tensors (not FSDP2 shards), a Normal
or empirical prior, no padding row. Larger parameters are bandwidth-bound: they keep their
lazy draw, whose node also computes their KL.
Everything else keeps drawing lazily, per layer; so do calls without autograd (prediction)
and calls under torch.compile or torch.func transforms.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch import Tensor, nn

from dnn2bnn.config import Estimator
from dnn2bnn.layers._base import BayesianLayer, BayesMode
from dnn2bnn.layers._kl import SMALL_KL_NUMEL, _FSDPModule
from dnn2bnn.layers._sampling import softplus32, transforms_active

__all__ = ["MultiGaussianSample", "install_batched_sampling"]


class MultiGaussianSample(torch.autograd.Function):
    """``mu_i + sigma_i * eps_i`` for many parameters; ``sigma_i`` given (detached).

    Inputs ``(exp, n, *mus, *rhos, *sigmas)``; outputs the ``n`` samples. Backward:
    ``grad_mu_i = g_i``, ``grad_rho_i = g_i * eps_i * dsigma_i/drho_i`` with multi-tensor ops;
    an unused sample gives zero gradients.
    """

    @staticmethod
    def forward(ctx: Any, exp: bool, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        mus, rhos, sigmas = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        # one randn per parameter, in order: the same random stream as drawing lazily
        eps = [torch.randn_like(m) for m in mus]
        samples = torch._foreach_addcmul(list(mus), list(sigmas), eps)
        ctx.save_for_backward(*rhos, *sigmas, *eps)
        ctx.exp, ctx.n = exp, n
        ctx.set_materialize_grads(False)
        return tuple(samples)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        n = ctx.n
        saved = ctx.saved_tensors
        rhos, sigmas, eps = saved[:n], saved[n : 2 * n], saved[2 * n :]
        used = [i for i in range(n) if grads[i] is not None]
        grad_mu: list[Tensor | None] = [None] * n
        grad_rho: list[Tensor | None] = [None] * n
        if used:
            g = [grads[i] for i in used]
            rho_grads = torch._foreach_mul([eps[i] for i in used], g)
            if ctx.exp:
                torch._foreach_mul_(rho_grads, [sigmas[i] for i in used])
            else:
                torch._foreach_mul_(rho_grads, torch._foreach_sigmoid([rhos[i] for i in used]))
            for k, i in enumerate(used):
                grad_mu[i] = g[k] if ctx.needs_input_grad[2 + i] else None
                grad_rho[i] = rho_grads[k] if ctx.needs_input_grad[2 + n + i] else None
        return None, None, *grad_mu, *grad_rho, *([None] * n)


def install_batched_sampling(model: nn.Module) -> None:
    """Draw the samples of ``model``'s small Bayesian parameters in one node per training call.

    Registers a forward pre-hook and a forward hook on ``model`` (idempotent). Install it
    on the outermost module you call, after conversion; :func:`dnn2bnn.to_dnn` removes it.
    It changes the order of random draws (small parameters first), not their distribution.

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> dnn2bnn.layers.install_batched_sampling(bnn)
        >>> bnn(torch.ones(1, 3)).shape
        torch.Size([1, 2])
    """
    if _draw_all not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_draw_all)
        model.register_forward_hook(_drop_all, always_call=True)


def _eligible(layer: nn.Module) -> bool:
    return (
        isinstance(layer, BayesianLayer)
        and layer.bayes_mode == BayesMode.SAMPLE
        and layer.estimator is Estimator.REPARAM
        and layer._sample_cache is None
        and not layer.prior.needs_sample
        and not (_FSDPModule is not None and isinstance(layer, _FSDPModule))
    )


def _draw_all(model: nn.Module, args: Any) -> None:
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or transforms_active():
        return
    groups: dict[tuple[Any, ...], list[tuple[BayesianLayer, str, Tensor, Tensor]]] = {}
    layers = []
    for layer in model.modules():
        if not _eligible(layer):
            continue
        entries = []
        for name in layer.bayes_params:
            mu = layer._parameters[name + "_mu"]
            if mu is None:
                continue
            rho = layer._parameters[name + "_rho"]
            if mu is not None and mu.numel() > SMALL_KL_NUMEL:
                continue  # bandwidth-bound: drawn lazily, with its KL in the same node
            if (
                type(mu) is not nn.Parameter
                or type(rho) is not nn.Parameter
                or mu.dtype != torch.float32
                or not (mu.requires_grad or rho.requires_grad)
                or layer._fixed_row(name) is not None
            ):
                entries = None
                break
            entries.append((layer, name, mu, rho))
        if not entries:
            continue
        layers.append(layer)
        for entry in entries:
            groups.setdefault((layer._exp, entry[2].device), []).append(entry)
    if not groups:
        return
    for layer in layers:
        layer._sample_cache = {}
    for (exp, _), entries in groups.items():
        rhos = [e[3] for e in entries]
        with torch.no_grad():
            sigmas = torch._foreach_exp(rhos) if exp else [softplus32(r) for r in rhos]
        samples = MultiGaussianSample.apply(
            exp, len(entries), *(e[2] for e in entries), *(e[3] for e in entries), *sigmas
        )
        for (layer, name, _, _), sample in zip(entries, samples):
            layer._sample_cache[name] = sample
            # a checkpoint recomputation takes this sample again (no draw of its own to replay)
            layer._replay[name] = (sample, collections.deque(maxlen=1))


def _drop_all(model: nn.Module, args: Any, output: Any) -> None:
    for layer in model.modules():
        if isinstance(layer, BayesianLayer):
            layer._sample_cache = None
