"""The ``params=`` option of the conversion: Bayesian treatment of any named parameter."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from dnn2bnn.errors import ConversionError
from dnn2bnn.layers._base import BayesianLayer, is_bayesian_layer
from dnn2bnn.layers.params import BayesianParameters

__all__ = ["ParamSelection", "resolve", "select_parameters"]

#: id(owner module) -> names of its own parameters chosen by ``params=``.
ParamSelection = dict[int, tuple[str, ...]]


def _check_patterns(params: str | Iterable[str] | None) -> list[str]:
    if params is None:
        return []
    patterns = [params] if isinstance(params, str) else list(params)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(
                f"params must be qualified parameter names or glob patterns "
                f"('blocks.0.attn.qkv.weight', '*.pos_embed'), got {pattern!r}"
            )
    return patterns


def select_parameters(
    model: nn.Module, params: str | Iterable[str] | None
) -> tuple[ParamSelection, set[str]]:
    """Match ``params`` (qualified-name globs) against ``model``'s parameters.

    Returns the selection by owner module and the qualified names selected. Parameters of
    layers that are Bayesian already are not candidates. A pattern matching nothing is a
    :class:`ConversionError`.
    """
    patterns = _check_patterns(params)
    if not patterns:
        return {}, set()
    chosen: dict[int, list[str]] = {}
    qualified: set[str] = set()
    hits = dict.fromkeys(patterns, 0)
    examples: list[str] = []
    for prefix, owner in model.named_modules(remove_duplicate=False):
        if is_bayesian_layer(owner):
            continue
        for name, value in owner._parameters.items():
            if value is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            examples.append(full)
            matched = [p for p in patterns if fnmatch.fnmatchcase(full, p)]
            for pattern in matched:
                hits[pattern] += 1
            if matched:
                qualified.add(full)
                names = chosen.setdefault(id(owner), [])
                if name not in names:
                    names.append(name)
    for pattern, count in hits.items():
        if count == 0:
            raise ConversionError(
                f"params pattern {pattern!r} matches no parameter of {type(model).__name__}; "
                f"parameter names look like {examples[:6]}"
            )
    return {key: tuple(names) for key, names in chosen.items()}, qualified


def resolve(
    bnn_cls: type[nn.Module] | None, module: nn.Module, chosen: tuple[str, ...], where: str
) -> tuple[type[nn.Module], tuple[str, ...] | None]:
    """The converter and its ``params`` argument when ``params=`` chose some of ``module``'s.

    A parameter-level converter from the mapping gets the union of its own choice and
    ``chosen``; a layer-level Bayesian class already covering ``chosen`` is kept; with no
    mapping entry, :class:`BayesianParameters` converts exactly ``chosen``.
    """
    if bnn_cls is None:
        return BayesianParameters, chosen
    if issubclass(bnn_cls, BayesianParameters):
        wanted = set(bnn_cls.select_params(module)) | set(chosen)
        return bnn_cls, tuple(n for n in module._parameters if n in wanted)
    if issubclass(bnn_cls, BayesianLayer) and set(chosen) <= set(bnn_cls.bayes_params):
        return bnn_cls, None
    raise ConversionError(
        f"params: {where} ({type(module).__qualname__}) is converted by {bnn_cls.__name__}, "
        f"which does not cover {list(chosen)}; exclude the layer or choose other parameters"
    )
