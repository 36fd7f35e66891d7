"""Model-wide and layer-type conversion of a trained network into a Bayesian one."""

from __future__ import annotations

import warnings
from collections import defaultdict
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from dnn2bnn.conversion._copy import copy_sharing, unshare_
from dnn2bnn.conversion._mapping import default_mapping, lookup, opt_in_mapping
from dnn2bnn.conversion._params import resolve, select_parameters
from dnn2bnn.conversion._select import (
    ConfigArg,
    Patterns,
    check_options,
    config_mapping,
    count_parameters,
    filtered_out,
    import_name,
    matches,
    parent_index,
    pattern_list,
    tied_parameters,
    short_type_name,
    unconvertible,
    will_replace,
)
from dnn2bnn.conversion import _sharing
from dnn2bnn.conversion._sharing import install_sample_sharing
from dnn2bnn.conversion._trace import analyse
from dnn2bnn.conversion.report import ConversionReport, ConvertedModule, SkippedModule
from dnn2bnn.errors import ConversionError, ConversionWarning
from dnn2bnn.layers._base import BayesianLayer, is_bayesian_layer
from dnn2bnn.layers.params import BayesianParameters

__all__ = ["transform_to_bnn_layer", "transform_to_bnn_model"]

# The sample-sharing hooks lived here; pickles of models converted before refer to them here.
_open_sample_scope = _sharing._open_sample_scope
_close_sample_scope = _sharing._close_sample_scope


def transform_to_bnn_model(
    model: nn.Module,
    *,
    layer_types: Iterable[type[nn.Module]] | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
    params: Patterns = None,
    inplace: bool = False,
    strict: bool = False,
    config: ConfigArg = None,
    **bayes_options: Any,
) -> nn.Module:
    """Convert the Linear, convolution and attention layers of a trained model into Bayesian ones.

    The model's forward is traced with torch.fx to find the layers it calls, the layers it
    uses more than once (they draw one weight sample per forward call) and the parameters it
    passes to ``F.linear``/``F.conv*`` itself. Layers are then converted where they stand, so
    the result is the user's own class with the same submodule names, attributes, buffers,
    hooks and non-converted parameters; posterior means start at the trained weights.
    When tracing fails (e.g. data-dependent control flow), layers are found by walking the
    module tree instead; this is warned once and written in the report.

    Layer types match exactly or through the class hierarchy (a subclass of ``nn.Linear``
    converts like ``nn.Linear`` and keeps its own ``forward``), never by name. See
    ``docs/conversion.md`` for the coverage of torchvision, timm and Hugging Face models.

    Args:
        model: the trained network. Not modified unless ``inplace=True``.
        layer_types: layer types to convert (default: all of :func:`dnn2bnn.default_mapping`:
            Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, MultiheadAttention, and GPT-2's
            ``Conv1D`` once ``transformers`` is imported). Types of
            :func:`dnn2bnn.opt_in_mapping` (Embedding, LayerNorm, BatchNorm, LSTM, GRU, ...)
            are converted only when named here.
        include: qualified-name glob patterns (``"fc"``, ``"layer4.*"``); only modules
            matching one of them, or inside a matching module, are converted.
        exclude: patterns of modules to leave deterministic (applied after ``include``).
        params: qualified parameter names or globs (``"blocks.0.attn.qkv.weight"``,
            ``"*.pos_embed"``) to make Bayesian wherever they are, in addition to the layer
            types: their owner module becomes a :class:`dnn2bnn.BayesianParameters`. Not
            filtered by ``include``/``exclude``. A pattern matching nothing is an error.
        inplace: convert ``model`` itself instead of a deep copy.
        strict: raise :class:`ConversionError` instead of skipping a layer that cannot be
            converted.
        config: a :class:`BayesConfig` for every layer, or a :class:`BayesConfigMapping`
            choosing one per layer (name pattern > module type > global).
        **bayes_options: keyword shortcuts for the common case, applied to every layer
            (cannot be combined with a ``BayesConfigMapping``): ``prior``, ``prior_mean``,
            ``prior_sigma``, ``posterior_sigma_init``, ``moped_delta``, ``estimator``.

    Returns:
        The Bayesian model; its ``conversion_report`` attribute is a
        :class:`ConversionReport`.

    Example:
        >>> dnn = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> bnn = transform_to_bnn_model(dnn, prior_sigma=0.1, estimator="flipout")
        >>> type(bnn[0]).__name__, len(bnn.conversion_report.converted)
        ('BayesLinear', 2)
    """
    mapping = default_mapping()
    if layer_types is not None:
        if isinstance(layer_types, type):
            layer_types = [layer_types]
        known = {**mapping, **opt_in_mapping()}
        chosen = {}
        for layer_type in layer_types:
            if layer_type not in known:
                raise TypeError(
                    f"layer_types: no Bayesian layer for {short_type_name(layer_type)}; expected "
                    f"some of {[short_type_name(t) for t in known]} (or name its parameters in "
                    "params=)"
                )
            chosen[layer_type] = known[layer_type]
        mapping = chosen
    call = {
        "function": "transform_to_bnn_model",
        "layer_types": None if layer_types is None else [import_name(t) for t in mapping],
        "params": None if params is None else ([params] if isinstance(params, str) else list(params)),
    }
    return _convert(
        model, mapping, include, exclude, inplace, strict, config, bayes_options, call, params
    )


def transform_to_bnn_layer(
    model: nn.Module,
    dnn_layer_type: type[nn.Module],
    bnn_layer_type: type[nn.Module] | None = None,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    inplace: bool = False,
    strict: bool = False,
    config: ConfigArg = None,
    **bayes_options: Any,
) -> nn.Module:
    """Convert only the layers of one type, e.g. ``nn.Linear`` -> ``BayesLinear``.

    Args:
        model: the trained network. Not modified unless ``inplace=True``.
        dnn_layer_type: the torch.nn layer type to convert (subclasses included).
        bnn_layer_type: the Bayesian type to convert into; default: the built-in one.
            A user-written class works if it follows the layer protocol: a classmethod
            ``from_dnn(module, **options)`` returning the new module, and ``kl()``.
        include: as in :func:`transform_to_bnn_model`.
        exclude: as in :func:`transform_to_bnn_model`.
        inplace: as in :func:`transform_to_bnn_model`.
        strict: as in :func:`transform_to_bnn_model`.
        config: as in :func:`transform_to_bnn_model`; only with built-in Bayesian types.
        **bayes_options: as in :func:`transform_to_bnn_model`; a user-written class receives
            them as they are.

    Example:
        >>> dnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> bnn = transform_to_bnn_layer(dnn, torch.nn.Linear)
        >>> [type(m).__name__ for m in bnn]
        ['Conv2d', 'Flatten', 'BayesLinear']
    """
    if not (isinstance(dnn_layer_type, type) and issubclass(dnn_layer_type, nn.Module)):
        raise TypeError(f"dnn_layer_type must be an nn.Module subclass, got {dnn_layer_type!r}")
    if bnn_layer_type is None:
        known = {**default_mapping(), **opt_in_mapping()}
        bnn_layer_type = known.get(dnn_layer_type)
        if bnn_layer_type is None:
            raise TypeError(
                f"no built-in Bayesian layer for {short_type_name(dnn_layer_type)}; pass "
                f"bnn_layer_type (built-in: {[short_type_name(t) for t in known]})"
            )
    elif not (
        isinstance(bnn_layer_type, type)
        and callable(getattr(bnn_layer_type, "from_dnn", None))
        and callable(getattr(bnn_layer_type, "kl", None))
    ):
        raise TypeError(
            "bnn_layer_type must be a class with a from_dnn(module, **options) classmethod "
            f"and a kl() method, got {bnn_layer_type!r}"
        )
    mapping = {dnn_layer_type: bnn_layer_type}
    call = {
        "function": "transform_to_bnn_layer",
        "dnn_layer_type": import_name(dnn_layer_type),
        "bnn_layer_type": import_name(bnn_layer_type),
    }
    return _convert(
        model, mapping, include, exclude, inplace, strict, config, bayes_options, call, None
    )


# ---------------------------------------------------------------------------- internals
def _convert(
    model: nn.Module,
    mapping: Mapping[type[nn.Module], type[nn.Module]],
    include: Patterns,
    exclude: Patterns,
    inplace: bool,
    strict: bool,
    config: ConfigArg,
    options: dict[str, Any],
    call: dict[str, Any],
    params: Patterns,
) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__qualname__}")
    include_patterns = pattern_list("include", include)
    exclude_patterns = pattern_list("exclude", exclude)
    config_map = config_mapping(
        config, options, {**mapping, nn.Module: BayesianParameters} if params else mapping
    )
    for bnn_cls in set(mapping.values()):
        if not issubclass(bnn_cls, BayesianLayer):
            check_options(bnn_cls, options)
    select_parameters(model, params)  # fail on a bad pattern before copying

    names_by_id: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        names_by_id[id(module)].append(name)
    all_names = [n for names in names_by_id.values() for n in names]
    for kind, patterns in (("include", include_patterns), ("exclude", exclude_patterns)):
        for pattern in patterns or ():
            if not any(matches(name, [pattern]) for name in all_names):
                raise ConversionError(
                    f"{kind} pattern {pattern!r} matches no module of {type(model).__name__}; "
                    f"module names look like {[n for n in all_names if n][:8]}"
                )
    for pattern in config_map.unmatched_patterns(all_names):
        raise ConversionError(
            f"config name pattern {pattern!r} matches no module of {type(model).__name__}; "
            f"module names look like {[n for n in all_names if n][:8]}"
        )

    shared: set[int] = set()
    if inplace:
        target = model
    else:
        try:
            target, shared = copy_sharing(
                model, lambda m: will_replace(m, mapping, include_patterns, exclude_patterns)
            )
        except Exception as exc:
            raise ConversionError(
                f"cannot copy {type(model).__name__} ({exc}); pass inplace=True to convert "
                "the model itself"
            ) from exc

    call.update(
        include=include_patterns,
        exclude=exclude_patterns,
        strict=strict,
        config=config,
        options=dict(options),
    )
    report = ConversionReport(params_before=count_parameters(target), calls=[call])
    selection, selected_names = select_parameters(target, params)
    leaf_types = (*mapping.keys(), BayesianLayer)
    trace = analyse(target, leaf_types)
    if not trace.ok:
        report.method, report.fallback_reason = "module tree", trace.failure
        warnings.warn(
            f"dnn2bnn: torch.fx could not trace {type(model).__name__} ({trace.failure}); "
            "layers were found by walking the module tree instead (see conversion_report)",
            ConversionWarning,
            stacklevel=3,
        )

    names_by_id = defaultdict(list)
    for name, module in target.named_modules(remove_duplicate=False):
        names_by_id[id(module)].append(name)
    param_names: dict[int, list[str]] = defaultdict(list)
    for name, param in target.named_parameters(remove_duplicate=False):
        param_names[id(param)].append(name)
    parents = parent_index(target)

    unexpected: list[SkippedModule] = []
    result = target
    for module in list({id(m): m for m in target.modules()}.values()):
        if is_bayesian_layer(module):
            continue
        bnn_cls = lookup(mapping, type(module))
        chosen = selection.get(id(module))
        if bnn_cls is None and not chosen:
            continue
        names = names_by_id[id(module)]
        name, type_name = names[0], short_type_name(type(module))
        filtered = filtered_out(names, include_patterns, exclude_patterns) if bnn_cls else None
        if filtered is not None and not chosen:
            report.skipped.append(SkippedModule(name, type_name, filtered))
            continue
        own_params: tuple[str, ...] | None = None
        if chosen:
            bnn_cls, own_params = resolve(None if filtered else bnn_cls, module, chosen, name)
        reason = unconvertible(bnn_cls, module, own_params)
        if reason is not None:
            skip = SkippedModule(name, type_name, reason)
            report.skipped.append(skip)
            unexpected.append(skip)
            continue
        tied = tied_parameters(module, names, param_names)
        if issubclass(bnn_cls, BayesianLayer):
            layer_config = config_map.config_for(names, type(module))
            if layer_config is None:
                report.skipped.append(SkippedModule(name, type_name, "configured None"))
                continue
            fallback = bnn_cls.estimator_fallback(type(module), layer_config)
            if fallback is not None:
                tied.append(f"{name}: {fallback}")
                layer_config = dataclasses.replace(layer_config, estimator="reparam")
        try:
            if issubclass(bnn_cls, BayesianParameters):
                new = bnn_cls._convert_(module, params=own_params, config=layer_config)
            elif issubclass(bnn_cls, BayesianLayer):
                new = bnn_cls._convert_(module, config=layer_config)
            else:
                new = bnn_cls.from_dnn(module, **options)
        except (TypeError, ValueError) as exc:
            raise ConversionError(
                f"converting {name or '<root>'} ({type_name}) to {bnn_cls.__name__} failed: {exc}"
            ) from exc
        if new is not module:
            for parent, attr in parents[id(module)]:
                setattr(parent, attr, new)
            if module is target:
                result = new
        uses = trace.uses.get(id(module), 0)
        report.converted.append(
            ConvertedModule(
                name,
                type_name,
                type(new).__name__,
                (uses > 0) if trace.ok else None,
                tuple(new.bayes_params) if isinstance(new, BayesianParameters) else (),
            )
        )
        if uses > 1 or len(names) > 1:
            report.shared.append(name)
            if isinstance(new, BayesianLayer):
                new._share_samples = True
        for note in tied:
            report.notes.append(note)

    for param_name, function in trace.raw_weights:
        if param_name in selected_names:
            continue
        skip = SkippedModule(
            param_name,
            "nn.Parameter",
            f"used directly by {function}() and owned by no convertible layer; left deterministic",
        )
        report.skipped.append(skip)
        unexpected.append(skip)

    unshare_(result, shared)  # a copy never shares a tensor with the user's model
    if strict and unexpected:
        listed = "; ".join(f"{s.name or '<root>'} ({s.type}): {s.reason}" for s in unexpected)
        raise ConversionError(f"strict conversion: {len(unexpected)} skipped: {listed}")
    if unexpected or report.notes:
        items = [f"{s.name or '<root>'}: {s.reason}" for s in unexpected] + report.notes
        warnings.warn(
            "dnn2bnn: " + "; ".join(items) + " (see conversion_report)",
            ConversionWarning,
            stacklevel=3,
        )
    call["converted"] = [c.name for c in report.converted]
    if report.shared:
        install_sample_sharing(result)
    report.params_after = count_parameters(result)
    previous = result.__dict__.get("conversion_report")
    result.conversion_report = previous.merge(report) if previous is not None else report
    return result
