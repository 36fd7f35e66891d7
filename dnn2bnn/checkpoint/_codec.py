"""JSON encoding of conversion options: numbers and strings as they are, priors and
configurations (frozen dataclasses), ``BayesConfigMapping`` and classes by import path,
dicts with non-string keys (a Hugging Face config's ``id2label``) as lists of pairs, and
``torch.dtype`` by name.

Decoding rebuilds the objects by importing their classes, so a recorded conversion call can
be replayed exactly by :func:`dnn2bnn.load_bnn`.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any

import torch

from dnn2bnn.checkpoint._arch import _import, module_class
from dnn2bnn.config import BayesConfigMapping
from dnn2bnn.errors import CheckpointError

__all__ = ["decode", "encode", "split_name"]

_DATACLASS, _TYPE, _MAPPING = "__dataclass__", "__type__", "__config_mapping__"
_ITEMS, _DTYPE = "__items__", "__dtype__"
_KEY_TYPES = (str, int, float, bool, type(None))


def encode(value: Any, where: str) -> Any:
    """A JSON-serialisable form of ``value``; ``TypeError`` naming ``where`` otherwise."""
    if isinstance(value, Enum):
        return encode(value.value, where)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [encode(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: encode(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, dict) and all(isinstance(k, _KEY_TYPES) for k in value):
        # JSON keys are strings: {0: "neg"} would come back as {"0": "neg"}
        return {_ITEMS: [[k, encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, torch.dtype):
        return {_DTYPE: str(value).removeprefix("torch.")}
    if isinstance(value, type):
        return {_TYPE: _name(value, where)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: encode(getattr(value, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
            if f.init
        }
        return {_DATACLASS: _name(type(value), where), "fields": fields}
    if isinstance(value, BayesConfigMapping):
        return {
            _MAPPING: {
                "global": encode(value.global_config, f"{where}.global"),
                "types": [
                    [_name(t, where), encode(c, f"{where}.types")]
                    for t, c in value.type_configs.items()
                ],
                "names": [[p, encode(c, f"{where}.names")] for p, c in value.name_configs.items()],
            }
        }
    raise TypeError(
        f"{where} holds {type(value).__qualname__} {value!r}; a BNN checkpoint records numbers, "
        "strings, booleans, lists, dicts (keys: strings, numbers, booleans, None), torch "
        "dtypes, classes, dataclasses (priors, BayesConfig) and BayesConfigMapping"
    )


def decode(value: Any) -> Any:
    """The inverse of :func:`encode` (enums come back as their values)."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if _ITEMS in value:
        return {key: decode(v) for key, v in value[_ITEMS]}
    if _DTYPE in value:
        dtype = getattr(torch, str(value[_DTYPE]), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"unknown torch dtype {value[_DTYPE]!r} in a BNN checkpoint")
        return dtype
    if _TYPE in value:
        return _class(value[_TYPE])
    if _DATACLASS in value:
        cls = _class(value[_DATACLASS])
        if not dataclasses.is_dataclass(cls):
            raise CheckpointError(f"{value[_DATACLASS]} is not a dataclass; refused")
        fields = value.get("fields")
        if not isinstance(fields, dict):
            raise CheckpointError(f"dataclass {value[_DATACLASS]} without a 'fields' object")
        try:
            return cls(**{str(k): decode(v) for k, v in fields.items()})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"cannot rebuild {value[_DATACLASS]}: {exc}") from exc
    if _MAPPING in value:
        spec = value[_MAPPING]
        try:
            mapping = BayesConfigMapping(decode(spec["global"]))
            mapping.global_config = decode(spec["global"])
            for type_name, config in spec["types"]:
                mapping.set_module_type(module_class(*split_name(type_name)), decode(config))
            for pattern, config in spec["names"]:
                mapping.set_module_name(pattern, decode(config))
        except (TypeError, ValueError, KeyError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"cannot rebuild a BayesConfigMapping: {exc}") from exc
        return mapping
    return {k: decode(v) for k, v in value.items()}


def _class(name: Any) -> type:
    """The class recorded as ``package.module:Class``; anything but a class is refused."""
    target = _import(*split_name(name))
    if not isinstance(target, type):
        raise CheckpointError(f"{name} is a {type(target).__name__}, not a class; refused")
    return target


def split_name(name: Any) -> tuple[str, str]:
    if not isinstance(name, str) or name.count(":") != 1:
        raise CheckpointError(f"malformed class name {name!r:.80}; expected package.module:Class")
    module_name, _, qualname = name.partition(":")
    return module_name, qualname


def _name(cls: type, where: str) -> str:
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise TypeError(
            f"{where}: {cls.__qualname__} is defined in a script or a function and cannot be "
            "imported back; move it into an importable module"
        )
    return f"{cls.__module__}:{cls.__qualname__}"
