"""torch.fx analysis of a model's forward: which layers it calls, and how often.

The conversion does not execute the traced graph. It keeps the user's own module (its
class, methods and attributes) and converts layers in place; the trace tells it which
layers the forward reaches, which are used more than once per call (they must share one
weight sample), and which raw parameters feed linear/convolution functions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["TraceInfo", "analyse"]

#: Functions whose second argument (or ``weight=``) is a weight that a Bayesian layer owns.
_WEIGHT_FUNCTIONS = frozenset(
    {
        F.linear,
        F.bilinear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
        torch.conv1d,
        torch.conv2d,
        torch.conv3d,
        torch.conv_transpose1d,
        torch.conv_transpose2d,
        torch.conv_transpose3d,
    }
)


@dataclass
class TraceInfo:
    """What tracing found (all empty when tracing failed)."""

    failure: str | None = None
    #: id(module) -> number of uses (module calls plus functional reads) per forward call.
    uses: dict[int, int] = field(default_factory=dict)
    #: (qualified parameter name, function name) for parameters that no convertible module
    #: owns but that are used as the weight of a linear/convolution function.
    raw_weights: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)


def analyse(model: nn.Module, leaf_types: tuple[type, ...]) -> TraceInfo:
    """Trace ``model`` symbolically; never raises (a failure is returned in the result)."""
    try:
        graph = _Tracer(leaf_types).trace(model)
    except Exception as exc:  # any failure means: fall back to the module tree
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return TraceInfo(failure=f"{type(exc).__name__}: {first}")
    modules = dict(model.named_modules())
    info = TraceInfo()
    uses: dict[int, int] = defaultdict(int)
    readers: dict[int, set[fx.Node]] = defaultdict(set)
    for node in graph.nodes:
        if node.op == "call_module":
            called = modules[node.target]
            # A leaf's submodules (nn.MultiheadAttention.out_proj) run inside its call.
            for sub in {id(m): m for m in called.modules()}.values():
                uses[id(sub)] += 1
        elif node.op == "get_attr":
            owner_name, _, attr = str(node.target).rpartition(".")
            owner = modules.get(owner_name)
            if owner is not None:
                # Reads of a parameter (possibly made Bayesian by params=) count as uses.
                readers[id(owner)].update(node.users)
            if not isinstance(owner, leaf_types):
                for user in node.users:
                    if user.op == "call_function" and user.target in _WEIGHT_FUNCTIONS:
                        weight = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
                        if weight is node:
                            info.raw_weights.append((str(node.target), user.target.__name__))
    for key, users in readers.items():
        uses[key] += len(users)
    info.uses = dict(uses)
    return info
