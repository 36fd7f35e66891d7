"""What a conversion call asks for, validated before anything is copied or changed."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from dnn2bnn.config import BayesConfig, BayesConfigMapping, _real
from dnn2bnn.conversion._mapping import default_mapping, opt_in_mapping
from dnn2bnn.conversion._names import matches, short_type_name
from dnn2bnn.conversion._params import ParamSelection, select_parameters
from dnn2bnn.errors import ConversionError
from dnn2bnn.layers._base import BayesianLayer
from dnn2bnn.layers.params import BayesianParameters

__all__ = [
    "ConfigArg",
    "LayerType",
    "Patterns",
    "Request",
    "build_request",
    "check_options",
    "layer_type_mapping",
    "resolve_layer_type",
]

_REAL_OPTIONS = ("prior_mean", "prior_sigma", "posterior_sigma_init", "moped_delta")

Patterns = str | Iterable[str] | None
ConfigArg = BayesConfig | BayesConfigMapping | None
#: A layer type, or its name: ``"Linear"``, ``"nn.Linear"``, ``"torch.nn.Linear"``,
#: ``"package.module:Class"``.
LayerType = type[nn.Module] | str


@dataclass
class Request:
    """What the caller asked for, validated."""

    mapping: Mapping[type[nn.Module], type[nn.Module]]
    #: ``"transform_to_bnn_model"`` or ``"transform_to_bnn_layer"``.
    function: str
    #: Whether ``layer_types`` (or ``transform_to_bnn_layer``'s type) chose the types.
    explicit_types: bool
    include: list[str] | None
    exclude: list[str] | None
    config: ConfigArg
    options: dict[str, Any]
    config_map: BayesConfigMapping
    #: The ``params=`` patterns, and what they select (set on the model being converted).
    params: Patterns = None
    selection: ParamSelection | None = None

    @property
    def options_given(self) -> bool:
        return bool(self.options) or self.config is not None

    def filtered_out(self, names: Iterable[str]) -> str | None:
        """Why ``include``/``exclude`` leave a module out (``None``: they do not)."""
        names = list(names)
        if self.include is not None and not any(matches(n, self.include) for n in names):
            return "not matched by include"
        excluded = [p for p in self.exclude or () if any(matches(n, [p]) for n in names)]
        return f"excluded by {excluded[0]!r}" if excluded else None


def build_request(
    model: nn.Module,
    *,
    mapping: Mapping[type[nn.Module], type[nn.Module]],
    function: str,
    explicit_types: bool,
    include: Patterns,
    exclude: Patterns,
    config: ConfigArg,
    options: dict[str, Any],
    params: Patterns,
) -> Request:
    """Validate every argument of a conversion call against ``model``; raise on a bad one."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__qualname__}")
    include_patterns = _pattern_list("include", include)
    exclude_patterns = _pattern_list("exclude", exclude)
    config_map = _config_mapping(
        config, options, {**mapping, nn.Module: BayesianParameters} if params else mapping
    )
    for bnn_cls in set(mapping.values()):
        if not issubclass(bnn_cls, BayesianLayer):
            check_options(bnn_cls, options)
    if any(issubclass(c, BayesianLayer) for c in mapping.values()):
        # numpy scalars and 0-d tensors are recorded (and saved) as the floats they are
        options = {
            k: _real(k, v) if k in _REAL_OPTIONS and v is not None else v
            for k, v in options.items()
        }
    select_parameters(model, params)  # a pattern matching nothing fails here
    names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    for kind, patterns in (("include", include_patterns), ("exclude", exclude_patterns)):
        for pattern in patterns or ():
            if not any(matches(name, [pattern]) for name in names):
                raise ConversionError(
                    f"{kind} pattern {pattern!r} matches no module of {type(model).__name__}; "
                    f"module names look like {[n for n in names if n][:8]}"
                )
    for pattern in config_map.unmatched_patterns(names):
        raise ConversionError(
            f"config name pattern {pattern!r} matches no module of {type(model).__name__}; "
            f"module names look like {[n for n in names if n][:8]}"
        )
    return Request(
        mapping=dict(mapping),
        function=function,
        explicit_types=explicit_types,
        include=include_patterns,
        exclude=exclude_patterns,
        config=config,
        options=dict(options),
        config_map=config_map,
        params=params,
    )


def layer_type_mapping(
    layer_types: LayerType | Iterable[LayerType] | None,
) -> dict[type[nn.Module], type[nn.Module]]:
    """The ``{layer type: Bayesian type}`` mapping ``layer_types`` chooses (default: all
    default types)."""
    mapping = default_mapping()
    if layer_types is None:
        return mapping
    if isinstance(layer_types, (type, str)):
        layer_types = [layer_types]
    known = {**mapping, **opt_in_mapping()}
    chosen = {}
    for entry in layer_types:
        layer_type = resolve_layer_type(entry, where="layer_types")
        if layer_type not in known:
            raise TypeError(
                f"layer_types: no Bayesian layer for {short_type_name(layer_type)}; expected "
                f"some of {[short_type_name(t) for t in known]} (or name its parameters in "
                "params=)"
            )
        chosen[layer_type] = known[layer_type]
    return chosen


def resolve_layer_type(entry: Any, *, where: str) -> type[nn.Module]:
    """A layer class from a class or a name (``"Linear"``, ``"torch.nn.Linear"``,
    ``"package.module:Class"``); ``TypeError`` naming the entry otherwise."""
    if isinstance(entry, type) and issubclass(entry, nn.Module):
        return entry
    expected = (
        "an nn.Module subclass or its name ('Linear', 'torch.nn.Linear', "
        "'package.module:Class')"
    )
    if not isinstance(entry, str) or not entry:
        raise TypeError(f"{where}: expected {expected}, got {type(entry).__name__} {entry!r}")
    found = _find_class(entry)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        why = "found nothing" if found is None else f"found {found!r}, not an nn.Module subclass"
        raise TypeError(f"{where}: expected {expected}, got {entry!r} ({why})")
    return found


def _find_class(name: str) -> Any:
    if ":" in name:
        module_name, _, qualname = name.partition(":")
    else:
        for prefix in ("torch.nn.", "nn."):
            if name.startswith(prefix) and "." not in name[len(prefix) :]:
                name = name[len(prefix) :]
        if "." not in name:
            for cls in (*default_mapping(), *opt_in_mapping()):
                if cls.__name__ == name:
                    return cls
            return getattr(nn, name, None)
        module_name, _, qualname = name.rpartition(".")
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in qualname.split("."):
        value = getattr(value, part, None)
    return value


def check_options(bnn_cls: type[nn.Module], options: dict[str, Any]) -> None:
    """Raise ``TypeError`` for an option a user-written converter's ``from_dnn`` does not take."""
    signature = inspect.signature(bnn_cls.from_dnn)  # type: ignore[attr-defined]
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


def _config_mapping(
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


def _pattern_list(kind: str, value: Patterns) -> list[str] | None:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{kind} patterns must be non-empty strings, got {pattern!r}")
    return patterns
