"""Helpers shared by the commands: output, JSON arguments, example inputs."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

__all__ = ["emit", "input_shape", "json_object"]


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object (``--arch-kwargs '{"num_classes": 10}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


def input_shape(text: str) -> tuple[int, ...]:
    """argparse type: a comma-separated tensor shape (``1,3,224,224``)."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise argparse.ArgumentTypeError(
            f"expected positive integers like 1,3,224,224, got {text!r}"
        )
    return shape


def example_inputs(shape: tuple[int, ...] | None) -> torch.Tensor | None:
    """A zero tensor of ``shape`` to export a model with (``None`` without a shape)."""
    return None if shape is None else torch.zeros(shape)


def emit(args: argparse.Namespace, result: dict[str, Any], text: list[str]) -> None:
    """Print the command's result: JSON with ``--json``, else the human-readable lines."""
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(text))


def params(n: int) -> str:
    return f"{n:,}"
