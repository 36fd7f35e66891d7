"""Fit data named on the command line: a tensor file or a ``package.module:callable``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["load_fit_data"]

_INPUT_KEYS = ("input", "inputs", "x")
_TARGET_KEYS = ("target", "targets", "y", "labels")
_FORMS = (
    "a .pt/.safetensors file holding an 'input' and a 'target' tensor, or "
    "package.module:callable returning a DataLoader of (input, target) batches"
)


def load_fit_data(spec: str) -> Any:
    """The data ``spec`` names, in a form :func:`dnn2bnn.fit_posterior` takes.

    Args:
        spec: a ``.pt`` file (``torch.save`` of a dict with ``input``/``target`` tensors, or
            of a pair), a ``.safetensors`` file with tensors ``input`` and ``target``, or
            ``package.module:callable`` whose call (no argument) returns a DataLoader.

    Raises:
        ValueError: the file or callable does not hold what is expected (the message says what).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "fit.pt"
        >>> torch.save({"input": torch.zeros(4, 3), "target": torch.zeros(4, dtype=torch.long)}, path)
        >>> x, y = load_fit_data(str(path))
        >>> x.shape, y.shape
        (torch.Size([4, 3]), torch.Size([4]))
    """
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".safetensors"):
        if not path.is_file():
            raise ValueError(f"--fit-data: {spec} does not exist; expected {_FORMS}")
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            content: Any = load_file(str(path))
        else:
            content = torch.load(path, weights_only=True, map_location="cpu")
        return _pair(content, spec)
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"--fit-data: cannot read {spec!r}; expected {_FORMS}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--fit-data: cannot import {spec!r} ({exc}); expected {_FORMS}") from exc
    if not callable(target):
        raise ValueError(f"--fit-data: {spec} is a {type(target).__name__}, not a callable")
    return target()


def _pair(content: Any, spec: str) -> tuple[Tensor, Tensor]:
    if isinstance(content, (tuple, list)) and len(content) == 2:
        inputs, targets = content
    elif isinstance(content, dict):
        inputs = next((content[k] for k in _INPUT_KEYS if k in content), None)
        targets = next((content[k] for k in _TARGET_KEYS if k in content), None)
    else:
        inputs = targets = None
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"--fit-data: {spec} must hold an input tensor (key one of {list(_INPUT_KEYS)}) and "
            f"a target tensor (key one of {list(_TARGET_KEYS)}); found {found}"
        )
    return inputs, targets
