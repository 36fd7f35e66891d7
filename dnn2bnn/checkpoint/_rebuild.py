"""Rebuilding a BNN from its checkpoint metadata, and checking at save time that it can be.

``load_bnn`` builds the recorded architecture, replays the recorded conversion calls and
restores each Bayesian layer's recorded state (estimator, mode). ``save_bnn`` does the
same on the meta device (no memory, no weights) before it writes anything, and compares the
result with the model being saved: if they differ, the file would not load, so it is not
written.
"""

from __future__ import annotations

import dataclasses
import warnings
from enum import Enum
from typing import Any

import torch
from torch import nn

from dnn2bnn.checkpoint._arch import build_arch, module_class, origin_class, spec_of
from dnn2bnn.checkpoint._codec import decode, encode, split_name
from dnn2bnn.checkpoint._tree import TREE_SPEC, record_tree
from dnn2bnn.config import Parametrization
from dnn2bnn.conversion import transform_to_bnn_layer, transform_to_bnn_model
from dnn2bnn.errors import CheckpointError, ConversionWarning
from dnn2bnn.layers import BayesianLayer
from dnn2bnn.layers._state import LEGACY_PARAMETRIZATION

__all__ = [
    "LAYER_STATE",
    "check_rebuild",
    "infer_arch",
    "layer_states",
    "rebuild",
    "replay_calls",
    "legacy_calls",
    "restore_parametrizations_",
]

#: Per-layer attributes stored in the checkpoint. ``estimator``, ``bayes_mode`` and
#: ``prior`` can change after conversion (``set_estimator``, ``set_mode``, a posterior fit
#: that writes its prior) and are restored; a checkpoint without one of them keeps what the
#: replayed conversion gives. The ``parametrization`` decides how ``rho`` is read (a mismatch
#: would be silently wrong) and its default changed (``"exp"`` since issue 17), so the
#: replayed conversion cannot give it: it is restored from the record, and a layer recorded
#: without one (a checkpoint written before parametrizations existed) is ``"softplus"``.
LAYER_STATE = ("estimator", "bayes_mode", "prior", "parametrization")
_RESTORED = ("estimator", "bayes_mode", "prior")
_SHOWN = 5


def infer_arch(model: nn.Module, arch_kwargs: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """How to rebuild ``model`` when ``save_bnn`` got no ``arch``.

    A Hugging Face ``PreTrainedModel`` is rebuilt from its config, a tree of torch.nn
    containers and layers from its recorded tree, anything else from its class called
    with ``arch_kwargs``.
    """
    config = getattr(model, "config", None)
    if arch_kwargs is None and callable(getattr(config, "to_dict", None)) and hasattr(
        type(model), "config_class"
    ):
        return spec_of(model), {"config": config.to_dict()}
    if arch_kwargs is None and origin_class(model).__module__.startswith("torch.nn."):
        return TREE_SPEC, {"tree": record_tree(model)}
    return spec_of(model), dict(arch_kwargs or {})


def replay_calls(model: nn.Module, calls: list[dict[str, Any]]) -> nn.Module:
    """Apply recorded conversion calls to ``model`` in place; returns the (new) root."""
    for call in calls:
        common = {
            "include": call.get("include"),
            "exclude": call.get("exclude"),
            "strict": call.get("strict", False),
            "inplace": True,
            **decode(call.get("options", {})),
        }
        if call.get("config") is not None:
            common["config"] = decode(call["config"])
        if call["function"] == "transform_to_bnn_model":
            names = call.get("layer_types")
            types = None if names is None else [module_class(*split_name(n)) for n in names]
            params = call.get("params")
            model = transform_to_bnn_model(model, layer_types=types, params=params, **common)
        elif call["function"] == "transform_to_bnn_layer":
            dnn_type = module_class(*split_name(call["dnn_layer_type"]))
            bnn_type = module_class(*split_name(call["bnn_layer_type"]))
            model = transform_to_bnn_layer(model, dnn_type, bnn_type, **common)
        else:
            raise CheckpointError(f"unknown recorded conversion function {call['function']!r}")
    return model


def layer_states(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each Bayesian layer's :data:`LAYER_STATE` attributes, JSON-ready (enums by value)."""
    states = {}
    for name, module in model.named_modules():
        if isinstance(module, BayesianLayer):
            state = {}
            for attr in LAYER_STATE:
                value = module.__dict__.get(attr, getattr(type(module), attr, None))
                if isinstance(value, Enum):
                    value = value.value
                if isinstance(value, (str, int, float, bool)):
                    state[attr] = value
                elif dataclasses.is_dataclass(value):  # a prior object
                    try:
                        state[attr] = encode(value, f"{name}.{attr}")
                    except TypeError:  # not importable: check_rebuild compares it instead
                        pass
            states[name] = state
    return states


def rebuild(metadata: dict[str, Any], *, where: str, device: str | None = None) -> nn.Module:
    """The BNN a checkpoint's metadata describes, with freshly initialised weights.

    Args:
        metadata: the checkpoint's metadata.
        where: the file, for error messages.
        device: build on this device (``"meta"`` builds without memory).

    Raises:
        CheckpointError: no architecture, a failing build or replay, or Bayesian layers
            that differ from the recorded ones.
    """
    arch = metadata.get("arch")
    if not isinstance(arch, dict) or not isinstance(arch.get("spec"), str):
        raise CheckpointError(f"{where}: no architecture recorded in its metadata")
    calls = metadata.get("calls", [])
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise CheckpointError(f"{where}: the recorded conversion calls are not a list of objects")
    try:
        kwargs = decode(arch.get("kwargs") or {})
        if not isinstance(kwargs, dict):
            raise CheckpointError(f"{where}: the recorded architecture kwargs are not an object")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConversionWarning)
            if device is None:
                model = build_arch(arch["spec"], kwargs)
            else:
                with torch.device(device):
                    model = build_arch(arch["spec"], kwargs)
            if arch.get("dtype") is not None:
                model = model.to(_dtype(arch["dtype"]))
            layers = metadata.get("layers")
            model = replay_calls(model, calls if layers is not None else legacy_calls(calls))
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        # what the recorded arguments make the conversion raise (a corrupt or foreign file)
        raise CheckpointError(f"{where}: replaying the recorded conversion failed: {exc}") from exc
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, BayesianLayer))
    recorded = sorted(str(n) for n in metadata.get("converted", []))
    if converted != recorded:
        extra, lost = sorted(set(converted) - set(recorded)), sorted(set(recorded) - set(converted))
        raise CheckpointError(
            f"{where}: the rebuilt model's Bayesian layers differ from the recorded ones "
            f"(not recorded: {extra[:_SHOWN]}, not rebuilt: {lost[:_SHOWN]})"
        )
    if metadata.get("layers") is not None:
        restore_parametrizations_(model, metadata["layers"], where=where)
    _restore_layer_states(model, metadata.get("layers") or {}, where)
    return model


def legacy_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``calls`` of a record without per-layer states, with ``"softplus"`` made explicit.

    Such a record was written before the parametrization was recorded per layer: a call
    that set none (no option, or a recorded ``BayesConfig`` without the field) meant the
    default of its time, softplus, not today's default.
    """
    fixed = []
    for call in calls:
        call = dict(call)
        options = dict(call.get("options") or {})
        if "parametrization" not in options and _takes_bayes_options(call):
            if call.get("config") is None:
                options["parametrization"] = LEGACY_PARAMETRIZATION
            else:
                call["config"] = _with_legacy_parametrization(call["config"])
        call["options"] = options
        fixed.append(call)
    return fixed


def _takes_bayes_options(call: dict[str, Any]) -> bool:
    """Whether the recorded call builds dnn2bnn's own layers (a user's layer class that is no
    :class:`BayesianLayer` may not know the parametrization option)."""
    if call.get("function") != "transform_to_bnn_layer":
        return True
    try:
        cls = module_class(*split_name(call["bnn_layer_type"]))
    except (CheckpointError, KeyError, TypeError, ValueError, ImportError, AttributeError):
        # not resolvable: the replay itself reports it
        return False
    return isinstance(cls, type) and issubclass(cls, BayesianLayer)


def _with_legacy_parametrization(encoded: Any) -> Any:
    """An encoded config (a ``BayesConfig`` or a mapping of them) whose BayesConfigs without
    a parametrization field get ``"softplus"``."""
    if isinstance(encoded, list):
        return [_with_legacy_parametrization(v) for v in encoded]
    if not isinstance(encoded, dict):
        return encoded
    out = {k: _with_legacy_parametrization(v) for k, v in encoded.items()}
    if str(out.get("__dataclass__", "")).endswith(":BayesConfig") and isinstance(out.get("fields"), dict):
        out["fields"] = {"parametrization": LEGACY_PARAMETRIZATION, **out["fields"]}
    return out


def restore_parametrizations_(model: nn.Module, states: Any, *, where: str) -> None:
    """Give each Bayesian layer of ``model`` its recorded parametrization, in place.

    ``states`` maps layer names to their recorded :data:`LAYER_STATE`. A layer whose record
    has no parametrization was written when ``"softplus"`` was the only one (a record without
    any layer states replays :func:`legacy_calls` instead). The layer's sigmas are kept (its ``rho`` is re-expressed), so this
    may run before or after its state_dict is loaded.
    """
    if states is not None and not isinstance(states, dict):
        raise CheckpointError(f"{where}: the recorded layer states are not a JSON object")
    for name, layer in model.named_modules():
        if not isinstance(layer, BayesianLayer) or "parametrization" not in layer.__dict__:
            continue
        state = (states or {}).get(name)
        value = state.get("parametrization") if isinstance(state, dict) else None
        try:
            target = Parametrization(LEGACY_PARAMETRIZATION if value is None else value)
        except ValueError as exc:
            raise CheckpointError(
                f"{where}: {name or '<root>'}.parametrization: expected one of "
                f"{[p.value for p in Parametrization]}, got {value!r}"
            ) from exc
        layer.parametrization = target  # re-configures the layer, sigmas kept (a no-op if equal)


def check_rebuild(model: nn.Module, metadata: dict[str, Any], *, where: str) -> None:
    """Raise unless :func:`rebuild` of ``metadata`` gives ``model``'s structure and state keys.

    The rebuild happens on the meta device; the module tree (names and classes), the
    state_dict (keys, shapes, dtypes) and the modules' ``repr`` (constructor arguments,
    priors, estimators) must all be equal.
    """
    spec = (metadata.get("arch") or {}).get("spec")
    hint = (
        "pass arch='package.module:callable' (and arch_kwargs=) naming a class or function "
        "that builds this model's deterministic architecture"
    )
    library = origin_class(model).__module__.partition(".")[0]
    if library in ("torchvision", "timm"):  # the builder name is not recorded in the model
        hint = (
            f"pass arch='{library}:NAME' (and arch_kwargs=, e.g. {{'num_classes': 10}}) naming "
            f"the {library} model it was built with, e.g. arch='"
            + ("torchvision:resnet18" if library == "torchvision" else "timm:resnet18")
            + "'"
        )
    try:
        try:
            rebuilt = rebuild(metadata, where=where, device="meta")
        except CheckpointError as exc:
            if not isinstance(exc.__cause__, (RuntimeError, NotImplementedError)):
                raise
            rebuilt = rebuild(metadata, where=where)  # a step that cannot run on meta
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {where} was not written; {hint}") from exc
    difference = _difference(model, rebuilt)
    if difference:
        raise CheckpointError(
            f"{where} was not written: load_bnn would rebuild a different model from "
            f"{spec} ({difference}); {hint}"
        )


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"unknown floating-point dtype {name!r} recorded for the model")
    return dtype


def _restore_layer_states(model: nn.Module, states: Any, where: str) -> None:
    if not isinstance(states, dict):
        raise CheckpointError(f"{where}: the recorded layer states are not a JSON object")
    modules = dict(model.named_modules())
    for name, state in states.items():
        layer = modules.get(name)
        if not isinstance(layer, BayesianLayer) or not isinstance(state, dict):
            raise CheckpointError(
                f"{where}: recorded state for {name!r}, which is no Bayesian layer"
            )
        for attr, value in state.items():
            if attr not in LAYER_STATE:
                continue  # written by a newer dnn2bnn: its own format_version guards changes
            current = layer.__dict__.get(attr, getattr(type(layer), attr, None))
            try:
                if isinstance(current, Enum):
                    value = type(current)(value)
                elif isinstance(value, dict):
                    value = decode(value)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{where}: {name}.{attr}: {exc}") from exc
            if current is None or current == value:
                continue
            if attr not in _RESTORED:
                recorded = getattr(value, "value", value)
                replayed = getattr(current, "value", current)
                raise CheckpointError(
                    f"{where}: {name or '<root>'}.{attr} is recorded as {recorded!r:.40} but "
                    f"the replayed conversion gives {replayed!r:.40}"
                )
            if attr == "prior":  # a record: the state_dict's prior buffers carry its numbers
                layer.__dict__[attr] = value
            else:
                setattr(layer, attr, value)


def _difference(model: nn.Module, rebuilt: nn.Module) -> str:
    """What differs between the two models (empty if nothing)."""
    ours = {n: type(m).__qualname__ for n, m in model.named_modules()}
    theirs = {n: type(m).__qualname__ for n, m in rebuilt.named_modules()}
    if ours != theirs:
        missing = [n or "<root>" for n in ours if n not in theirs]
        extra = [n or "<root>" for n in theirs if n not in ours]
        other = [
            f"{n or '<root>'}: {ours[n]} vs {theirs[n]}"
            for n in ours
            if theirs.get(n, ours[n]) != ours[n]
        ]
        parts = [
            f"modules not rebuilt: {missing[:_SHOWN]}" if missing else "",
            f"modules not in the model: {extra[:_SHOWN]}" if extra else "",
            f"other classes: {other[:_SHOWN]}" if other else "",
        ]
        return "; ".join(p for p in parts if p)
    state, other_state = model.state_dict(), rebuilt.state_dict()
    if state.keys() != other_state.keys():
        missing = [k for k in state if k not in other_state]
        extra = [k for k in other_state if k not in state]
        return (
            f"state_dict keys not rebuilt: {missing[:_SHOWN]}, not in the model: {extra[:_SHOWN]}"
        )
    shapes = [
        f"{k}: {tuple(v.shape)} {v.dtype} vs {tuple(other_state[k].shape)} {other_state[k].dtype}"
        for k, v in state.items()
        if v.shape != other_state[k].shape or v.dtype != other_state[k].dtype
    ]
    if shapes:
        return f"{len(shapes)} tensor shape/dtype difference(s): {'; '.join(shapes[:3])}"
    for name, module in model.named_modules():
        mine, rebuilt_repr = _own_repr(module), _own_repr(rebuilt.get_submodule(name))
        if mine != rebuilt_repr:
            return f"{name or '<root>'} is {mine} but would be rebuilt as {rebuilt_repr}"
    return ""


def _own_repr(module: nn.Module) -> str:
    return f"{type(module).__qualname__}({module.extra_repr()})"
