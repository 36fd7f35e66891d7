"""Model-wide and layer-type conversion of a trained network into a Bayesian one."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from dnn2bnn.conversion import _sharing
from dnn2bnn.conversion._apply import apply_plan
from dnn2bnn.conversion._copy import copy_sharing, unshare_
from dnn2bnn.conversion._mapping import default_mapping, opt_in_mapping
from dnn2bnn.conversion._names import import_name, short_type_name
from dnn2bnn.conversion._params import select_parameters
from dnn2bnn.conversion._candidates import Action, ConversionPlan
from dnn2bnn.conversion._plan import check_finite, plan_conversion, will_replace
from dnn2bnn.conversion._request import (
    ConfigArg,
    LayerType,
    Patterns,
    Request,
    build_request,
    layer_type_mapping,
    resolve_layer_type,
)
from dnn2bnn.conversion._sharing import install_sample_sharing
from dnn2bnn.conversion._trace import analyse
from dnn2bnn.conversion.report import count_parameters, report_plan
from dnn2bnn.errors import ConversionError, ConversionWarning
from dnn2bnn.integrations._adopt import adopt_
from dnn2bnn.layers._base import BayesianLayer

__all__ = ["transform_to_bnn_layer", "transform_to_bnn_model"]

# The sample-sharing hooks lived here; pickles of models converted before refer to them here.
_open_sample_scope = _sharing._open_sample_scope
_close_sample_scope = _sharing._close_sample_scope


def transform_to_bnn_model(
    model: nn.Module,
    *,
    layer_types: LayerType | Iterable[LayerType] | None = None,
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
    mapping = layer_type_mapping(layer_types)
    call = {
        "function": "transform_to_bnn_model",
        "layer_types": None if layer_types is None else [import_name(t) for t in mapping],
        "params": None if params is None else ([params] if isinstance(params, str) else list(params)),
    }
    request = build_request(
        model,
        mapping=mapping,
        function="transform_to_bnn_model",
        explicit_types=layer_types is not None,
        include=include,
        exclude=exclude,
        config=config,
        options=bayes_options,
        params=params,
    )
    return _convert(model, request, inplace=inplace, strict=strict, call=call)


def transform_to_bnn_layer(
    model: nn.Module,
    dnn_layer_type: LayerType,
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
    dnn_layer_type = resolve_layer_type(dnn_layer_type, where="dnn_layer_type")
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
    call = {
        "function": "transform_to_bnn_layer",
        "dnn_layer_type": import_name(dnn_layer_type),
        "bnn_layer_type": import_name(bnn_layer_type),
    }
    request = build_request(
        model,
        mapping={dnn_layer_type: bnn_layer_type},
        function="transform_to_bnn_layer",
        explicit_types=True,
        include=include,
        exclude=exclude,
        config=config,
        options=bayes_options,
        params=None,
    )
    return _convert(model, request, inplace=inplace, strict=strict, call=call)


# ---------------------------------------------------------------------------- internals
def _convert(
    model: nn.Module, request: Request, *, inplace: bool, strict: bool, call: dict[str, Any]
) -> nn.Module:
    """copy -> trace -> plan -> check -> apply -> report -> warn."""
    target, shared = _target(model, request, inplace)
    request.selection = select_parameters(target, request.params)[0]
    trace = analyse(target, (*request.mapping.keys(), BayesianLayer))
    plan = plan_conversion(target, request, trace)
    _check(plan, strict)  # raises before anything changes
    params_before = count_parameters(target)
    result = apply_plan(target, plan, request.options)
    unshare_(result, shared)  # a copy never shares a tensor with the user's model
    call.update(
        include=request.include,
        exclude=request.exclude,
        strict=strict,
        config=request.config,
        options=dict(request.options),
        converted=[c.name for c in plan.having(Action.CONVERT)],
    )
    report = report_plan(plan, params_before=params_before, result=result, call=call)
    if report.shared:
        install_sample_sharing(result)
    _warn(plan, type(model).__name__)
    previous = result.__dict__.get("conversion_report")
    result.conversion_report = previous.merge(report) if previous is not None else report
    adopt_(result)  # e.g. a Hugging Face model's save_pretrained/tie_weights/resize_token_embeddings
    return result


def _target(model: nn.Module, request: Request, inplace: bool) -> tuple[nn.Module, set[int]]:
    """The module to convert: ``model`` itself, or a copy sharing the tensors to be replaced."""
    if inplace:
        return model, set()
    try:
        return copy_sharing(
            model, lambda m: will_replace(m, request.mapping, request.include, request.exclude)
        )
    except Exception as exc:
        raise ConversionError(
            f"cannot copy {type(model).__name__} ({exc}); pass inplace=True to convert "
            "the model itself"
        ) from exc


def _check(plan: ConversionPlan, strict: bool) -> None:
    check_finite(plan)
    refused = plan.having(Action.REFUSE)
    if strict and refused:
        listed = "; ".join(f"{c.name or '<root>'} ({c.type_name}): {c.reason}" for c in refused)
        raise ConversionError(f"strict conversion: {len(refused)} skipped: {listed}")


def _warn(plan: ConversionPlan, model_name: str) -> None:
    """The conversion's warnings: the tracing fallback, what was left deterministic although
    it carries weights, notes, and a conversion that converted nothing."""
    stacklevel = 4  # the caller of transform_to_bnn_model/transform_to_bnn_layer
    refused = plan.having(Action.REFUSE)
    unknown = [c for c in refused if c.parameter and not plan.trace.ok]
    if not plan.trace.ok:
        extra = ""
        if unknown:
            names = ", ".join(c.name for c in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            extra = (
                f"; {len(unknown)} parameter(s) of unknown use were left deterministic ({names})"
            )
        warnings.warn(
            f"dnn2bnn: torch.fx could not trace {model_name} ({plan.trace.failure}); "
            f"layers were found by walking the module tree instead{extra} (see conversion_report)",
            ConversionWarning,
            stacklevel=stacklevel,
        )
    items = [f"{c.name or '<root>'}: {c.reason}" for c in refused if c not in unknown]
    items += [n for c in plan.candidates for n in c.notes] + plan.notes
    if items:
        warnings.warn(
            "dnn2bnn: " + "; ".join(items) + " (see conversion_report)",
            ConversionWarning,
            stacklevel=stacklevel,
        )
    kept = [c for c in plan.having(Action.KEEP) if not c.left_out]
    if not plan.having(Action.CONVERT, Action.RECONFIGURE) and not kept:
        warnings.warn(
            f"dnn2bnn: nothing in {model_name} was converted: {_why_nothing(plan)}",
            ConversionWarning,
            stacklevel=stacklevel,
        )


def _why_nothing(plan: ConversionPlan) -> str:
    left = plan.having(Action.SKIP, Action.REFUSE) + [c for c in plan.having(Action.KEEP) if c.left_out]
    types = ", ".join(plan.requested) or "none"
    if not left:
        return f"it has no layer of the requested types ({types}) and no functional weight"
    if all(c.left_out for c in left):
        return f"every one of the {len(left)} candidate(s) was left out by include/exclude"
    reasons = "; ".join(f"{c.name or '<root>'}: {c.reason}" for c in left[:3])
    return f"{len(left)} candidate(s) left deterministic ({reasons})"
