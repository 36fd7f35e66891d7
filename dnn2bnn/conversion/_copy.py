"""Copying a model for conversion without copying the tensors conversion replaces anyway.

A Bayesian layer clones each trained tensor into its posterior mean. Deep-copying the
model first would copy those tensors twice. Here the deep copy *shares* them with the
user's model (the conversion then pops and clones them, leaving the user's model intact),
and :func:`unshare_` copies any that were not converted after all.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterable

from torch import nn

__all__ = ["copy_sharing", "unshare_"]


def copy_sharing(
    model: nn.Module, will_replace: Callable[[nn.Module], Iterable[str]]
) -> tuple[nn.Module, set[int]]:
    """A deep copy of ``model`` sharing the parameters ``will_replace(module)`` names.

    Only parameters held by exactly one module under one name are shared (a tied parameter
    is copied as usual). Returns the copy and the ids of the shared parameters.
    """
    holders = Counter(
        id(p) for m in model.modules() for p in m._parameters.values() if p is not None
    )
    memo: dict[int, object] = {}
    for module in model.modules():
        for name in will_replace(module):
            value = module._parameters.get(name)
            if value is not None and holders[id(value)] == 1:
                memo[id(value)] = value
    shared = set(memo)
    for module in model.modules():
        for value in module._buffers.values():
            if isinstance(value, nn.parameter.UninitializedBuffer):
                # torch cannot deep-copy these; a lazy module gets a fresh one, as it had
                memo[id(value)] = nn.parameter.UninitializedBuffer(
                    requires_grad=value.requires_grad, device=value.device, dtype=value.dtype
                )
    return copy.deepcopy(model, memo), shared


def unshare_(model: nn.Module, shared: set[int]) -> None:
    """Give ``model`` its own copy of every shared parameter it still holds."""
    if not shared:
        return
    for module in model.modules():
        replaced = False
        for name, value in list(module._parameters.items()):
            if value is not None and id(value) in shared:
                module._parameters[name] = copy.deepcopy(value)
                replaced = True
        if replaced and isinstance(module, nn.RNNBase):
            module._init_flat_weights()
