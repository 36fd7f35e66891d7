"""torch.fx analysis of a model's forward: which layers it calls, how often, and which raw
parameters act as weights.

The conversion does not execute the traced graph. It keeps the user's own module (its
class, methods and attributes) and converts layers in place; the trace tells it which
layers the forward reaches, which are used more than once per call (they must share one
weight sample), and which parameters not owned by a convertible layer feed a matrix
product or a convolution (``F.linear``, ``F.conv*``, ``@``, ``torch.matmul``, ``einsum``,
``bmm``, ``addmm``, ...), directly or through computations on parameters alone
(``self.W.t()``, ``self.W * self.mask``).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from dnn2bnn.layers.params import BayesianParameters

__all__ = ["ParamUse", "TraceInfo", "analyse"]

#: Functions taking ``(input, weight, bias, ...)``: a Bayesian layer's operation.
_WEIGHT_FUNCTIONS: dict[Any, tuple[int, int]] = {
    fn: (1, 2)
    for fn in (
        F.linear,
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
    )
}
_WEIGHT_FUNCTIONS[F.bilinear] = (2, 3)

#: Functions taking ``(input, table, ...)``: an embedding lookup, whose table is opt-in.
_TABLE_FUNCTIONS = frozenset({F.embedding, F.embedding_bag, torch.embedding})

#: Matrix products whose every tensor operand is weight-like (position 0 of the ``add*``
#: forms is the added term, a bias).
_PRODUCTS = frozenset(
    {
        torch.matmul,
        torch.mm,
        torch.bmm,
        torch.mv,
        torch.einsum,
        torch.tensordot,
        torch.inner,
        torch.chain_matmul,
        torch.linalg.multi_dot,
        operator.matmul,
    }
)
_ADD_PRODUCTS = frozenset({torch.addmm, torch.addmv, torch.baddbmm, torch.addbmm})
_PRODUCT_METHODS = frozenset({"matmul", "mm", "bmm", "mv", "__matmul__", "__rmatmul__"})
_ADD_PRODUCT_METHODS = frozenset({"addmm", "addmv", "baddbmm", "addbmm"})


@dataclass(frozen=True)
class ParamUse:
    """One use of a raw parameter as (part of) a weight.

    ``slot`` is ``"weight"`` (the weight of ``F.linear``/``F.conv*``), ``"operand"`` (an
    operand of a matrix product: ``@``, ``matmul``, ``einsum``, ``bmm``, ...), ``"bias"``
    (the bias of one of them) or ``"table"`` (the table of ``F.embedding``/``embedding_bag``); ``partners`` are the parameters feeding the weight or
    operands of the same call (the owner of a bias decides with them).
    """

    function: str
    slot: str
    partners: tuple[str, ...] = ()


@dataclass
class TraceInfo:
    """What tracing found (all empty when tracing failed)."""

    failure: str | None = None
    #: id(module) -> number of uses (module calls plus functional reads) per forward call.
    uses: dict[int, int] = field(default_factory=dict)
    #: qualified name of a parameter owned by no leaf (convertible) module -> its uses as
    #: a weight, operand or bias of a linear/convolution/matrix-product call.
    param_uses: dict[str, list[ParamUse]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failure is None


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self._leaf_types = leaf_types

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        # A Bayesian root with parameter-level weights (``BayesNet``) runs its class's own
        # forward through a ``forward(*args, **kwargs)`` wrapper, which torch.fx cannot
        # trace: trace the wrapped forward, whose signature is the user's.
        root = getattr(self, "root", None)
        if is_module and isinstance(root, BayesianParameters):
            root_fn = type(root).dnn_type.forward
        return super().create_args_for_root(root_fn, is_module, concrete_args)

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
    info = TraceInfo(uses=_module_uses(graph, modules))
    info.param_uses = _param_uses(graph, modules, leaf_types)
    return info


def _module_uses(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[int, int]:
    uses: dict[int, int] = defaultdict(int)
    reads: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
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
                # Reads of a parameter (possibly made Bayesian by params=) count as uses:
                # a module whose parameter is read twice per call is used twice.
                reads[id(owner)][attr] += len(node.users)
    for key, counts in reads.items():
        uses[key] += max(counts.values())
    return dict(uses)


def _param_uses(
    graph: fx.Graph, modules: dict[str, nn.Module], leaf_types: tuple[type, ...]
) -> dict[str, list[ParamUse]]:
    """For each raw parameter, the weight slots it reaches through parameter-only nodes."""
    from_input = _input_dependent(graph)
    # (call node, slot) -> parameters reaching that slot
    reaching: dict[tuple[fx.Node, str], set[str]] = defaultdict(set)
    leaf_owned: set[str] = set()
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        owner_name, _, attr = str(node.target).rpartition(".")
        owner = modules.get(owner_name)
        if owner is None or not isinstance(owner._parameters.get(attr), nn.Parameter):
            continue  # a buffer, or a parameter of a Bayesian layer (a property)
        name = str(node.target)
        if isinstance(owner, leaf_types):
            leaf_owned.add(name)  # a partner of biases only: its layer is converted as a whole
        seen: set[fx.Node] = set()
        frontier = [node]
        while frontier:
            current = frontier.pop()
            for user in current.users:
                slots = _slots(user, current)
                for slot in slots:
                    reaching[(user, slot)].add(name)
                # Only computations on parameters alone carry the weight further.
                if user not in seen and not from_input[user] and user.op != "output":
                    seen.add(user)
                    frontier.append(user)
    found: dict[str, list[ParamUse]] = defaultdict(list)
    for (call, slot), names in reaching.items():
        if not names - leaf_owned:
            continue
        function = _function_name(call)
        partners: tuple[str, ...] = ()
        if slot == "bias":
            partners = tuple(
                sorted(reaching.get((call, "weight"), set()) | reaching.get((call, "operand"), set()))
            )
        for name in sorted(names - leaf_owned):
            use = ParamUse(function, slot, partners)
            if use not in found[name]:
                found[name].append(use)
    return dict(found)


_METADATA_METHODS = frozenset({"size", "dim", "numel", "type", "get_device"})
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})


def _input_dependent(graph: fx.Graph) -> dict[fx.Node, bool]:
    """Whether each node depends on the values of an input of the forward (or on a
    submodule call); shapes, dtypes and devices of inputs do not count."""
    result: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "call_module"):
            result[node] = True
        elif node.op == "get_attr" or _is_metadata(node):
            result[node] = False
        else:
            result[node] = any(result.get(arg, True) for arg in node.all_input_nodes)
    return result


def _is_metadata(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _METADATA_METHODS and len(node.args) <= 2:
        return node.target != "type" or len(node.args) == 1
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in _METADATA_ATTRIBUTES
    )


def _slots(user: fx.Node, value: fx.Node) -> list[str]:
    """The weight slots of call ``user`` that ``value`` occupies (empty: not a weight use)."""
    args, kwargs = list(user.args), dict(user.kwargs)
    if user.op == "call_function" and user.target in _WEIGHT_FUNCTIONS:
        weight_at, bias_at = _WEIGHT_FUNCTIONS[user.target]
        slots = []
        if _at(args, kwargs, weight_at, "weight") is value:
            slots.append("weight")
        if _at(args, kwargs, bias_at, "bias") is value:
            slots.append("bias")
        return slots
    if user.op == "call_function" and user.target in _TABLE_FUNCTIONS:
        return ["table"] if _at(args, kwargs, 1, "weight") is value else []
    if user.op == "call_function" and user.target in _PRODUCTS:
        return ["operand"] if _contains(args, value) or _contains(list(kwargs.values()), value) else []
    if user.op == "call_function" and user.target in _ADD_PRODUCTS:
        bias = _at(args, kwargs, 0, "input") is value
        operand = _contains(args[1:], value) or any(
            v is value for k, v in kwargs.items() if k != "input"
        )
        return (["bias"] if bias else []) + (["operand"] if operand else [])
    if user.op == "call_method" and user.target in _PRODUCT_METHODS:
        return ["operand"] if _contains(args, value) else []
    if user.op == "call_method" and user.target in _ADD_PRODUCT_METHODS:
        bias = bool(args) and args[0] is value
        return (["bias"] if bias else []) + (["operand"] if _contains(args[1:], value) else [])
    return []


def _at(args: list[Any], kwargs: dict[str, Any], index: int, key: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(key)


def _contains(values: Any, node: fx.Node) -> bool:
    for value in values:
        if value is node:
            return True
        if isinstance(value, (list, tuple)) and _contains(value, node):
            return True
    return False


def _function_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.target is operator.matmul:
        return "@"
    return getattr(node.target, "__name__", str(node.target))
