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
from dnn2bnn.layers._flat import FlatGaussianSampleKL, FlatKL, FlatSpec, prior_constant
from dnn2bnn.layers._kl import _FSDPModule
from dnn2bnn.layers._sampling import transforms_active

__all__ = ["FLAT_MAX_NUMEL", "install_batched_sampling"]

#: Parameters above this many elements keep their lazy draw (None: no limit).
FLAT_MAX_NUMEL: int | None = None
_FLAT_DTYPES = (torch.float32, torch.float64)


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


#: (layer, name, mu, rho, prior_mu buffer, prior_sigma buffer)
_Entry = tuple[BayesianLayer, str, Tensor, Tensor, Tensor, Tensor]


def _flat_entry(layer: BayesianLayer, name: str) -> _Entry | None:
    """The parameter ``name`` of ``layer`` if the flat node can draw it, else None (lazy)."""
    mu = layer._parameters[name + "_mu"]
    if mu is None or type(mu) is not nn.Parameter:
        return None
    rho = layer._parameters[name + "_rho"]
    if (
        type(rho) is not nn.Parameter
        or mu.dtype not in _FLAT_DTYPES
        or rho.dtype != mu.dtype
        or rho.device != mu.device
        or not (mu.requires_grad or rho.requires_grad)
        or (FLAT_MAX_NUMEL is not None and mu.numel() > FLAT_MAX_NUMEL)
        or layer._fixed_row(name) is not None
    ):
        return None
    prior_mu = layer._buffers.get(name + "_prior_mu")
    prior_sigma = layer._buffers.get(name + "_prior_sigma")
    if (
        prior_mu is None
        or prior_sigma is None
        or prior_sigma.numel() != 1
        or not (prior_mu.numel() == 1 or prior_mu.shape == mu.shape)
        or type(prior_mu) is not Tensor
        or type(prior_sigma) is not Tensor
    ):
        return None
    return layer, name, mu, rho, prior_mu, prior_sigma


def _draw_all(model: nn.Module, args: Any) -> None:
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or transforms_active():
        return
    groups: dict[tuple[Any, ...], list[_Entry]] = {}
    for layer in model.modules():
        if not _eligible(layer):
            continue
        for name in layer.bayes_params:
            entry = _flat_entry(layer, name)
            if entry is not None:
                groups.setdefault((layer._exp, entry[2].device, entry[2].dtype), []).append(entry)
    for (exp, _, _), entries in groups.items():
        _draw_group(exp, entries)


def _draw_group(exp: bool, entries: list[_Entry]) -> None:
    """One flat node for ``entries``; every layer finds its sample in its call cache."""
    sizes = [e[2].numel() for e in entries]
    spec = _spec(exp, sizes, entries)
    flat, kl = FlatGaussianSampleKL.apply(spec, *(e[2] for e in entries), *(e[3] for e in entries))
    samples = flat.split(sizes) if len(entries) > 1 else (flat,)
    marker = FlatKL(kl, spec, len(entries))
    for (layer, name, mu, rho, _, _), piece in zip(entries, samples):
        sample = piece.view(mu.shape)
        if layer._sample_cache is None:
            layer._sample_cache = {}
        layer._sample_cache[name] = sample
        # a checkpoint recomputation takes this sample again (no draw of its own to replay)
        layer._replay[name] = (sample, collections.deque(maxlen=1))
        layer._pending_kl[name] = (marker, layer._kl_stamp(name, mu, rho))  # type: ignore[assignment]


def _spec(exp: bool, sizes: list[int], entries: list[_Entry]) -> FlatSpec:
    """The prior's numbers of ``entries``, read now in one operation (a write through
    ``.data`` to a prior buffer is seen), as scalars where all entries agree."""
    full = any(e[4].numel() != 1 for e in entries)
    scalars = [e[5].reshape(1) for e in entries] + [e[4].reshape(1) for e in entries if e[4].numel() == 1]
    with torch.no_grad():
        values = torch.cat(scalars).tolist()
    n = len(entries)
    prior_sigmas, scalar_means = values[:n], values[n:]
    inv_var: float | Tensor = 1.0 / prior_sigmas[0] ** 2
    first = entries[0][2]
    if any(s != prior_sigmas[0] for s in prior_sigmas):
        per = torch.tensor([1.0 / s**2 for s in prior_sigmas], dtype=first.dtype, device=first.device)
        inv_var = per.repeat_interleave(torch.tensor(sizes, device=first.device), output_size=sum(sizes))
    prior_mean: float | Tensor
    if not full and all(m == scalar_means[0] for m in scalar_means):
        prior_mean = scalar_means[0]
    else:
        with torch.no_grad():
            prior_mean = torch.cat([
                e[4].reshape(-1) if e[4].numel() == e[2].numel() else e[4].reshape(1).expand(e[2].numel())
                for e in entries
            ]).to(first.dtype)
    return FlatSpec(exp, sizes, inv_var, prior_mean, prior_constant(sizes, prior_sigmas))


def _drop_all(model: nn.Module, args: Any, output: Any) -> None:
    for layer in model.modules():
        if isinstance(layer, BayesianLayer):
            layer._sample_cache = None
