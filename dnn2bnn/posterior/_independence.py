"""Warn when a model's output for one example depends on the other examples of its batch.

The per-example curvature (hooks or ``torch.func`` per example) is the Laplace posterior of
a network that treats every example on its own. A model that mixes examples in eval mode
(``BatchNorm(track_running_stats=False)``, a normalization over dim 0 in ``forward``) is a
different function of a batch of one than of a batch: ``fit_posterior`` would fit the former
silently. One extra forward pass of two examples and of one finds it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["BatchMixingWarning", "check_first_batch", "mixes_examples"]


class BatchMixingWarning(UserWarning):
    """The model's output for an example depends on the other examples of the batch."""


def mixes_examples(model: nn.Module, x: Tensor) -> bool:
    """Whether ``model``'s output for ``x[0]`` differs between the batch ``x[:2]`` and ``x[:1]``.

    ``False`` when it cannot tell (fewer than 2 examples, an output that is not a tensor, a
    forward that fails: the curvature pass reports those).
    """
    if x.shape[0] < 2:
        return False
    try:
        with torch.no_grad():
            pair, single = model(x[:2]), model(x[:1])
    except Exception:  # noqa: BLE001 (the curvature pass raises the model's own error)
        return False
    if not (isinstance(pair, Tensor) and isinstance(single, Tensor)) or pair.shape[1:] != single.shape[1:]:
        return False
    a, b = pair[:1].double(), single.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1e-6))


def check_first_batch(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``batches`` unchanged, warning once if the first one of 2+ examples shows mixing.

    The model must already be at its posterior means in eval mode.
    """
    checked = False
    for x, y in batches:
        if not checked and x.shape[0] >= 2:
            checked = True
            if mixes_examples(model, x):
                warnings.warn(
                    f"fit_posterior: the output of {type(model).__name__} for an example changes with the "
                    "other examples of its batch (at the posterior means, in eval mode: batch statistics "
                    "such as BatchNorm(track_running_stats=False), or a reduction over dim 0 in forward); "
                    "the curvature treats each example on its own, so the fitted sigmas are not the "
                    "Laplace posterior of the network that runs on batches",
                    BatchMixingWarning,
                    stacklevel=2,
                )
        yield x, y
