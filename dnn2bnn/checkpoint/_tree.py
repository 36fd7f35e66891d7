"""Module trees: how to rebuild a ``nn.Sequential``/``ModuleList``/``ModuleDict`` of torch.nn
layers without a Python class to name.

A tree is recorded as JSON: a container node lists its children by name, a leaf node names
its torch.nn class and the constructor arguments read back from the layer's attributes
(``nn.Linear(in_features=..., out_features=..., bias=...)``). What is read back is only a
guess until it is checked: :func:`dnn2bnn.save_bnn` rebuilds the tree and compares it with
the model before writing anything.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from dnn2bnn.checkpoint._arch import module_class, origin_class
from dnn2bnn.errors import CheckpointError

__all__ = ["TREE_SPEC", "build_tree", "record_tree"]

#: The architecture spec of a recorded module tree (its kwargs: ``{"tree": node}``).
TREE_SPEC = "dnn2bnn:module_tree"
_CONTAINERS: dict[type[nn.Module], str] = {
    nn.Sequential: "Sequential",
    nn.ModuleList: "ModuleList",
    nn.ModuleDict: "ModuleDict",
}
#: Constructor arguments never read back from the module (factory keywords).
_FACTORY = ("device", "dtype")


def record_tree(model: nn.Module) -> dict[str, Any]:
    """The JSON node that :func:`build_tree` turns back into ``model``'s deterministic tree.

    A module that appears twice (a shared layer) is recorded once; its second place is
    ``{"same_as": "<first qualified name>"}``.

    Raises:
        CheckpointError: a module is neither a container nor a torch.nn layer whose
            constructor arguments can be read back (naming it and ``arch=``).
    """
    return _record(model, "", {})


def build_tree(tree: dict[str, Any]) -> nn.Module:
    """Build the deterministic model described by a node of :func:`record_tree`.

    Example:
        >>> build_tree({"container": "Sequential", "children": {"0": {
        ...     "class": "torch.nn:Linear", "kwargs": {"in_features": 2, "out_features": 1}}}})
        Sequential(
          (0): Linear(in_features=2, out_features=1, bias=True)
        )
    """
    return _build(tree, "", {})


def _record(model: nn.Module, name: str, seen: dict[int, str]) -> dict[str, Any]:
    if id(model) in seen:
        return {"same_as": seen[id(model)]}
    seen[id(model)] = name
    cls = origin_class(model)
    if cls in _CONTAINERS:
        children = {
            child: _record(m, _join(name, child), seen)
            for child, m in model._modules.items()
            if m is not None
        }
        return {"container": _CONTAINERS[cls], "children": children}
    where = name or "<root>"
    if not cls.__module__.startswith("torch.nn."):
        raise CheckpointError(
            f"{where} is a {cls.__module__}.{cls.__qualname__}, not a torch.nn layer or "
            "container, so the model cannot be rebuilt from its module tree; pass arch= "
            "(package.module:callable) and arch_kwargs= to save_bnn"
        )
    kwargs = _constructor_args(model, cls, where)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "kwargs": kwargs}


def _build(tree: Any, name: str, built: dict[str, nn.Module]) -> nn.Module:
    if not isinstance(tree, dict):
        raise CheckpointError(f"a module tree node must be a JSON object, found {tree!r:.80}")
    if "same_as" in tree:
        if tree["same_as"] not in built:
            raise CheckpointError(
                f"module tree node {name!r} refers to unknown module {tree['same_as']!r:.40}"
            )
        return built[tree["same_as"]]
    if "container" in tree:
        children = tree.get("children")
        if not isinstance(children, dict):
            raise CheckpointError(f"container node without children: {tree!r:.80}")
        modules = OrderedDict(
            (str(k), _build(v, _join(name, str(k)), built)) for k, v in children.items()
        )
        kind = tree["container"]
        if kind == "Sequential":
            module: nn.Module = nn.Sequential(modules)
        elif kind == "ModuleList":
            module = nn.ModuleList(modules.values())
        elif kind == "ModuleDict":
            module = nn.ModuleDict(modules)
        else:
            raise CheckpointError(
                f"unknown container {kind!r} in a module tree; expected one of "
                f"{list(_CONTAINERS.values())}"
            )
        built[name] = module
        return module
    spec, kwargs = tree.get("class"), tree.get("kwargs", {})
    if not isinstance(spec, str) or ":" not in spec or not isinstance(kwargs, dict):
        raise CheckpointError(f"malformed module tree node {tree!r:.80}")
    module_name, _, qualname = spec.partition(":")
    if not module_name.startswith("torch.nn"):
        raise CheckpointError(f"module tree node {spec!r} is not a torch.nn class; refused")
    cls = module_class(module_name, qualname)
    if "dtype" in kwargs:
        kwargs = {**kwargs, "dtype": _dtype(kwargs["dtype"])}
    try:
        module = cls(**kwargs)
    except Exception as exc:
        raise CheckpointError(f"building {spec} with {kwargs} failed: {exc}") from exc
    built[name] = module
    return module


def _constructor_args(module: nn.Module, cls: type[nn.Module], where: str) -> dict[str, Any]:
    """Constructor arguments of ``cls`` read back from ``module``'s attributes."""
    kwargs: dict[str, Any] = {}
    own = module._parameters
    for param in _signature(cls).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in _FACTORY:
            continue
        name = param.name
        if issubclass(cls, nn.RNNBase) and name == "mode":
            continue  # nn.LSTM/GRU/RNN pass their own mode to RNNBase
        biases = [b for b in ("bias", "in_proj_bias") if b in own or f"{b}_mu" in own]
        if name == "bias" and biases:
            # a Bayesian layer keeps its bias as bias_mu (and reading .bias would draw one)
            value: Any = own.get(f"{biases[0]}_mu", own.get(biases[0])) is not None
        elif name in module.__dict__ or _has_plain_attribute(module, name):
            value = getattr(module, name)
        elif param.default is not param.empty:
            continue  # checked afterwards by comparing the rebuilt model with this one
        else:
            raise CheckpointError(
                f"{where} ({cls.__qualname__}): cannot read its constructor argument {name!r} "
                "back from the module, so the model cannot be rebuilt from its module tree; "
                "pass arch= and arch_kwargs= to save_bnn"
            )
        kwargs[name] = _plain(value, where, name)
    dtype = next((p.dtype for p in module.parameters(recurse=False)), None)
    accepts_dtype = "dtype" in _signature(cls).parameters
    if dtype is not None and dtype != torch.get_default_dtype() and accepts_dtype:
        kwargs["dtype"] = str(dtype).removeprefix("torch.")
    return kwargs


def _signature(cls: type[nn.Module]) -> inspect.Signature:
    """The first named constructor signature along the MRO (nn.LSTM takes ``*args``)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        signature = inspect.signature(init)
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        named = [p for p in signature.parameters.values() if p.kind not in variadic]
        if len(named) > 1:  # more than self
            return signature.replace(parameters=list(signature.parameters.values())[1:])
    return inspect.signature(cls)


def _has_plain_attribute(module: nn.Module, name: str) -> bool:
    try:
        getattr(module, name)
    except AttributeError:
        return False
    return True


def _plain(value: Any, where: str, name: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    scalars = (bool, int, float, str)
    if isinstance(value, (tuple, list)) and all(isinstance(v, scalars) for v in value):
        return list(value)
    raise CheckpointError(
        f"{where}: constructor argument {name}={type(value).__qualname__} cannot be recorded in "
        "a module tree; pass arch= and arch_kwargs= to save_bnn"
    )


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in a module tree")
    return dtype


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
