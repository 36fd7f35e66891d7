"""Collect the model outputs of several draws into ``[S, B, ...]`` tensors (of any nesting)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["concat_draws", "stack_draws"]


def concat_draws(parts: list[Any]) -> Any:
    """Join ``[k, B, ...]`` outputs of several chunks of draws along the sample dimension."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(concat_draws([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat_draws([p[k] for p in parts]) for k in first}
    if isinstance(first, torch.distributions.Normal):
        return torch.distributions.Normal(
            torch.cat([p.loc for p in parts]), torch.cat([p.scale for p in parts])
        )
    raise TypeError(
        f"cannot collect model outputs of type {type(first).__name__}: pass output_fn= to pick "
        "the prediction (a tensor, a (mean, log_variance) pair or a Normal)"
    )


def stack_draws(outputs: list[Any]) -> Any:
    """Stack the outputs of the ``S`` passes of the loop into ``[S, B, ...]``."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.stack(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(stack_draws([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, torch.distributions.Normal):
        return torch.distributions.Normal(
            torch.stack([o.loc for o in outputs]), torch.stack([o.scale for o in outputs])
        )
    raise TypeError(
        f"cannot collect model outputs of type {type(first).__name__}: pass output_fn= to pick "
        "the prediction (a tensor, a (mean, log_variance) pair or a Normal)"
    )
