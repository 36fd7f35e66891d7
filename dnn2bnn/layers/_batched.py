"""The small weight samples of a model call drawn by ONE flat autograd node (issue 17).

Opt-in: ``dnn2bnn.layers.install_batched_sampling(bnn)``.

Per Bayesian parameter, a lazy draw costs a Python property call, a custom autograd node and
about ten small aten operations in forward and backward, plus its share of the KL node; for
small layers that fixed cost, not arithmetic, dominates the step, and the number of
operations of a step grows with the number of Bayesian tensors. :func:`install_batched_sampling`
registers hooks on a model that, at the start of each training call (autograd recording),
draw every eligible parameter of the model with
:class:`~dnn2bnn.layers._flat.FlatGaussianSampleKL`, one node per (parametrization, device,
dtype): the means and ``rho`` concatenated into one flat buffer each, one ``randn`` over all
of them, one ``exp``/``softplus``, one ``addcmul``, the closed-form KL of the whole group by
dot products, and a backward of a handful of flat operations. Each layer's sample is a view
of the flat sample, found in its per-call cache (the cache that gives one sample per call),
so every read within the call returns it, :func:`dnn2bnn.kl_divergence` takes the group's
KL whole, and a ``torch.utils.checkpoint`` recomputation finds the sample again. The number
of operations of forward + backward is the same for 2 or 200 such tensors.

The random stream differs from the lazy path's (one ``randn`` over the group in module
order, not one per parameter); the distribution is the same.

Eligible: built-in layers in "sample" mode with the "reparam" estimator; float32/float64
parameters of at most ``FLAT_MAX_NUMEL`` elements (65,536: larger ones are bandwidth-bound,
and the concatenation costs more than the dispatches it saves; they keep their lazy draw,
whose node also computes their KL) that are plain tensors (not FSDP2 shards, not meta), with
a Normal or empirical prior (scalar prior sigma), no padding row, and a gradient wanted for
``mu`` or ``rho``. Everything else keeps drawing lazily, per layer; so do calls without
autograd (prediction) and calls under torch.compile or torch.func transforms.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors

from dnn2bnn.config import Estimator
from dnn2bnn.layers._base import _REPLAY_STATES, BayesianLayer, BayesMode, FlatReads
from dnn2bnn.layers._flat import FlatGaussianSampleKL, FlatKL, FlatSpec, prior_constant
from dnn2bnn.layers._kl import SMALL_KL_NUMEL, _FSDPModule
from dnn2bnn.layers._sampling import transforms_active

__all__ = ["FLAT_MAX_NUMEL", "install_batched_sampling"]

#: Parameters above this many elements keep their lazy draw (None: no limit). Measured on
#: MLP 784-1200-1200-10 (CPU, one thread): drawing its 940k-element weights flat made the
#: training step 1.2x slower (three more copies of the weights), small ones only 1.0x.
FLAT_MAX_NUMEL: int | None = SMALL_KL_NUMEL
_FLAT_DTYPES = (torch.float32, torch.float64)


def install_batched_sampling(model: nn.Module) -> None:
    """Draw ``model``'s small Bayesian parameters from one flat node per training call.

    Registers a forward pre-hook and a forward hook on ``model`` (idempotent). Install it
    on the outermost module you call, after conversion; :func:`dnn2bnn.to_dnn` removes it.
    In every call with autograd recording, the samples (and closed-form KL) of all eligible
    parameters come from one node with a constant number of operations (see
    ``dnn2bnn/layers/_batched.py``); :func:`dnn2bnn.kl_divergence` of the same step takes
    that KL. It changes the random stream (one draw over all small parameters first), not
    the distribution. Parameters, state_dict and optimizers are untouched. The hooks go with
    ``copy.deepcopy`` but not through :func:`dnn2bnn.save_bnn` / :func:`dnn2bnn.load_bnn`:
    install it again on the loaded model.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no Bayesian layer (not converted yet).

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> dnn2bnn.layers.install_batched_sampling(bnn)
        >>> bnn(torch.ones(1, 3)).shape
        torch.Size([1, 2])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"install_batched_sampling expects the converted model (an nn.Module), got "
            f"{type(model).__name__}"
        )
    if not any(isinstance(m, BayesianLayer) for m in model.modules()):
        raise ValueError(
            f"install_batched_sampling: {type(model).__name__} has no Bayesian layer, so nothing "
            f"would be drawn flat; install it on the model returned by "
            f"dnn2bnn.transform_to_bnn_model"
        )
    if _draw_all not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_draw_all)
        model.register_forward_hook(_drop_all, always_call=True)
    if not any(
        _eligible(m) and _flat_entry(m, name) is not None
        for m in model.modules() if isinstance(m, BayesianLayer) for name in m.bayes_params
    ):
        warnings.warn(
            f"install_batched_sampling: no Bayesian parameter of {type(model).__name__} can be drawn "
            "flat now (each must be a float32/float64 parameter"
            + ("" if FLAT_MAX_NUMEL is None else f" of at most {FLAT_MAX_NUMEL:,} elements")
            + " of a 'reparam' layer in 'sample' mode with a closed-form KL, not the scale-mixture "
            "prior); every layer keeps its own draw, so the hooks change nothing until one can",
            UserWarning,
            stacklevel=2,
        )


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
    if mu is None or type(mu) is not nn.Parameter or mu.is_meta:
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


#: ``model.__dict__`` key: a stack (one entry per open call of the model) of the layers whose
#: call cache :func:`_draw_all` opened, for :func:`_drop_all` to close (no second traversal).
_OPENED = "_dnn2bnn_flat_opened"


def _draw_all(model: nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():  # compiled: lazy draws, nothing to trace here
        return
    opened: list[BayesianLayer] = []
    model.__dict__.setdefault(_OPENED, []).append(opened)
    if not torch.is_grad_enabled() or transforms_active():
        return
    try:
        groups: dict[tuple[Any, ...], list[_Entry]] = {}
        for layer in model.modules():
            if not _eligible(layer):
                continue
            for name in layer.bayes_params:
                entry = _flat_entry(layer, name)
                if entry is not None:
                    groups.setdefault((layer._exp, entry[2].device, entry[2].dtype), []).append(entry)
        for (exp, _, _), entries in groups.items():
            _draw_group(exp, entries, opened)
    except BaseException:
        _drop_all(model, args, None)  # the forward hook does not run after a failed pre-hook
        raise


def _draw_group(exp: bool, entries: list[_Entry], opened: list[BayesianLayer]) -> None:
    """One flat node for ``entries``; every layer finds its sample in its call cache."""
    sizes = [e[2].numel() for e in entries]
    spec = _spec(exp, sizes, entries)
    *samples, kl = FlatGaussianSampleKL.apply(
        spec, *(e[2] for e in entries), *(e[3] for e in entries)
    )
    marker = FlatKL(kl, spec, len(entries))
    for (layer, name, mu, rho, _, _), sample in zip(entries, samples):
        state = layer.__dict__  # not nn.Module.__setattr__ (3 us per call)
        cache = state["_sample_cache"]
        if cache is None:
            cache = state["_sample_cache"] = {}
            opened.append(layer)
        cache[name] = sample
        # a checkpoint recomputation takes this sample again (no draw of its own to replay)
        # (the reads of earlier calls' samples are kept: two calls, then one backward)
        old = layer._replay.get(name)
        reads = FlatReads(maxlen=_REPLAY_STATES)
        if old is not None and isinstance(old[1], FlatReads) and old[1]:
            reads.extend(read for read in old[1] if read[2] is None or not read[2].spent)
        reads.spec = spec
        layer._replay[name] = (sample, reads)
        layer._pending_kl[name] = (marker, layer._kl_stamp(name, mu, rho))  # type: ignore[assignment]


def _spec(exp: bool, sizes: list[int], entries: list[_Entry]) -> FlatSpec:
    """The prior's numbers of ``entries``, read now in one operation (a write through
    ``.data`` to a prior buffer is seen), as scalars where all entries agree."""
    full = any(e[4].numel() != 1 for e in entries)
    scalars = [e[5] for e in entries] + [e[4] for e in entries if e[4].numel() == 1]
    with torch.no_grad():  # one C++ concatenation of the 0-d (or 1-element) buffers
        values = _flatten_dense_tensors(scalars).tolist()
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
    if torch.compiler.is_compiling():
        return
    stack = model.__dict__.get(_OPENED)
    if not stack:
        return
    for layer in stack.pop():
        layer.__dict__["_sample_cache"] = None
    if not stack:
        del model.__dict__[_OPENED]
