"""Deciding what a conversion does, before anything changes.

:func:`plan_conversion` looks at every module and every weight-like parameter of a model and
returns a :class:`ConversionPlan`: one :class:`Candidate` per module (or parameter) with the
decision (:class:`Action`) and the reason. :func:`dnn2bnn.conversion._apply.apply_plan`
carries it out and :func:`dnn2bnn.conversion.report.report_plan` writes it down.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from dnn2bnn.config import BayesConfig, BayesConfigMapping, Estimator
from dnn2bnn.conversion._candidates import (
    Action,
    Candidate,
    ConversionPlan,
    ModelIndex,
    bayes_param_names,
)
from dnn2bnn.conversion._functional import functional_weights, uninitialized, unknown_uses
from dnn2bnn.conversion._mapping import lookup
from dnn2bnn.conversion._names import short_type_name
from dnn2bnn.conversion._params import resolve
from dnn2bnn.conversion._request import Request
from dnn2bnn.conversion._trace import TraceInfo
from dnn2bnn.errors import ConversionError
from dnn2bnn.layers._base import BayesianLayer, check_convertible, is_bayesian_layer
from dnn2bnn.layers.params import BayesianParameters

__all__ = ["check_finite", "plan_conversion", "will_replace"]


# ---------------------------------------------------------------------------- the plan
def plan_conversion(model: nn.Module, request: Request, trace: TraceInfo) -> ConversionPlan:
    """Decide, for every module and weight-like parameter of ``model``, what to do and why.

    Steps: functional weights (raw parameters feeding linear/conv/matmul calls) are chosen
    for their owners; then every module is a layer to convert, a Bayesian layer to
    re-configure, or nothing; then parameters nobody covers are listed (uninitialized
    ones; those of unknown use when tracing failed); then weight tying is described.
    Nothing in ``model`` changes.
    """
    index = ModelIndex(model)
    functional, entries = functional_weights(request, trace, index)
    candidates: list[Candidate] = []
    for module, names in index.modules():
        if is_bayesian_layer(module):
            candidate = _bayesian_candidate(module, names, request)
        else:
            candidate = _layer_candidate(module, names, request, functional.get(id(module), {}))
        if candidate is not None:
            candidates.append(candidate)
    candidates += entries
    _share_one_sample(candidates, trace)
    candidates += uninitialized(index, candidates)
    if not trace.ok:
        candidates += unknown_uses(index, candidates)
    plan = ConversionPlan(
        candidates,
        trace,
        requested=tuple(short_type_name(t) for t in request.mapping),
    )
    plan.notes = _tie_notes(plan, index)
    return plan


def check_finite(plan: ConversionPlan) -> None:
    """Refuse to convert a parameter holding NaN or inf (its KL would be NaN)."""
    for candidate in plan.having(Action.CONVERT):
        for attr in bayes_param_names(candidate):
            value = candidate.module._parameters.get(attr)
            if value is None or value.is_meta or not value.is_floating_point():
                continue
            if torch.isfinite(value.detach().sum()):  # one pass, no temporary; NaN/inf propagate
                continue
            bad = (~torch.isfinite(value.detach())).sum().item()
            if bad:  # (else only the sum overflowed)
                raise ConversionError(
                    f"{candidate.name or '<root>'}.{attr} ({candidate.type_name}) holds {bad} "
                    f"NaN or infinite value(s) of {value.numel()}; a Bayesian layer needs finite "
                    "means (its KL would be NaN). Fix or exclude the layer (exclude=...) first"
                )


def will_replace(
    module: nn.Module,
    mapping: Mapping[type[nn.Module], type[nn.Module]],
    include: list[str] | None,
    exclude: list[str] | None,
) -> tuple[str, ...]:
    """The parameters of ``module`` the conversion will clone into posterior means (a hint
    for copying; filtered or unusual modules answer ``()`` and are copied as usual)."""
    bnn_cls = lookup(mapping, type(module))
    if bnn_cls is None or not issubclass(bnn_cls, BayesianLayer) or is_bayesian_layer(module):
        return ()
    if include is not None or exclude is not None or _unconvertible(bnn_cls, module):
        return ()
    if issubclass(bnn_cls, BayesianParameters):
        return bnn_cls.select_params(module)
    return tuple(bnn_cls.bayes_params)


# ---------------------------------------------------------------------------- steps
def _layer_candidate(
    module: nn.Module,
    names: tuple[str, ...],
    request: Request,
    functional: dict[str, str],
) -> Candidate | None:
    """A module of a requested type, or one owning parameters chosen by ``params=`` or used
    as functional weights."""
    bnn_cls = lookup(request.mapping, type(module))
    selected = (request.selection or {}).get(id(module), ())
    chosen = tuple(dict.fromkeys((*selected, *functional)))
    if bnn_cls is None and not chosen:
        return None
    name, type_name = names[0], short_type_name(type(module))
    filtered = request.filtered_out(names) if bnn_cls is not None else None
    if filtered is not None and not chosen:
        return Candidate(module, names, type_name, Action.SKIP, filtered, left_out=True)
    params: tuple[str, ...] | None = None
    if chosen:
        bnn_cls, params = resolve(None if filtered else bnn_cls, module, chosen, name)
    assert bnn_cls is not None
    reason = _unconvertible(bnn_cls, module, params)
    if reason is not None:
        return Candidate(module, names, type_name, Action.REFUSE, reason)
    why = "; ".join(f"{attr}: {use}" for attr, use in functional.items())
    candidate = Candidate(module, names, type_name, Action.CONVERT, why, bnn_cls, params)
    if issubclass(bnn_cls, BayesianLayer):
        config = request.config_map.config_for(list(names), type(module))
        if config is None:
            return Candidate(module, names, type_name, Action.SKIP, "configured None")
        fallback = bnn_cls.estimator_fallback(type(module), config)
        if fallback is not None:
            candidate.notes.append(f"{name}: {fallback}")
            config = dataclasses.replace(config, estimator="reparam")
        candidate.config = config
    return candidate


def _bayesian_candidate(
    module: nn.Module, names: tuple[str, ...], request: Request
) -> Candidate | None:
    """An already Bayesian layer: re-configured with the new options, or kept."""
    type_name = short_type_name(type(module))
    filtered = request.filtered_out(names)
    if filtered is not None:
        reason = f"already Bayesian; {filtered}"
        return Candidate(module, names, type_name, Action.KEEP, reason, left_out=True)
    if not isinstance(module, BayesianLayer):  # user-written: no configuration to change
        if not request.options_given:
            return Candidate(module, names, type_name, Action.KEEP, "already Bayesian")
        kept = Candidate(module, names, type_name, Action.KEEP, "already Bayesian")
        kept.notes.append(
            f"{names[0] or '<root>'}: a user-written Bayesian layer; the new options were not "
            "applied to it (it has no BayesConfig)"
        )
        return kept
    dnn_type = type(module).dnn_type
    if request.explicit_types and lookup(request.mapping, dnn_type) is None:
        return None
    if not request.options_given:
        return Candidate(module, names, type_name, Action.KEEP, "already Bayesian")
    old = module.bayes_config
    options = request.options
    if isinstance(request.config, BayesConfigMapping):
        config = request.config.config_for(list(names), dnn_type)
        if config is None:
            return Candidate(
                module, names, type_name, Action.KEEP, "configured None; already Bayesian, left as it is"
            )
    elif request.config is not None:
        config = BayesConfig.from_options(request.config, **options)
    else:
        config = BayesConfig.from_options(old, **options)
        if "posterior_sigma_init" in options and "moped_delta" not in options:
            config = dataclasses.replace(config, moped_delta=None)
    init = (config.posterior_sigma_init, config.moped_delta)
    reset = (
        "posterior_sigma_init" in options
        or "moped_delta" in options
        or init != (old.posterior_sigma_init, old.moped_delta)
    )
    candidate = Candidate(
        module, names, type_name, Action.RECONFIGURE, "already Bayesian", type(module), None, config, reset
    )
    fallback = type(module).estimator_fallback(dnn_type, config)
    if fallback is not None:
        candidate.notes.append(f"{names[0]}: {fallback}")
        candidate.config = dataclasses.replace(config, estimator="reparam")
    return candidate


def _share_one_sample(candidates: list[Candidate], trace: TraceInfo) -> None:
    """Give a layer used more than once per call the 'reparam' estimator.

    A shared layer draws one weight sample per call of the model; 'flipout' and 'lrt'
    draw fresh noise at every use instead (sign flips, pre-activation noise), so the uses
    would not agree. Such layers fall back to 'reparam', with a note (warned and reported).
    """
    for candidate in candidates:
        config = candidate.config
        if candidate.action not in (Action.CONVERT, Action.RECONFIGURE) or config is None:
            continue
        if config.estimator is Estimator.REPARAM:
            continue
        uses = trace.uses.get(id(candidate.module), 0)
        if uses <= 1 and len(candidate.names) <= 1:
            continue
        how = f"used {uses} times per forward call" if uses > 1 else (
            f"reachable as {', '.join(n or '<root>' for n in candidate.names)}"
        )
        candidate.notes.append(
            f"{candidate.name or '<root>'}: shared ({how}), so estimator "
            f"{config.estimator.value!r} would draw independent noise at each use; it uses "
            "'reparam' instead (one weight sample per forward call)"
        )
        candidate.config = dataclasses.replace(config, estimator=Estimator.REPARAM)


def _tie_notes(plan: ConversionPlan, index: ModelIndex) -> list[str]:
    """What happens to parameters tied between modules (one tensor under several names)."""
    becoming: dict[str, bool] = {}
    for candidate in plan.having(Action.CONVERT):
        for alias in candidate.names:
            for attr in bayes_param_names(candidate):
                becoming[f"{alias}.{attr}" if alias else attr] = True
    notes: list[str] = []
    reported: set[frozenset[str]] = set()
    for candidate in plan.having(Action.CONVERT):
        for attr in bayes_param_names(candidate):
            value = candidate.module._parameters.get(attr)
            if value is None:
                continue
            names = index.param_names[id(value)]
            own = {f"{a}.{attr}" if a else attr for a in candidate.names}
            others = [n for n in names if n not in own]
            if not others:
                continue
            mine = sorted(own)[0]
            other = others[0]
            if becoming.get(other):
                pair = frozenset((mine, other))
                if pair in reported:
                    continue
                reported.add(pair)
                notes.append(
                    f"{mine} was tied to {other}; both became Bayesian, each with its own "
                    "posterior (the tie is not kept)"
                )
            else:
                notes.append(
                    f"{mine} was tied to {other}; the Bayesian layer now has its own posterior "
                    f"mean and {other} stays deterministic"
                )
    return notes


def _unconvertible(
    bnn_cls: type[nn.Module], module: nn.Module, params: tuple[str, ...] | None = None
) -> str | None:
    """Why ``bnn_cls`` cannot convert ``module`` (``None`` when it can)."""
    try:
        if issubclass(bnn_cls, BayesianParameters):
            bnn_cls.check_module(module, params)
        elif issubclass(bnn_cls, BayesianLayer):
            check_convertible(bnn_cls._bnn_base or bnn_cls, module)
    except TypeError as exc:
        return str(exc)
    return None
