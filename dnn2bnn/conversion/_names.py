"""How the conversion names things: module-name globs and class names."""

from __future__ import annotations

import fnmatch

__all__ = ["import_name", "matches", "short_type_name"]


def matches(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` or one of its ancestors ("a.b" for "a.b.c") matches a pattern."""
    parts = name.split(".") if name else [""]
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pattern) for p in prefixes for pattern in patterns)


def import_name(cls: type) -> str:
    """``module:qualname`` of a class, the form :mod:`dnn2bnn.checkpoint` imports back."""
    return f"{cls.__module__}:{cls.__qualname__}"


def short_type_name(cls: type) -> str:
    """``nn.Linear`` for torch.nn classes, ``package.module.Class`` for others."""
    module = cls.__module__
    if module.startswith("torch.nn.modules"):
        module = "nn"
    return f"{module}.{cls.__qualname__}"
