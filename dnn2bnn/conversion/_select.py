"""Which modules a conversion replaces, with which options: patterns, checks, bookkeeping."""

from __future__ import annotations

import fnmatch
import inspect
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from dnn2bnn.config import BayesConfig, BayesConfigMapping
from dnn2bnn.conversion._mapping import lookup
from dnn2bnn.layers._base import BayesianLayer, check_convertible, is_bayesian_layer
from dnn2bnn.layers.params import BayesianParameters

Patterns = str | Iterable[str] | None
ConfigArg = BayesConfig | BayesConfigMapping | None

__all__ = [
    "check_options",
    "config_mapping",
    "count_parameters",
    "filtered_out",
    "import_name",
    "matches",
    "parent_index",
    "pattern_list",
    "tied_parameters",
    "short_type_name",
    "unconvertible",
    "will_replace",
]


def filtered_out(names: list[str], include: list[str] | None, exclude: list[str] | None) -> str | None:
    """Why ``include``/``exclude`` leave a module out (``None``: they do not)."""
    if include is not None and not any(matches(n, include) for n in names):
        return "not matched by include"
    excluded = [p for p in exclude or () if any(matches(n, [p]) for n in names)]
    return f"excluded by {excluded[0]!r}" if excluded else None


def will_replace(
    module: nn.Module,
    mapping: Mapping[type[nn.Module], type[nn.Module]],
    include: list[str] | None,
    exclude: list[str] | None,
) -> tuple[str, ...]:
    """The parameters of ``module`` the conversion will clone into posterior means."""
    bnn_cls = lookup(mapping, type(module))
    if bnn_cls is None or not issubclass(bnn_cls, BayesianLayer) or is_bayesian_layer(module):
        return ()
    if include is not None or exclude is not None or unconvertible(bnn_cls, module):
        return ()  # filtered modules are rare: copy them as usual
    if issubclass(bnn_cls, BayesianParameters):
        return bnn_cls.select_params(module)
    return tuple(bnn_cls.bayes_params)


def unconvertible(
    bnn_cls: type[nn.Module], module: nn.Module, params: tuple[str, ...] | None = None
) -> str | None:
    if issubclass(bnn_cls, BayesianParameters):
        try:
            bnn_cls.check_module(module, params)
        except TypeError as exc:
            return str(exc)
    elif issubclass(bnn_cls, BayesianLayer):
        try:
            check_convertible(bnn_cls._bnn_base or bnn_cls, module)
        except TypeError as exc:
            return str(exc)
    return None


def config_mapping(
    config: ConfigArg, options: dict[str, Any], mapping: Mapping[type[nn.Module], type[nn.Module]]
) -> BayesConfigMapping:
    """One mapping from ``config=`` and the keyword shortcuts (validated here, up front)."""
    builtin = any(issubclass(c, BayesianLayer) for c in mapping.values())
    if isinstance(config, BayesConfigMapping):
        if options:
            raise TypeError(
                f"pass either a BayesConfigMapping as config= or keyword options "
                f"({sorted(options)}), not both; put them in the mapping's configs"
            )
        return config
    if config is not None and not isinstance(config, BayesConfig):
        raise TypeError(
            f"config must be a BayesConfig or a BayesConfigMapping, got {type(config).__name__}"
        )
    if config is not None and not builtin:
        raise TypeError("config= applies to built-in Bayesian layers; pass your class's options")
    if not builtin:
        return BayesConfigMapping()
    return BayesConfigMapping(BayesConfig.from_options(config, **options))


def check_options(bnn_cls: type[nn.Module], options: dict[str, Any]) -> None:
    signature = inspect.signature(bnn_cls.from_dnn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    allowed = [
        n for n, p in list(signature.parameters.items())[1:] if p.kind is not p.VAR_POSITIONAL
    ]
    for key in options:
        if key not in allowed:
            raise TypeError(
                f"unknown Bayesian option {key!r} for {bnn_cls.__name__}; expected one of {allowed}"
            )
    if issubclass(bnn_cls, BayesianLayer):
        bnn_cls.check_options(**options)


def pattern_list(kind: str, value: Patterns) -> list[str] | None:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{kind} patterns must be non-empty strings, got {pattern!r}")
    return patterns


def matches(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` or one of its ancestors ("a.b" for "a.b.c") matches a pattern."""
    parts = name.split(".") if name else [""]
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pattern) for p in prefixes for pattern in patterns)


def parent_index(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    index: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                index[id(child)].append((parent, attr))
    return index


def tied_parameters(
    module: nn.Module, names: list[str], param_names: dict[int, list[str]]
) -> list[str]:
    notes = []
    for attr, param in module._parameters.items():
        if param is None:
            continue
        own = {f"{alias}.{attr}" if alias else attr for alias in names}
        others = [n for n in param_names[id(param)] if n not in own]
        if others:
            notes.append(
                f"{sorted(own)[0]} was tied to {others[0]}; the Bayesian layer now has its own "
                f"posterior mean and {others[0]} stays deterministic"
            )
    return notes


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def import_name(cls: type) -> str:
    """``module:qualname`` of a class, the form :mod:`dnn2bnn.checkpoint` imports back."""
    return f"{cls.__module__}:{cls.__qualname__}"


def short_type_name(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.nn.modules"):
        module = "nn"
    return f"{module}.{cls.__qualname__}"
