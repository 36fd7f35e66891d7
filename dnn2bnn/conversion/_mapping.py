"""Which layer becomes which Bayesian layer: plain typed data.

Two tables. The *default* mapping is what :func:`dnn2bnn.transform_to_bnn_model` converts
unless told otherwise: the layers whose weights carry a network's function (linear,
convolution, transposed convolution, attention projections). The *opt-in* mapping holds
layers that users sometimes want Bayesian too (embeddings, normalization affines,
recurrent weights); name them in ``layer_types`` to convert them.
"""

from __future__ import annotations

import sys

from torch import nn

from dnn2bnn.layers import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    BayesLinear,
    BayesMultiheadAttention,
    parameter_converter,
)

__all__ = ["default_mapping", "opt_in_mapping"]

_DEFAULT_MAPPING: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: BayesLinear,
    nn.Conv1d: BayesConv1d,
    nn.Conv2d: BayesConv2d,
    nn.Conv3d: BayesConv3d,
    nn.ConvTranspose1d: BayesConvTranspose1d,
    nn.ConvTranspose2d: BayesConvTranspose2d,
    nn.ConvTranspose3d: BayesConvTranspose3d,
    nn.MultiheadAttention: BayesMultiheadAttention,
}

#: Opt-in types and the parameters that become Bayesian (``None``: all their own).
_OPT_IN: dict[type[nn.Module], tuple[str, ...] | None] = {
    nn.Embedding: ("weight",),
    nn.EmbeddingBag: ("weight",),
    nn.LayerNorm: ("weight", "bias"),
    nn.GroupNorm: ("weight", "bias"),
    nn.RMSNorm: ("weight",),
    nn.BatchNorm1d: ("weight", "bias"),
    nn.BatchNorm2d: ("weight", "bias"),
    nn.BatchNorm3d: ("weight", "bias"),
    nn.InstanceNorm1d: ("weight", "bias"),
    nn.InstanceNorm2d: ("weight", "bias"),
    nn.InstanceNorm3d: ("weight", "bias"),
    nn.LSTM: None,
    nn.GRU: None,
    nn.RNN: None,
    nn.LSTMCell: None,
    nn.GRUCell: None,
    nn.RNNCell: None,
}


def _third_party() -> dict[type[nn.Module], type[nn.Module]]:
    """Entries for layers of libraries the user has imported (never imported here)."""
    found: dict[type[nn.Module], type[nn.Module]] = {}
    hf = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(hf, "Conv1D", None)
    if isinstance(conv1d, type) and issubclass(conv1d, nn.Module):
        # GPT-2's Conv1D is a Linear with a transposed [in, out] weight.
        found[conv1d] = parameter_converter(conv1d, ("weight", "bias"))
    return found


def default_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """A copy of the default ``{layer type: Bayesian type}`` mapping.

    Holds ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
    ``nn.MultiheadAttention`` and, once ``transformers`` has been imported, Hugging Face's
    GPT-2 ``Conv1D``.

    Example:
        >>> default_mapping()[torch.nn.Linear].__name__
        'BayesLinear'
    """
    return {**_DEFAULT_MAPPING, **_third_party()}


def opt_in_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """A copy of the mapping of layers converted only when named in ``layer_types``.

    Embeddings (``weight``), LayerNorm/GroupNorm/RMSNorm/BatchNorm/InstanceNorm (their
    affine ``weight``/``bias``, when present) and LSTM/GRU/RNN and their cells (every
    weight and bias).

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(
        ...     torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)),
        ...     layer_types=[torch.nn.Embedding, torch.nn.Linear],
        ... )
        >>> [type(m).__name__ for m in bnn]
        ['BayesEmbedding', 'BayesLinear']
    """
    return {t: parameter_converter(t, names) for t, names in _OPT_IN.items()}


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
