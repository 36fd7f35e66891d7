"""Batches of ``(input, target)`` for fit_posterior, and the validation examples held out of them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["HoldOut", "as_batches", "count_batches"]

DEFAULT_BATCH_SIZE = 256


def as_batches(data: Any, *, batch_size: int = DEFAULT_BATCH_SIZE, what: str = "data") -> Iterable[tuple[Tensor, Tensor]]:
    """``(input, target)`` batches from a pair of tensors or an iterable of batches.

    Raises ``TypeError`` saying what was expected when ``data`` is neither.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        inputs, targets = data
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"fit_posterior: {what} inputs and targets must have the same length, got "
                f"{inputs.shape[0]} and {targets.shape[0]}"
            )
        if inputs.shape[0] == 0:
            return []
        return list(zip(inputs.split(batch_size), targets.split(batch_size)))
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"fit_posterior: {what} must be a pair (inputs, targets) of tensors or an iterable of "
            f"(input, target) batches such as a DataLoader, got {type(data).__name__}"
        )
    return _pairs(data, what)


def _pairs(data: Iterable[Any], what: str) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor)):
            raise TypeError(
                f"fit_posterior: each batch of {what} must be a tuple or list (input, target, ...) whose "
                f"input is a tensor (dict inputs are not supported), got {_describe(batch)}"
            )
        if batch[0].shape[0] == 0:
            continue
        yield batch[0], torch.as_tensor(batch[1])


def _describe(batch: Any) -> str:
    """``Tensor``, or ``a tuple of 2 (dict, Tensor)`` for a sequence batch."""
    if isinstance(batch, (tuple, list)):
        kinds = ", ".join(type(b).__name__ for b in batch)
        return f"a {type(batch).__name__} of {len(batch)} ({kinds})"
    return type(batch).__name__


def count_batches(data: Any) -> int | None:
    """The number of batches when known (for the progress bar)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return None
    try:
        return len(data)
    except TypeError:
        return None


class HoldOut:
    """Yields the training part of each batch and keeps its last examples for validation.

    From each batch the last ``round(fraction * len(batch))`` examples are held out, until
    ``max_examples`` are kept (the rest of the data then goes to the curvature whole).
    """

    def __init__(self, fraction: float, max_examples: int) -> None:
        self.fraction = fraction
        self.max_examples = max_examples
        self.inputs: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.count = 0

    def __call__(self, batches: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in batches:
            size = x.shape[0]
            keep = min(round(self.fraction * size), self.max_examples - self.count, size - 1)
            if keep > 0:
                self.inputs.append(x[size - keep :])
                self.targets.append(y[size - keep :])
                self.count += keep
                x, y = x[: size - keep], y[: size - keep]
            yield x, y

    def batches(self) -> list[tuple[Tensor, Tensor]]:
        """The held-out examples, batch by batch."""
        return list(zip(self.inputs, self.targets))
