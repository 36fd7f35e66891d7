"""Parameters that act as weights without a convertible layer around them.

* functional weights: a module's own parameter reaching the weight, an operand or the bias of
  a linear/convolution/matrix-product call in the traced forward (see ``_trace.py``);
* uninitialized (lazy) parameters anywhere in the model;
* after the tracing fallback, parameters of modules that are no torch.nn layer, whose use is
  unknown.

Each is chosen for conversion on its owner module, or becomes a parameter-level
:class:`~dnn2bnn.conversion._candidates.Candidate` saying why it stays deterministic.
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from dnn2bnn.conversion._candidates import Action, Candidate, ModelIndex
from dnn2bnn.conversion._mapping import default_mapping, lookup, opt_in_mapping
from dnn2bnn.conversion._names import short_type_name
from dnn2bnn.conversion._request import Request
from dnn2bnn.conversion._trace import ParamUse, TraceInfo
from dnn2bnn.layers._base import is_bayesian_layer

__all__ = ["functional_weights", "uninitialized", "unknown_uses"]


def _parameter_entry(
    owner: nn.Module, name: str, action: Action, reason: str, *, left_out: bool = False
) -> Candidate:
    """The plan entry of the raw parameter ``name`` (owned by ``owner``) left as it is."""
    return Candidate(
        owner, (name,), "nn.Parameter", action, reason, parameter=True, left_out=left_out
    )


def functional_weights(
    request: Request, trace: TraceInfo, index: ModelIndex
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
            entries.append(_parameter_entry(owner, name, action, reason))

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
                _parameter_entry(
                    owner, name, Action.SKIP, f"{what}; its owner is {filtered}", left_out=True
                )
            )
            continue
        if isinstance(value, nn.parameter.UninitializedParameter):
            entry(Action.REFUSE, f"{what}; uninitialized (lazy); run one forward pass before converting")
            continue
        if main and all(u.slot == "table" for u in main):
            # Like nn.Embedding, a lookup table is opt-in: reported, never silently left out.
            entry(Action.SKIP, f"{what}; embedding tables are opt-in: name it in params= to make it Bayesian")
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
                _parameter_entry(
                    owner,
                    name,
                    Action.REFUSE,
                    f"{what} whose weight stays deterministic; left deterministic "
                    "(name it in params= to make it Bayesian)",
                )
            )
    for name, what in weights.items():
        owner, attr = index.param_owner[name]
        chosen[id(owner)][attr] = what
    return dict(chosen), entries


def _describe(uses: list[ParamUse]) -> str:
    labels = {
        "weight": "the weight of",
        "operand": "an operand of",
        "bias": "the bias of",
        "table": "the table of",
    }
    parts = list(dict.fromkeys(f"{labels[u.slot]} {u.function}()" for u in uses))
    return "used as " + " and ".join(parts)


def uninitialized(index: ModelIndex, candidates: list[Candidate]) -> list[Candidate]:
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
            _parameter_entry(
                owner,
                name,
                Action.REFUSE,
                f"uninitialized (a lazy {type(owner).__qualname__}); run one forward pass before "
                "converting",
            )
        )
    return entries


def unknown_uses(index: ModelIndex, candidates: list[Candidate]) -> list[Candidate]:
    """Without a trace, the parameters of modules that are no torch.nn layer: use unknown."""
    covered = {id(c.module) for c in candidates}
    entries = []
    for name, (owner, attr) in index.param_owner.items():
        if id(owner) in covered or is_bayesian_layer(owner) or _is_torch_layer(owner):
            continue
        entries.append(
            _parameter_entry(
                owner,
                name,
                Action.REFUSE,
                "tracing failed, so how the forward uses it is unknown; left deterministic "
                "(name it in params= to make it Bayesian)",
            )
        )
    return entries


def _is_torch_layer(module: nn.Module) -> bool:
    return any(
        k.__module__.startswith("torch.") and k is not nn.Module
        for k in type(module).__mro__[:-1]
    )
