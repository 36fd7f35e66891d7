"""One weight sample per call of the converted model for layers used more than once."""

from __future__ import annotations

from typing import Any

from torch import nn

from dnn2bnn.layers._base import BayesianLayer

__all__ = ["install_sample_sharing"]


def install_sample_sharing(model: nn.Module) -> None:
    """Make layers flagged ``_share_samples`` draw one weight sample per call of ``model``."""
    if _open_sample_scope not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_open_sample_scope)
        model.register_forward_hook(_close_sample_scope, always_call=True)


def _open_sample_scope(model: nn.Module, args: Any) -> None:
    for module in model.modules():
        if isinstance(module, BayesianLayer) and module._share_samples and module._sample_cache is None:
            module._sample_cache = {}


def _close_sample_scope(model: nn.Module, args: Any, output: Any) -> None:
    for module in model.modules():
        if isinstance(module, BayesianLayer):
            module._sample_cache = None
