"""torch.export archives (``.pt2``) without the model's Python class.

An exported program is a graph of ATen calls on lifted parameters. To make it Bayesian we
turn every ``aten.linear``/``aten.conv{1,2,3}d`` call whose weight is a parameter back into
a call of an ``nn.Linear``/``nn.ConvNd`` submodule holding that parameter (named after the
parameter's owner, so ``fc.weight`` stays ``fc.weight``), then convert the resulting
``GraphModule`` with :func:`dnn2bnn.transform_to_bnn_model` as usual. Exporting the BNN
again writes its sampling ops (``exp`` or ``softplus``, ``randn_like``, ``mul``, ``add``) into the
graph, so the archive runs with plain ``torch.export.load(...).module()``.

Reading such a BNN archive back undoes the sampling subgraph (each weight becomes its
``*_mu`` parameter again), lifts the layers as above, replays the recorded conversion and
loads ``*_rho`` and the priors from the archive.
"""

from __future__ import annotations

import glob
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

from dnn2bnn.checkpoint._codec import decode
from dnn2bnn.checkpoint._read import PT2_METADATA, match_state
from dnn2bnn.checkpoint._rebuild import legacy_calls, restore_parametrizations_
from dnn2bnn.conversion import transform_to_bnn_model
from dnn2bnn.errors import CheckpointError
from dnn2bnn.layers import BayesianLayer
from dnn2bnn.modes import set_mode

__all__ = ["export_args_of", "export_module", "lift_program", "rebuild_bnn"]

_aten = torch.ops.aten
#: ATen call -> torch.nn layer it computes.
_LAYER_OPS: dict[Any, type[nn.Module]] = {
    _aten.linear.default: nn.Linear,
    _aten.conv1d.default: nn.Conv1d,
    _aten.conv2d.default: nn.Conv2d,
    _aten.conv3d.default: nn.Conv3d,
    _aten.conv1d.padding: nn.Conv1d,
    _aten.conv2d.padding: nn.Conv2d,
    _aten.conv3d.padding: nn.Conv3d,
}
#: Key of ``GraphModule.meta`` (kept by deepcopy) that carries (args, kwargs, dynamic_shapes)
#: for exporting the module again.
EXPORT_ARGS = "dnn2bnn_export_args"


def export_args_of(model: nn.Module) -> Any:
    """The export arguments recorded on a module lifted from a ``.pt2`` archive, or None."""
    meta = getattr(model, "meta", None)
    return meta.get(EXPORT_ARGS) if isinstance(meta, dict) else None


def lift_program(program: Any, *, bnn: bool = False) -> tuple[fx.GraphModule, list[str]]:
    """``program.module()`` with linear/conv calls on parameters turned into layer modules.

    Args:
        program: a ``torch.export.ExportedProgram``.
        bnn: the program was exported from a dnn2bnn BNN: collapse its sampling subgraphs
            to the posterior means first.

    Returns:
        The GraphModule, and notes on the calls that were left as they are.
    """
    gm = program.module()
    if bnn:
        _collapse_sampling(gm)
    notes = _lift_layers(gm)
    gm.meta[EXPORT_ARGS] = _export_args(program)
    return gm, notes


def rebuild_bnn(program: Any, metadata: dict[str, Any]) -> fx.GraphModule:
    """The Python BNN of a BNN archive: layers lifted, conversion replayed, state loaded."""
    state = program.module().state_dict()
    try:
        gm, _ = lift_program(program, bnn=True)
    except RuntimeError as exc:  # e.g. graph.lint() on a graph we cannot take apart
        raise CheckpointError(f"cannot rebuild a BNN from this archive's graph: {exc}") from exc
    calls = metadata.get("calls", [])
    if metadata.get("layers") is None:  # written before per-layer records: softplus meant
        calls = legacy_calls(calls)
    for call in calls:
        names = call.get("converted", [])
        if names:
            options = decode(call.get("options", {}))
            if call.get("config") is not None:
                options["config"] = decode(call["config"])
            transform_to_bnn_model(
                gm, include=[glob.escape(n) for n in names], inplace=True, **options
            )
    converted = sorted(n for n, m in gm.named_modules() if isinstance(m, BayesianLayer))
    if converted != sorted(metadata.get("converted", [])):
        raise CheckpointError(
            f"the archive's graph yields Bayesian layers {converted[:5]}, its metadata lists "
            f"{sorted(metadata.get('converted', []))[:5]}"
        )
    # the archive's state records no parametrization: the metadata's layer records do
    if metadata.get("layers") is not None:
        restore_parametrizations_(gm, metadata["layers"], where="the archive")
    gm.load_state_dict(match_state(gm, state, source="the archive", target="the rebuilt BNN"))
    return gm


def export_module(
    model: nn.Module, path: Path, metadata: dict[str, Any] | None, example_inputs: Any = None
) -> None:
    """Export ``model`` (in sample mode, if Bayesian) and save it as a ``.pt2`` archive."""
    if example_inputs is not None:
        args, kwargs = _as_args(example_inputs)
        dynamic = None
    elif export_args_of(model) is not None:
        args, kwargs, dynamic = export_args_of(model)
    else:
        raise CheckpointError(
            f"saving {type(model).__name__} as .pt2 needs example_inputs (a tensor or a tuple of "
            "positional arguments) to export it with"
        )
    has_bayes = any(isinstance(m, BayesianLayer) for m in model.modules())
    try:
        with _eval_mode(model):
            if has_bayes:
                with set_mode(model, "sample"), _reparam_estimator(model):
                    program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic)
            else:
                program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic)
    except Exception as exc:
        raise CheckpointError(f"torch.export failed on {type(model).__name__}: {exc}") from exc
    extra = {PT2_METADATA: json.dumps(metadata)} if metadata is not None else None
    torch.export.save(program, path, extra_files=extra)


# ------------------------------------------------------------------------- internals
@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Export for inference: every module in eval mode (BatchNorm running statistics, no
    dropout), the previous modes restored after. A module rebuilt from an archive keeps the
    mode it was exported in (torch.export's modules refuse ``eval()``)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
    except NotImplementedError:
        pass
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def _reparam_estimator(model: nn.Module) -> Iterator[None]:
    """Export every layer with the reparameterization estimator (one weight sample per call).

    Flipout and local reparameterization only lower the variance of training gradients; the
    exported program is for inference, and its weight-sample subgraph is what
    :func:`rebuild_bnn` recognises. The recorded estimator is restored by :func:`load_bnn`.
    """
    layers = [m for m in model.modules() if isinstance(m, BayesianLayer)]
    saved = [(m, m.estimator) for m in layers if hasattr(m, "estimator")]
    # Layers may keep the last weight sample (e.g. for a Monte Carlo KL); tracing would
    # leave fake tensors there, so those attributes are put back as they were.
    kept = [
        (m, dict(m._kl_samples))
        for m in layers
        if isinstance(m.__dict__.get("_kl_samples"), dict)
    ]
    try:
        for layer, estimator in saved:
            layer.estimator = (
                type(estimator)("reparam") if isinstance(estimator, Enum) else "reparam"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            yield
    finally:
        for layer, estimator in saved:
            layer.estimator = estimator
        for layer, samples in kept:
            layer._kl_samples = samples


def _as_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of positional arguments, got "
        f"{type(example_inputs).__name__}"
    )


def _export_args(program: Any) -> tuple[tuple[Any, ...], dict[str, Any], Any] | None:
    """The program's example inputs, and its dynamic dimensions as ``Dim.AUTO``."""
    example = getattr(program, "example_inputs", None)
    if example is None:
        return None
    args, kwargs = example
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    vals = [placeholders[name].meta.get("val") for name in program.graph_signature.user_inputs]
    dynamic = None
    if not kwargs and len(vals) == len(args) and all(isinstance(a, Tensor) for a in args):
        specs = [
            {i: torch.export.Dim.AUTO for i, s in enumerate(v.shape) if not isinstance(s, int)}
            or None
            for v in vals
        ]
        dynamic = tuple(specs) if any(specs) else None
    return tuple(args), dict(kwargs), dynamic


def _collapse_sampling(gm: fx.GraphModule) -> None:
    """Feed each layer call its posterior mean instead of the weight sample built from it.

    The sample of ``weight`` is whatever subgraph the layers export (``mu + sigma(rho) *
    eps``, an ``addcmul``, ...); it is recognised by reading exactly one ``<owner>.weight_mu``
    parameter (``bias_mu`` for the bias), and replaced by that parameter.
    """
    graph = gm.graph
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _LAYER_OPS:
            continue
        args = list(node.args)
        for i, suffix in ((1, ".weight_mu"), (2, ".bias_mu")):
            arg = args[i] if i < len(args) else None
            if isinstance(arg, fx.Node) and arg.op != "get_attr":
                means = {
                    n
                    for n in _ancestors(arg)
                    if n.op == "get_attr" and str(n.target).endswith(suffix)
                }
                if len(means) == 1:
                    args[i] = means.pop()
        node.args = tuple(args)
    graph.eliminate_dead_code(
        is_impure_node=lambda n: n.op in ("placeholder", "output", "call_module")
    )
    gm.recompile()


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        for parent in current.all_input_nodes:
            if parent not in seen and parent.op != "placeholder":
                seen.add(parent)
                stack.append(parent)
    return seen


def _lift_layers(gm: fx.GraphModule) -> list[str]:
    graph = gm.graph
    notes: list[str] = []
    lifted: dict[str, tuple[Any, nn.Module]] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _LAYER_OPS:
            continue
        schema = node.target._schema.arguments
        values = {a.name: a.default_value if a.has_default_value() else None for a in schema}
        values.update(zip([a.name for a in schema], node.args))
        values.update(node.kwargs)
        weight, bias = values["weight"], values["bias"]
        reason = _unliftable(gm, weight, bias)
        if reason is not None:
            notes.append(f"{node.name} ({node.target}): {reason}; left deterministic")
            continue
        owner, _, _ = weight.target.rpartition(".")
        config = (
            node.target,
            tuple((k, str(v)) for k, v in values.items() if k not in ("input", "weight", "bias")),
        )
        if owner in lifted:
            if lifted[owner][0] != config:
                notes.append(
                    f"{node.name}: {owner} is used with different arguments; left deterministic"
                )
                continue
        else:
            layer = _make_layer(_LAYER_OPS[node.target], gm.get_parameter(weight.target), values)
            if bias is not None:
                layer.bias = gm.get_parameter(bias.target)
            _set_submodule(gm, owner, layer)
            lifted[owner] = (config, layer)
        with graph.inserting_before(node):
            call = graph.call_module(owner, (values["input"],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return notes


def _unliftable(gm: fx.GraphModule, weight: Any, bias: Any) -> str | None:
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return "its weight is computed in the graph, not a parameter"
    owner, _, attr = str(weight.target).rpartition(".")
    suffix = "_mu" if attr.endswith("_mu") else ""
    if not owner or attr != "weight" + suffix:
        return f"its weight {weight.target} is not the 'weight' of a submodule"
    if bias is not None and not (
        isinstance(bias, fx.Node)
        and bias.op == "get_attr"
        and bias.target == f"{owner}.bias{suffix}"
    ):
        return f"its bias is not {owner}.bias{suffix}"
    module = gm.get_submodule(owner)
    if not isinstance(module._parameters.get(attr), nn.Parameter):
        return f"{weight.target} is a constant, not a parameter"
    # weight/bias, or a Bayesian layer's weight_mu, weight_rho, weight_prior_* and bias_*
    names = set(module._parameters) | set(module._buffers)
    if list(module.children()) or any(
        n not in ("weight", "bias") and not n.startswith(("weight_", "bias_")) for n in names
    ):
        return f"{owner} holds other parameters or submodules"
    for node in gm.graph.nodes:  # the owner is replaced: nothing else may read its attributes
        if node.op == "get_attr" and str(node.target).startswith(owner + "."):
            if any(
                u.op != "call_function" or u.target not in _LAYER_OPS or node not in u.args[1:3]
                for u in node.users
            ):
                return f"{node.target} is also used outside linear/conv calls"
    return None


def _make_layer(cls: type[nn.Module], weight: nn.Parameter, values: dict[str, Any]) -> nn.Module:
    factory = {"device": "meta", "dtype": weight.dtype, "bias": values["bias"] is not None}
    if cls is nn.Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], **factory)
    else:
        groups = int(values["groups"])
        layer = cls(
            weight.shape[1] * groups,
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=tuple(values["stride"]),
            padding=(
                values["padding"]
                if isinstance(values["padding"], str)
                else tuple(values["padding"])
            ),
            dilation=tuple(values["dilation"]),
            groups=groups,
            **factory,
        )
    layer.weight = weight
    return layer


def _set_submodule(gm: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, module)
