"""Run a model for ``S`` posterior samples at once, split by its torch.fx graph.

The graph is traced with every stochastic module (a Bayesian layer in "sample" mode, or a
module containing one) as a leaf. Nodes that do not depend on a stochastic module form the
deterministic part: they run ONCE at batch ``B``. The rest runs on a folded batch of
``B * S`` rows (see :mod:`dnn2bnn.prediction._vectorized`): a value crossing from the
deterministic part is repeated ``S`` times, Bayesian layers apply ``S`` weight draws in one
batched call, and every other operation simply sees a bigger batch. A network whose last
layer alone is Bayesian thus costs about one deterministic pass for any ``S``.
"""

from __future__ import annotations

import inspect
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.node import Argument, map_aggregate, map_arg

from dnn2bnn.layers._base import BayesianLayer, BayesMode, is_bayesian_layer
from dnn2bnn.prediction._io import ModelInputs
from dnn2bnn.prediction._vectorized import (
    FoldError,
    Shared,
    WeightDraws,
    is_stochastic,
    per_draw_call,
    vectorizable,
)

__all__ = ["Chunk", "SplitPlan", "cached_plan", "clear_plan_cache", "plan_split"]


class _Tracer(fx.Tracer):
    """Bayesian layers are leaves (besides torch.nn's own leaf modules)."""

    def __init__(self, bayesian: set[int]) -> None:
        super().__init__()
        self._bayesian = bayesian

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._bayesian or super().is_leaf_module(m, module_qualified_name)


@contextmanager
def means_for_tracing(model: nn.Module) -> Iterator[list[BayesianLayer]]:
    """Layers in "mean" mode return their ``weight_mu`` *parameter*, which fx records as a
    ``get_attr`` node: that is how a functional read of a Bayesian weight is found."""
    layers = [m for m in model.modules() if isinstance(m, BayesianLayer)]
    previous = [m.bayes_mode for m in layers]
    for m in layers:
        m.__dict__["bayes_mode"] = BayesMode.MEAN
        # Bayesian layers are leaves of the trace, so every read of their ``weight``/``bias``
        # while tracing is a read outside their forward (see :func:`weights_read_while_tracing`).
        m.__dict__["_fx_reads"] = []
    try:
        yield [m for m, mode in zip(layers, previous) if mode != BayesMode.MEAN]
    finally:
        for m, mode in zip(layers, previous):
            m.__dict__["bayes_mode"] = mode
            m.__dict__.pop("_fx_reads", None)


def weights_read_while_tracing(model: nn.Module) -> list[str]:
    """``fc.weight_mu``-style names of the Bayesian weights read during a trace under
    :func:`means_for_tracing`: a read the graph may hold as a constant (``fc.weight.sum()``
    runs eagerly on the tensor), so its samples would silently not vary."""
    return [
        f"{name}.{param}_mu"
        for name, m in model.named_modules()
        if isinstance(m, BayesianLayer)
        for param in dict.fromkeys(m.__dict__.get("_fx_reads") or ())
    ]


@dataclass(frozen=True)
class Binding:
    """How a call's inputs map onto ``forward``'s parameters, for tracing and running.

    Tensor arguments become graph inputs (placeholders, batched); every other parameter
    (given or defaulted: ``None`` masks, flags) is fixed in the trace as a constant, as
    torch.fx's ``concrete_args`` do, so ``if mask is not None`` takes the branch of the call.
    """

    names: tuple[str, ...]
    tensors: frozenset[str]
    concrete: dict[str, Any] = field(hash=False)
    #: What a plan traced with this binding may be reused for (``None``: not reusable).
    key: Hashable | None = None

    @classmethod
    def of(cls, model: nn.Module, inputs: ModelInputs) -> Binding | str:
        """The binding of ``inputs`` to ``model.forward``; a reason string if there is none."""
        try:
            signature = inspect.signature(model.forward)
        except (TypeError, ValueError) as exc:
            return f"the signature of {type(model).__name__}.forward is unknown ({exc})"
        variadic = [
            p.name for p in signature.parameters.values()
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        try:
            bound = signature.bind(*inputs.args, **inputs.kwargs)
        except TypeError as exc:
            raise TypeError(
                f"predict: the inputs do not match {type(model).__name__}.forward{signature}: {exc}"
            ) from exc
        if variadic:
            hf = type(model).__module__.startswith("transformers.")
            return (
                f"{type(model).__name__}.forward takes *args/**kwargs ({', '.join(variadic)}), "
                "which torch.fx cannot trace"
                + (" (transformers >= 5 has no transformers.utils.fx tracer)" if hf else "")
            )
        names: list[str] = []
        tensors: set[str] = set()
        concrete: dict[str, Any] = {}
        key: list[Hashable] = []
        reusable = True
        for name, param in signature.parameters.items():
            value = bound.arguments.get(name, param.default)
            names.append(name)
            if isinstance(value, Tensor):
                tensors.add(name)
                # The probe's verdict depends on the layout: an op that keeps the rows of
                # [B, T, D] apart may mix them for [B, D] (softmax(dim=-2)).
                key.append((name, Tensor, value.dim(), value.dtype, value.device))
                continue
            concrete[name] = value
            try:
                hash(value)
            except TypeError:  # a list, a dict: the trace is not reused
                reusable = False
            else:
                key.append((name, type(value), value))
        return cls(
            tuple(names), frozenset(tensors), concrete, tuple(key) if reusable else None
        )

    def values(self, inputs: ModelInputs, model: nn.Module) -> list[Any]:
        """The placeholder values for ``inputs``, in ``forward``'s parameter order."""
        bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
        return [bound.arguments.get(name, self.concrete.get(name)) for name in self.names]


@dataclass
class SplitPlan:
    """A traced model and which of its nodes depend on a posterior sample."""

    #: The traced model (run by an interpreter over ``graph``; no code is generated); a
    #: weak reference when the plan is cached for that model (the cache must not keep it).
    root: nn.Module | weakref.ref[nn.Module]
    graph: fx.Graph
    stochastic: set[fx.Node]
    #: Nodes whose value depends on the model input (only those carry a batch dimension).
    batched: set[fx.Node]
    #: Qualified names of the stochastic modules applied with batched weight draws.
    vectorized: list[str]
    #: Qualified names of stochastic modules called once per draw (not batchable).
    per_draw: list[str]
    #: ids of vectorizable Linear and Conv layers called once per forward (local
    #: reparameterization where exact: 2-d Linear inputs, one output position of a Conv).
    single_use: frozenset[int] = frozenset()
    #: Deterministic nodes read by stochastic ones: all that a chunk after the first needs.
    frontier: frozenset[fx.Node] = frozenset()
    #: How the call's inputs were bound to ``forward``'s parameters when tracing.
    binding: Binding | None = None
    #: The Hugging Face ``ModelOutput`` class of the model's output (fx records a dict).
    output_type: type | None = None
    #: Frontier nodes that depend on the input but not row by row (same shapes for any
    #: batch size: a causal mask from the sequence length): passed unfolded (the probe
    #: fills this in).
    shared: frozenset[fx.Node] = frozenset()

    def placeholder_values(self, inputs: ModelInputs) -> list[Any]:
        """The graph inputs for ``inputs`` (``forward``'s parameters in order)."""
        if self.binding is None:
            return list(inputs.args)
        return self.binding.values(inputs, self.module)

    @property
    def module(self) -> nn.Module:
        root = self.root
        if isinstance(root, weakref.ref):
            module = root()
            if module is None:  # pragma: no cover - the plan outlived its model
                raise RuntimeError("the model of this prediction plan was deleted")
            return module
        return root

    def run(
        self,
        inputs: ModelInputs,
        draws: WeightDraws,
        chunk: Chunk | None = None,
        *,
        select: Callable[[Any], Any] | None = None,
    ) -> Any:
        """The model output for ``S`` draws, every tensor shaped ``[S, B, ...]``.

        With ``chunk``, the deterministic part runs only in the first call that gets this
        ``chunk``: later calls (more draws of the same batch) reuse its frontier values.
        ``select`` picks the prediction from the folded output before it is unfolded.
        """
        draws.new_pass()
        draws.local = self.single_use
        batch = inputs.batch_size
        interpreter = _FoldedInterpreter(self, draws, batch, chunk)
        out = interpreter.run(*self.placeholder_values(inputs))
        if self.output_type is not None and isinstance(out, dict):
            out = self.output_type(**out)
        if select is not None:
            out = select(out)
        if chunk is not None:
            chunk.started = True
        return _unfold(out, batch, draws.num_samples)


@dataclass
class Chunk:
    """State shared by the calls of :meth:`SplitPlan.run` that split one batch's draws."""

    frontier: dict[fx.Node, Any]
    started: bool = False
    #: Largest bytes per folded row of a tensor of the stochastic part (measured).
    row_bytes: int = 0


# model -> {input binding key: (structure stamp, plan or reason)}. Values hold the model
# only weakly.
_PLANS: weakref.WeakKeyDictionary[
    nn.Module, dict[Hashable, tuple[tuple[Any, ...], SplitPlan | str]]
] = weakref.WeakKeyDictionary()


def _stamp(model: nn.Module) -> tuple[Any, ...]:
    """What a plan depends on besides the code: the module tree (objects and classes, shared
    modules included), each layer's sampling mode and the module hooks."""
    return tuple(
        (name, id(m), type(m), m.__dict__.get("bayes_mode"),
         tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
        for name, m in model.named_modules(remove_duplicate=False)
    )


def cached_plan(model: nn.Module, inputs: ModelInputs) -> SplitPlan | str:
    """:func:`plan_split`, traced once per model and input binding, reused while its
    structure is unchanged.

    The plan is traced again when a submodule is added, removed or replaced, a layer's mode
    changes, a hook is added or removed, or the call passes other inputs (other tensor
    arguments or tensors of another rank, dtype or device, other non-tensor values).
    Python control flow in ``forward`` that reads
    other attributes is frozen in the trace (as in any torch.fx capture): after changing
    such an attribute, call :func:`clear_plan_cache`.
    """
    if is_bayesian_layer(model):  # wrapped in a container by plan_split: cheap to trace
        return plan_split(model, inputs)
    binding = Binding.of(model, inputs)
    key = binding.key if isinstance(binding, Binding) else binding
    stamp = _stamp(model)
    entries = _PLANS.setdefault(model, {})
    entry = entries.get(key) if key is not None else None
    if entry is not None and entry[0] == stamp:
        return entry[1]
    plan = plan_split(model, inputs)
    if isinstance(plan, SplitPlan):
        plan.root = weakref.ref(model)
    if key is not None:
        entries[key] = (stamp, plan)
    return plan


def clear_plan_cache(model: nn.Module | None = None) -> None:
    """Forget the cached prediction plan of ``model`` (of every model with ``None``)."""
    if model is None:
        _PLANS.clear()
    else:
        _PLANS.pop(model, None)


def plan_split(model: nn.Module, inputs: ModelInputs) -> SplitPlan | str:
    """Trace ``model`` for ``inputs`` and find its stochastic part.

    Returns a reason string where the samples cannot be folded into the batch: the trace
    fails, a Bayesian weight is read outside its layer, or the batch-axis probe
    (:func:`dnn2bnn.prediction._probe.check_batch_axis`) finds a value of the stochastic
    part whose batch is not on dim 0 or whose rows mix.
    """
    if is_bayesian_layer(model):  # a single layer: trace a container so it stays a leaf
        Binding.of(model, inputs)  # inputs that do not fit: the error names the layer
        model = nn.Sequential(model)
    binding = Binding.of(model, inputs)
    if isinstance(binding, str):
        return binding
    # Computed before tracing, which switches the layers to "mean" mode.
    stochastic_modules = {id(m) for m in model.modules() if is_stochastic(m)}
    bayesian = {id(m) for m in model.modules() if is_bayesian_layer(m)}
    with means_for_tracing(model) as sampling:
        try:
            graph = _Tracer(bayesian).trace(model, concrete_args=binding.concrete or None)
        except Exception as exc:  # any failure: the caller falls back to the loop
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            kind = type(exc).__name__
            return f"torch.fx could not trace {type(model).__name__} ({kind}: {first})"
        read = weights_read_while_tracing(model)
    if read:
        return (
            f"{', '.join(read)} (a Bayesian parameter) is read outside its layer's forward; "
            f"its samples cannot be batched"
        )
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(binding.names):
        return (
            f"the trace of {type(model).__name__} has {len(placeholders)} inputs for the "
            f"{len(binding.names)} parameters of its forward"
        )
    inputs_batched = {n for n, name in zip(placeholders, binding.names) if name in binding.tensors}
    names = {id(m): name for name, m in model.named_modules()}
    owners = {id(m) for m in sampling}
    modules = dict(model.named_modules())
    stochastic: set[fx.Node] = set()
    batched: set[fx.Node] = set()
    vectorized: list[str] = []
    per_draw: list[str] = []
    for node in graph.nodes:
        if node.op == "get_attr":
            owner = modules.get(str(node.target).rpartition(".")[0])
            if owner is not None and id(owner) in owners:
                return (
                    f"{node.target} (a Bayesian parameter) is read outside its layer's forward; "
                    f"its samples cannot be batched"
                )
        if node in inputs_batched or any(
            a in batched for a in node.all_input_nodes
        ):
            batched.add(node)
        if node.op == "call_module" and id(modules[node.target]) in stochastic_modules:
            target = modules[node.target]
            if not node.all_input_nodes or not all(a in batched for a in node.all_input_nodes):
                return (
                    f"{node.target} (stochastic) is applied to a value that does not depend on "
                    "the input, so it has no batch dimension to fold the samples into"
                )
            stochastic.add(node)
            (vectorized if vectorizable(target) else per_draw).append(names[id(target)])
        elif any(a in stochastic for a in node.all_input_nodes) or node.op == "output":
            stochastic.add(node)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    single_use = frozenset(
        id(m) for name, m in modules.items()
        if calls[name] == 1 and vectorizable(m) and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and sum(1 for other in modules.values() if other is m) == 1
    )
    frontier = frozenset(
        a for n in stochastic for a in n.all_input_nodes if a not in stochastic
    )
    plan = SplitPlan(
        model, graph, stochastic, batched, sorted(set(vectorized)), sorted(set(per_draw)),
        single_use, frontier, binding,
    )
    from dnn2bnn.prediction._probe import check_batch_axis, model_output_type

    reason = check_batch_axis(plan, inputs)
    if reason is not None:
        return reason
    plan.output_type = model_output_type(plan, inputs)
    return plan



class _FoldedInterpreter(fx.Interpreter):
    def __init__(self, plan: SplitPlan, draws: WeightDraws, batch: int, chunk: Chunk | None) -> None:
        super().__init__(plan.module, graph=plan.graph)
        self.plan = plan
        self.draws = draws
        self.batch = batch
        self.chunk = chunk
        self._folded: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        chunk = self.chunk
        if n not in self.plan.stochastic:
            if chunk is None:
                return super().run_node(n)
            if chunk.started:  # later chunk: no deterministic work, only the frontier's values
                return chunk.frontier.get(n)
            value = super().run_node(n)
            if n in self.plan.frontier:
                chunk.frontier[n] = value
            return value
        value = self._run_stochastic(n)
        if chunk is not None and not chunk.started and isinstance(value, Tensor) and value.dim():
            # the first chunk measures the activation size that sizes the next chunks
            rows = max(1, value.shape[0])
            chunk.row_bytes = max(chunk.row_bytes, value.numel() * value.element_size() // rows)
        return value

    def _run_stochastic(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            unfolded = self._deterministic_input(n)
            if unfolded is not None:  # every draw reads the same value: not repeated
                return self.draws.apply(self.fetch_attr(str(n.target)), unfolded, repeated=True)
            args = map_arg(n.args, self._fetch_folded)
            kwargs = map_arg(n.kwargs, self._fetch_folded)
            if n.op == "call_module":
                module = self.fetch_attr(str(n.target))
                if vectorizable(module) and not kwargs and len(args) == 1:
                    return self.draws.apply(module, Shared.unwrap(args[0]))
                if is_stochastic(module):  # slices the folded values, passes Shared ones whole
                    return per_draw_call(module, tuple(args), dict(kwargs), self.draws)
            args, kwargs = map_aggregate(args, Shared.unwrap), map_aggregate(kwargs, Shared.unwrap)
            return getattr(self, n.op)(n.target, args, kwargs)

    def _deterministic_input(self, n: fx.Node) -> Tensor | None:
        """The ``[B, ...]`` input of a vectorizable layer fed from the deterministic part."""
        if n.op != "call_module" or n.kwargs or len(n.args) != 1:
            return None
        (source,) = n.args
        if not isinstance(source, fx.Node) or source in self.plan.stochastic:
            return None
        value = self.env.get(source)
        if (
            source not in self.plan.batched
            or not isinstance(value, Tensor)
            or value.dim() < 2
            or value.shape[0] != self.batch
            or not vectorizable(self.fetch_attr(str(n.target)))
        ):
            return None
        return value

    def _fetch_folded(self, node: fx.Node) -> Argument:
        if node in self.plan.stochastic:
            return self.env[node]
        if node not in self._folded:
            value = self.env[node]
            if node in self.plan.shared:
                value = Shared(value)  # one value for all draws: not repeated, nor sliced
            elif node in self.plan.batched:
                value = self._repeat(value)
            self._folded[node] = value
        return self._folded[node]

    def _repeat(self, value: Any) -> Any:
        b, s = self.batch, self.draws.num_samples

        def repeat(v: Any) -> Any:
            if isinstance(v, Tensor):
                if v.dim() == 0:
                    return v
                if v.shape[0] != b:
                    raise FoldError(f"a batched value of shape {tuple(v.shape)} has no batch dim 0")
                return v.unsqueeze(1).expand(b, s, *v.shape[1:]).reshape(b * s, *v.shape[1:])
            if isinstance(v, int) and not isinstance(v, bool) and v == b:
                # Most likely the batch size, read before the first Bayesian layer.
                raise FoldError(f"the batch size ({b}) is used as a number in the stochastic part")
            return v

        return map_aggregate(value, repeat)


def _unfold(value: Any, b: int, s: int) -> Any:
    if isinstance(value, Tensor):
        if value.dim() == 0 or value.shape[0] != b * s:
            raise FoldError(f"an output of shape {tuple(value.shape)} is not a folded batch")
        return value.reshape(b, s, *value.shape[1:]).transpose(0, 1)
    if isinstance(value, (tuple, list)):
        return type(value)(_unfold(v, b, s) for v in value)
    if isinstance(value, dict):
        return {k: _unfold(v, b, s) for k, v in value.items()}
    if isinstance(value, torch.distributions.Normal):
        return torch.distributions.Normal(_unfold(value.loc, b, s), _unfold(value.scale, b, s))
    raise FoldError(f"cannot read a model output of type {type(value).__name__}")
