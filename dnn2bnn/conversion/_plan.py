"""Deciding what a conversion does, before anything changes.

:func:`plan_conversion` looks at every module and every weight-like parameter of a model and
returns a :class:`ConversionPlan`: one :class:`Candidate` per module (or parameter) with the
decision (:class:`Action`) and the reason. :func:`dnn2bnn.conversion._apply.apply_plan`
carries it out and :func:`dnn2bnn.conversion.report.report_plan` writes it down.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from dnn2bnn.config import BayesConfig, BayesConfigMapping
from dnn2bnn.conversion._mapping import default_mapping, lookup, opt_in_mapping
from dnn2bnn.conversion._names import short_type_name
from dnn2bnn.conversion._params import resolve
from dnn2bnn.conversion._request import Request
from dnn2bnn.conversion._trace import ParamUse, TraceInfo
from dnn2bnn.errors import ConversionError
from dnn2bnn.layers._base import BayesianLayer, check_convertible, is_bayesian_layer
from dnn2bnn.layers.params import BayesianParameters

__all__ = [
    "Action",
    "Candidate",
    "ConversionPlan",
    "bayes_param_names",
    "check_finite",
    "plan_conversion",
    "will_replace",
]


class Action(str, Enum):
    """What the conversion does with one candidate."""

    #: Made Bayesian.
    CONVERT = "convert"
    #: Already Bayesian; the new options are applied to it.
    RECONFIGURE = "reconfigure"
    #: Already Bayesian and no option was given: left as it is.
    KEEP = "keep"
    #: Left deterministic as asked (include/exclude, layer_types, a config of None).
    SKIP = "skip"
    #: Left deterministic although it carries weights: warned about; ``strict`` raises.
    REFUSE = "refuse"


@dataclass
class Candidate:
    """One module (or one parameter, ``parameter=True``) and what happens to it."""

    module: nn.Module
    #: Qualified names: the module's (all of them when it is shared), or the parameter's.
    names: tuple[str, ...]
    type_name: str
    action: Action
    reason: str = ""
    #: The converter (CONVERT) and, for parameter-level ones, the parameters it converts.
    bnn_cls: type[nn.Module] | None = None
    params: tuple[str, ...] | None = None
    #: The configuration (CONVERT, RECONFIGURE); ``None`` for a user-written converter.
    config: BayesConfig | None = None
    #: RECONFIGURE: whether sigma is re-initialised from the new configuration.
    reset_sigma: bool = False
    parameter: bool = False
    #: Whether include/exclude left it out (SKIP, or KEEP for a Bayesian layer).
    left_out: bool = False
    notes: list[str] = field(default_factory=list)
    #: Filled in by apply_plan: the module after conversion, and what a re-configuration changed.
    result: nn.Module | None = None
    changes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass
class ConversionPlan:
    """Every decision of one conversion call, in module-tree order."""

    candidates: list[Candidate]
    trace: TraceInfo
    #: Notes about the model as a whole (broken weight tying).
    notes: list[str] = field(default_factory=list)
    #: The requested layer types, for messages.
    requested: tuple[str, ...] = ()

    def having(self, *actions: Action) -> list[Candidate]:
        """The candidates with one of ``actions``."""
        return [c for c in self.candidates if c.action in actions]


# ---------------------------------------------------------------------------- the plan
def plan_conversion(model: nn.Module, request: Request, trace: TraceInfo) -> ConversionPlan:
    """Decide, for every module and weight-like parameter of ``model``, what to do and why.

    Steps: functional weights (raw parameters feeding linear/conv/matmul calls) are chosen
    for their owners; then every module is a layer to convert, a Bayesian layer to
    re-configure, or nothing; then parameters nobody covers are listed (uninitialized
    ones; those of unknown use when tracing failed); then weight tying is described.
    Nothing in ``model`` changes.
    """
    index = _Index(model)
    functional, entries = _functional_weights(model, request, trace, index)
    candidates: list[Candidate] = []
    for module, names in index.modules():
        if is_bayesian_layer(module):
            candidate = _bayesian_candidate(module, names, request)
        else:
            candidate = _layer_candidate(module, names, request, functional.get(id(module), {}))
        if candidate is not None:
            candidates.append(candidate)
    candidates += entries
    candidates += _uninitialized(index, candidates)
    if not trace.ok:
        candidates += _unknown_uses(index, candidates)
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


def bayes_param_names(candidate: Candidate) -> tuple[str, ...]:
    """The parameters of ``candidate.module`` that the conversion makes Bayesian."""
    cls = candidate.bnn_cls
    if cls is None:
        return ()
    if issubclass(cls, BayesianParameters):
        return candidate.params or cls.select_params(candidate.module)
    if issubclass(cls, BayesianLayer):
        return tuple(cls.bayes_params)
    return ()


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
class _Index:
    """Names of the modules and parameters of a model (a module or tensor may have several)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.module_names: dict[int, list[str]] = defaultdict(list)
        self._modules: dict[int, nn.Module] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.module_names[id(module)].append(name)
            self._modules.setdefault(id(module), module)
        self.param_names: dict[int, list[str]] = defaultdict(list)
        self.param_owner: dict[str, tuple[nn.Module, str]] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            for attr, value in module._parameters.items():
                if value is not None:
                    full = f"{prefix}.{attr}" if prefix else attr
                    self.param_names[id(value)].append(full)
                    self.param_owner[full] = (module, attr)

    def modules(self) -> Iterator[tuple[nn.Module, tuple[str, ...]]]:
        for key, module in self._modules.items():
            yield module, tuple(self.module_names[key])


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
        return Candidate(
            module,
            names,
            type_name,
            Action.REFUSE,
            "a user-written Bayesian layer: the new options cannot be applied to it",
        )
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


def _functional_weights(
    model: nn.Module, request: Request, trace: TraceInfo, index: _Index
) -> tuple[dict[int, dict[str, str]], list[Candidate]]:
    """Raw parameters used as weights: ``{id(owner): {attr: why}}`` to convert, and the
    entries of those left deterministic."""
    known = {**default_mapping(), **opt_in_mapping()}
    chosen: dict[int, dict[str, str]] = defaultdict(dict)
    entries: list[Candidate] = []
    weights: dict[str, str] = {}
    biases: dict[str, list[ParamUse]] = {}
    for name, uses in trace.param_uses.items():
        owner, attr = index.param_owner[name]
        value = owner._parameters[attr]
        if attr in (request.selection or {}).get(id(owner), ()):
            weights[name] = _describe(uses)  # chosen by params= anyway
            continue

        def entry(action: Action, reason: str, owner: nn.Module = owner, name: str = name) -> None:
            entries.append(Candidate(owner, (name,), "nn.Parameter", action, reason, parameter=True))

        main = [u for u in uses if u.slot != "bias"]
        what = _describe(main or uses)
        if is_bayesian_layer(owner):
            entry(Action.REFUSE, f"{what}; its owner is already Bayesian; left deterministic")
            continue
        if request.function == "transform_to_bnn_layer":
            entry(Action.SKIP, f"{what}; transform_to_bnn_layer converts only the layers of its type")
            continue
        owner_names = tuple(index.module_names[id(owner)])
        owner_type = lookup(known, type(owner))
        if owner_type is not None and request.explicit_types and lookup(request.mapping, type(owner)) is None:
            entry(Action.SKIP, f"{what}; its owner ({short_type_name(type(owner))}) is not in layer_types")
            continue
        filtered = request.filtered_out(owner_names)
        if filtered is not None:
            entries.append(
                Candidate(
                    owner, (name,), "nn.Parameter", Action.SKIP, f"{what}; its owner is {filtered}",
                    parameter=True, left_out=True,
                )
            )
            continue
        if isinstance(value, nn.parameter.UninitializedParameter):
            entry(Action.REFUSE, f"{what}; uninitialized (lazy); run one forward pass before converting")
            continue
        if main and (any(u.slot == "weight" for u in main) or value.dim() >= 2):
            weights[name] = what
        elif main:
            entry(
                Action.REFUSE,
                f"{what}, a {value.dim()}-d tensor (not a weight matrix); left deterministic "
                "(name it in params= to make it Bayesian)",
            )
        else:
            biases[name] = uses
    for name, uses in biases.items():
        partners = {p for u in uses for p in u.partners}
        converted = any(p in weights or p not in trace.param_uses for p in partners)
        what = _describe(uses)
        if converted:
            weights[name] = what
        else:
            owner = index.param_owner[name][0]
            entries.append(
                Candidate(
                    owner,
                    (name,),
                    "nn.Parameter",
                    Action.REFUSE,
                    f"{what} whose weight stays deterministic; left deterministic "
                    "(name it in params= to make it Bayesian)",
                    parameter=True,
                )
            )
    for name, what in weights.items():
        owner, attr = index.param_owner[name]
        chosen[id(owner)][attr] = what
    return dict(chosen), entries


def _describe(uses: list[ParamUse]) -> str:
    labels = {"weight": "the weight of", "operand": "an operand of", "bias": "the bias of"}
    parts = list(dict.fromkeys(f"{labels[u.slot]} {u.function}()" for u in uses))
    return "used as " + " and ".join(parts)


def _uninitialized(index: _Index, candidates: list[Candidate]) -> list[Candidate]:
    """Lazy (uninitialized) parameters no candidate already speaks for."""
    covered = {id(c.module) for c in candidates if not c.parameter}
    covered_params = {c.name for c in candidates if c.parameter}
    entries = []
    for name, (owner, attr) in index.param_owner.items():
        value = owner._parameters[attr]
        if not isinstance(value, nn.parameter.UninitializedParameter):
            continue
        if id(owner) in covered or name in covered_params:
            continue
        entries.append(
            Candidate(
                owner,
                (name,),
                "nn.Parameter",
                Action.REFUSE,
                f"uninitialized (a lazy {type(owner).__qualname__}); run one forward pass before "
                "converting",
                parameter=True,
            )
        )
    return entries


def _unknown_uses(index: _Index, candidates: list[Candidate]) -> list[Candidate]:
    """Without a trace, the parameters of modules that are no torch.nn layer: use unknown."""
    covered = {id(c.module) for c in candidates}
    entries = []
    for name, (owner, attr) in index.param_owner.items():
        if id(owner) in covered or is_bayesian_layer(owner) or _is_torch_layer(owner):
            continue
        entries.append(
            Candidate(
                owner,
                (name,),
                "nn.Parameter",
                Action.REFUSE,
                "tracing failed, so how the forward uses it is unknown; left deterministic "
                "(name it in params= to make it Bayesian)",
                parameter=True,
            )
        )
    return entries


def _is_torch_layer(module: nn.Module) -> bool:
    return any(
        k.__module__.startswith("torch.") and k is not nn.Module
        for k in type(module).__mro__[:-1]
    )


def _tie_notes(plan: ConversionPlan, index: _Index) -> list[str]:
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
