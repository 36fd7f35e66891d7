"""Which torch.nn layer becomes which Bayesian layer: plain typed data."""

from __future__ import annotations

from torch import nn

from dnn2bnn.layers import BayesConv1d, BayesConv2d, BayesConv3d, BayesLinear

__all__ = ["default_mapping"]

_DEFAULT_MAPPING: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: BayesLinear,
    nn.Conv1d: BayesConv1d,
    nn.Conv2d: BayesConv2d,
    nn.Conv3d: BayesConv3d,
}


def default_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """A copy of the default ``{torch.nn type: Bayesian type}`` mapping.

    Example:
        >>> default_mapping()[torch.nn.Linear].__name__
        'BayesLinear'
    """
    return dict(_DEFAULT_MAPPING)


def lookup(mapping: dict[type[nn.Module], type[nn.Module]], cls: type) -> type[nn.Module] | None:
    """The mapping entry for ``cls``: its exact type first, else its nearest mapped base class.

    Subclasses are matched deliberately through the class hierarchy (never by name), so a
    user's ``class MyLinear(nn.Linear)`` converts like ``nn.Linear`` while keeping its own
    ``forward``.
    """
    for klass in cls.__mro__:
        if klass in mapping:
            return mapping[klass]
    return None
