"""Helpers for training Bayesian models with torch.distributed (DDP, FSDP2).

Converted models need nothing special under ``DistributedDataParallel``: each rank samples
weights from its replica's posterior, computes the KL from its replica (identical on all
ranks) and DDP averages the gradients. Two things are worth doing, and are described in
``docs/distributed.md``:

* seed each rank differently (:func:`seed_rank`), otherwise every rank draws the *same*
  weight noise and the extra ranks add no Monte Carlo samples;
* scale the KL by the size of the *global* training set
  (``WithBNNLoss.elbo(..., num_train_examples=len(dataset))``, not ``len(sampler)``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["get_rank", "seed_rank"]


def get_rank() -> int:
    """This process's global rank: from the default process group when one is initialized,
    else from the ``RANK`` environment variable set by ``torchrun``, else 0.

    Example:
        >>> dnn2bnn.distributed.get_rank()  # a single process
        0
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    value = os.environ.get("RANK")
    if value is None:
        return 0
    try:
        rank = int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable RANK must be an integer, got {value!r}") from exc
    if rank < 0:
        raise ValueError(f"environment variable RANK must be >= 0, got {rank}")
    return rank


def seed_rank(seed: int) -> int:
    """Seed torch's generators (CPU and every CUDA device) with ``seed + rank``.

    Call it on every rank once the process group is up (or under ``torchrun``, which sets
    ``RANK``). Each rank then draws its own weight noise, and a rerun with the same seed and
    world size draws the same noise again. Build the model before calling it, or rely on
    DDP, which copies rank 0's parameters to every rank when it wraps the model.

    Args:
        seed: the base seed, shared by all ranks (a non-negative int).

    Returns:
        The seed this rank used, ``seed + rank``.

    Example:
        >>> used = dnn2bnn.distributed.seed_rank(1234)  # rank 0 of a single process
        >>> a = torch.randn(2)
        >>> _ = dnn2bnn.distributed.seed_rank(1234)
        >>> used, torch.equal(a, torch.randn(2))
        (1234, True)
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    used = seed + get_rank()
    torch.manual_seed(used)  # also seeds every CUDA device
    return used


def _gather_kl(term: Tensor) -> Tensor:
    """A plain tensor for a layer's KL: sums FSDP2's per-shard partial sums across ranks."""
    full_tensor = getattr(term, "full_tensor", None)  # a DTensor (torch.distributed.tensor)
    return full_tensor() if callable(full_tensor) else term
