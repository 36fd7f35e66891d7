"""Hypothesis strategies that draw small random models (used by tests/test_properties.py).

:func:`model_specs` draws a spec for :func:`_generated.build_model` (the spec format and the
model families are described there), :func:`conversion_options` the keyword arguments of
:func:`dnn2bnn.transform_to_bnn_model`. Sizes are tiny so that one example costs milliseconds.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from torch import nn

__all__ = [
    "ESTIMATORS",
    "FAMILIES",
    "OWN_WEIGHT_KINDS",
    "PROBE_KINDS",
    "conversion_options",
    "kinds_of",
    "model_specs",
    "selected_types",
]

FAMILIES = ("vector", "seq-batch-first", "seq-first", "conv1d", "conv2d", "sequential")

VECTOR_KINDS = (
    "linear", "linear_scaled", "linear_twice", "shared", "alias", "mixed",
    "f_linear", "matmul", "einsum", "act", "layernorm",
)
#: the layers that mix along time are drawn four times as often as the others
SEQ_KINDS = VECTOR_KINDS + ("mha", "lstm", "gru", "conv_time") * 3
CONV_KINDS = ("conv", "conv_t", "conv_scaled", "shared", "alias", "mixed", "f_conv", "act")
#: blocks that read one weight twice per forward call and can probe it (see _generated)
PROBE_KINDS = ("linear_twice", "shared", "alias", "mixed", "f_linear", "matmul", "einsum", "f_conv")
#: blocks whose model-owned parameter is a weight (``_generated.OwnWeight``)
OWN_WEIGHT_KINDS = ("f_linear", "matmul", "einsum", "f_conv")

# Conversion: the default mapping, or the default plus the opt-in types these models use.
OPT_IN = (nn.Embedding, nn.LSTM, nn.GRU)


# ---------------------------------------------------------------------------- strategies
@st.composite
def _block(draw: st.DrawFn, kinds: tuple[str, ...]) -> dict[str, Any]:
    kind = draw(st.sampled_from(kinds))
    block: dict[str, Any] = {"kind": kind}
    if kind == "act":
        block["fn"] = draw(st.sampled_from(["relu", "tanh", "gelu"]))
    elif kind in ("linear", "conv", "conv_t"):
        block["bias"] = draw(st.booleans())
        if kind != "linear":
            block["depthwise"] = draw(st.booleans())
        if kind == "conv":
            block["padding_mode"] = draw(st.sampled_from(["zeros", "reflect", "circular"]))
    elif kind in ("lstm", "gru"):
        block["bidirectional"] = draw(st.booleans())
        block["layers"] = draw(st.sampled_from([1, 2]))
    elif kind == "mha":
        block["heads"] = draw(st.sampled_from([1, 2]))
        block["bias"] = draw(st.booleans())
        block["add_bias_kv"] = draw(st.booleans())
    return block


def kinds_of(family: str) -> tuple[str, ...]:
    """The block kinds a family draws from (none for ``"sequential"``)."""
    if family == "sequential":
        return ()
    if family.startswith("seq"):
        return SEQ_KINDS
    if family.startswith("conv"):
        return CONV_KINDS
    return VECTOR_KINDS if family == "vector" else ()


@st.composite
def model_specs(
    draw: st.DrawFn,
    families: tuple[str, ...] = FAMILIES,
    *,
    probe: tuple[str, ...] = (),
    require: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A spec for :func:`build_model`.

    Args:
        families: the families to draw from.
        probe: kinds (of ``PROBE_KINDS``) of which one block is inserted at a random
            position as the model's only probing block.
        require: kinds of which one (non-probing) block is inserted at a random position.
        exclude: kinds left out of the other, randomly drawn blocks.
        Families without any of the ``probe`` or ``require`` kinds are not drawn.
    """
    for needed in (probe, require):
        if needed:
            families = tuple(f for f in families if set(kinds_of(f)) & set(needed))
    family = draw(st.sampled_from(families))
    spec: dict[str, Any] = {"family": family, "seed": draw(st.integers(0, 2**16 - 1))}
    if family == "sequential":
        spec["variant"] = draw(st.sampled_from(["mlp", "cnn"]))
        spec["width"] = draw(st.sampled_from([3, 4]))
        spec["layers"] = draw(
            st.lists(st.sampled_from(["linear", "relu", "tanh", "reuse"]), max_size=4)
            if spec["variant"] == "mlp"
            else st.lists(st.sampled_from(["conv", "conv_t", "relu", "reuse"]), max_size=3)
        )
        spec["out"] = draw(st.sampled_from([1, 3]))
        return spec
    kinds = tuple(k for k in kinds_of(family) if k not in exclude)
    if family.startswith("seq"):
        spec["width"] = draw(st.sampled_from([4, 6]))
        spec["tokens"] = draw(st.booleans())
        spec["head"] = draw(st.sampled_from(["pool", "per_position"]))
    elif family.startswith("conv"):
        spec["width"] = draw(st.sampled_from([2, 3]))
    else:
        spec["width"] = draw(st.sampled_from([4, 6]))
    blocks = draw(st.lists(_block(kinds), min_size=1, max_size=4))
    for needed, probing in ((require, False), (probe, True)):
        if needed:
            block = draw(_block(tuple(k for k in kinds_of(family) if k in needed)))
            if probing:
                block["probe"] = True
            blocks.insert(draw(st.integers(0, len(blocks))), block)
    spec["blocks"] = blocks
    spec["container"] = draw(st.sampled_from(["sequential", "modulelist", "moduledict"]))
    spec["out"] = draw(st.sampled_from([1, 3]))
    return spec


ESTIMATORS = ("reparam", "flipout", "lrt")


@st.composite
def conversion_options(draw: st.DrawFn, estimators: tuple[str, ...] = ESTIMATORS) -> dict[str, Any]:
    """Keyword arguments of ``transform_to_bnn_model``: layer types and Bayesian options."""
    options: dict[str, Any] = {
        "posterior_sigma_init": draw(st.sampled_from([0.05, 0.2])),
        "estimator": draw(st.sampled_from(estimators)),
    }
    if draw(st.booleans()):
        options["layer_types"] = selected_types(opt_in=True)
    return options


def selected_types(*, opt_in: bool) -> list[type[nn.Module]]:
    """The layer types a conversion targets: default mapping, plus opt-in types used here."""
    from dnn2bnn import default_mapping

    return list(default_mapping()) + (list(OPT_IN) if opt_in else [])
