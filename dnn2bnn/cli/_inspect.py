"""``dnn2bnn inspect FILE``: what a checkpoint holds, without running any code from it."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dnn2bnn.checkpoint._export import lift_program
from dnn2bnn.checkpoint._read import Checkpoint, read_checkpoint
from dnn2bnn.checkpoint._tree import TREE_SPEC
from dnn2bnn.cli._common import emit, params
from dnn2bnn.errors import CheckpointError

__all__ = ["add_parser", "describe", "run"]

_EXAMPLES = """\
examples:
  dnn2bnn inspect bnn.safetensors
  dnn2bnn inspect resnet18.pt --json
"""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "inspect",
        parents=[common],
        help="show what a checkpoint holds",
        description=(
            "Show what a checkpoint holds: DNN or BNN, file format, architecture, Bayesian "
            "layers with their priors and estimators, parameter counts. Pickled objects are "
            "never loaded."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", metavar="FILE", help=".safetensors, .pt, .pth, .bin or .pt2 file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    info = describe(read_checkpoint(Path(args.file)))
    emit(args, info, _text(info))
    return 0


def describe(checkpoint: Checkpoint) -> dict[str, Any]:
    """A JSON-serialisable description of ``checkpoint``.

    Raises:
        CheckpointError: the metadata does not have the layout dnn2bnn writes.
    """
    try:
        info = _describe(checkpoint)
        _text(info)  # what run() prints must be printable too
    except CheckpointError:
        raise
    except (AttributeError, TypeError, KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(
            f"{checkpoint.path}: corrupt dnn2bnn metadata ({type(exc).__name__}: {exc})"
        ) from exc
    return info


def _describe(checkpoint: Checkpoint) -> dict[str, Any]:
    if checkpoint.program is not None:
        state = dict(checkpoint.program.state_dict)
    else:
        state = dict(checkpoint.state or {})
    info: dict[str, Any] = {
        "file": str(checkpoint.path),
        "format": checkpoint.format,
        "kind": "BNN" if checkpoint.is_bnn else "DNN",
        "tensors": len(state),
        "elements": sum(t.numel() for t in state.values()),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in state.values()}),
    }
    metadata = checkpoint.metadata
    if metadata is not None:
        info["format_version"] = metadata.get("format_version")
        info["dnn2bnn_version"] = metadata.get("dnn2bnn_version")
        info["arch"] = metadata.get("arch")
        info["calls"] = metadata.get("calls", [])
        estimator = _estimator(metadata)
        recorded = metadata.get("layers") or {}
        layers = [
            _layer(name, state, estimator, _parametrization(name, recorded))
            for name in metadata.get("converted", [])
        ]
        info["bayesian_layers"] = layers
        bayes = sum(layer["mean_elements"] for layer in layers)
        info["bayesian_mean_elements"] = bayes
        info["deterministic_elements"] = sum(
            t.numel()
            for k, t in state.items()
            if not k.rsplit(".", 1)[-1].startswith(("weight_", "bias_"))
        )
    elif checkpoint.program is not None:
        gm, notes = lift_program(checkpoint.program)
        kinds = Counter(
            type(m).__name__
            for m in gm.modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        )
        info["convertible_layers"] = dict(sorted(kinds.items()))
        info["notes"] = notes
    else:
        ranks = Counter(t.dim() for k, t in state.items() if k.endswith(".weight"))
        info["weights_by_rank"] = {str(rank): n for rank, n in sorted(ranks.items())}
        bayesian = sorted(k[: -len("_rho")] for k in state if k.endswith("_rho") and k[:-4] + "_mu" in state)
        if bayesian:  # model.state_dict() of a converted model: Bayesian, but nothing says how to rebuild it
            info["kind"] = "BNN state_dict"
            info["bayesian_parameters"] = bayesian
    return info


def _estimator(metadata: dict[str, Any]) -> str:
    chosen = set()
    for call in metadata.get("calls", []):
        config = call.get("config")
        if isinstance(config, dict) and "__config_mapping__" in config:
            chosen.add("per layer (BayesConfigMapping)")
        elif isinstance(config, dict) and "fields" in config:
            chosen.add(str(config["fields"].get("estimator", "reparam")))
        else:
            chosen.add(str(call.get("options", {}).get("estimator", "reparam")))
    return ", ".join(sorted(chosen)) if chosen else "reparam"


def _parametrization(name: str, recorded: dict[str, Any]) -> str:
    """How layer ``name`` reads ``rho``: as recorded by ``save_bnn``; ``"softplus"`` for a
    checkpoint written before parametrizations existed (which records none)."""
    value = (recorded.get(name) or {}).get("parametrization", "softplus")
    if value not in _SIGMA:
        raise CheckpointError(
            f"layer {name or '<root>'}: parametrization must be one of {sorted(_SIGMA)}, "
            f"got {value!r}"
        )
    return str(value)


#: sigma as a function of rho, per parametrization (see dnn2bnn.BayesConfig).
_SIGMA = {"softplus": F.softplus, "exp": torch.exp}


def _layer(
    name: str, state: dict[str, Tensor], estimator: str, parametrization: str
) -> dict[str, Any]:
    prefix = f"{name}." if name else ""
    mu, rho = state.get(prefix + "weight_mu"), state.get(prefix + "weight_rho")
    bias = state.get(prefix + "bias_mu")
    elements = (mu.numel() if mu is not None else 0) + (bias.numel() if bias is not None else 0)
    buffers = prefix + "weight_prior_"
    prior = {
        key[len(buffers) :]: float(value.float().mean())
        for key, value in state.items()
        if key.startswith(buffers)
    }
    return {
        "name": name,
        "weight_shape": list(mu.shape) if mu is not None else None,
        "mean_elements": elements,
        "prior": prior or None,
        "posterior_sigma_mean": (
            None if rho is None else float(_SIGMA[parametrization](rho.detach().float()).mean())
        ),
        "parametrization": parametrization,
        "estimator": estimator,
    }


def _text(info: dict[str, Any]) -> list[str]:
    lines = [
        f"{info['file']}: {info['kind']} checkpoint ({info['format']})",
        f"  tensors: {info['tensors']}, elements: {params(info['elements'])}, "
        f"dtypes: {', '.join(info['dtypes'])}",
    ]
    if info["kind"] == "BNN":
        lines.append(f"  architecture: {_arch_text(info.get('arch') or {})}")
        lines.append(
            f"  written by dnn2bnn {info['dnn2bnn_version']} (format {info['format_version']})"
        )
        for call in info["calls"]:
            given = dict(call.get("options", {}))
            if call.get("config") is not None:
                given["config"] = _short(call["config"])
            opts = ", ".join(f"{k}={v}" for k, v in given.items()) or "defaults"
            lines.append(
                f"  conversion: {call['function']}({opts}); {len(call.get('converted', []))} layers"
            )
        layers = info["bayesian_layers"]
        lines.append(
            f"  Bayesian layers: {len(layers)}, "
            f"posterior means: {params(info['bayesian_mean_elements'])} "
            f"elements (x2 with sigma), deterministic: {params(info['deterministic_elements'])}"
        )
        width = max([len(layer["name"]) for layer in layers] + [4])
        for layer in layers:
            prior = layer["prior"]
            prior_text = " ".join(f"{k}={v:g}" for k, v in prior.items()) if prior else "-"
            sigma = layer["posterior_sigma_mean"]
            lines.append(
                f"    {layer['name'] or '<root>':<{width}}  "
                f"{str(layer['weight_shape']):<18} prior {prior_text}"
                f"  mean sigma {sigma:.3g}  {layer['estimator']}"
            )
    elif "convertible_layers" in info:
        kinds = ", ".join(f"{n} {k}" for k, n in info["convertible_layers"].items()) or "none"
        lines.append(f"  exported graph; convertible layer calls: {kinds}")
        lines += [f"  note: {n}" for n in info["notes"]]
    elif "bayesian_parameters" in info:
        names = info["bayesian_parameters"]
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        lines.append(
            f"  state_dict of a converted model without dnn2bnn metadata: Bayesian parameters "
            f"(*_mu, *_rho) {shown}"
        )
        lines.append(
            "  load it with model.load_state_dict(...) into a model converted the same way "
            "(or save the BNN with dnn2bnn.save_bnn for a file that describes itself); "
            "dnn2bnn convert expects a deterministic state_dict"
        )
    else:
        ranks = ", ".join(f"{n} of rank {r}" for r, n in info["weights_by_rank"].items()) or "none"
        lines.append(
            f"  state_dict; '*.weight' tensors: {ranks} (rank 2: Linear-like, 3-5: Conv-like)"
        )
        lines.append("  convert it with: dnn2bnn convert FILE OUT.safetensors --arch SPEC")
    return lines


def _arch_text(arch: dict[str, Any]) -> str:
    """The recorded architecture in one line (a module tree or a config summarised)."""
    spec, kwargs = arch.get("spec") or "exported graph", arch.get("kwargs") or {}
    if spec == TREE_SPEC and isinstance(kwargs, dict):
        return f"a tree of torch.nn modules ({_count_nodes(kwargs.get('tree'))} modules)"
    if isinstance(kwargs, dict) and isinstance(kwargs.get("config"), dict):
        model_type = kwargs["config"].get("model_type", "?")
        rest = {k: v for k, v in kwargs.items() if k != "config"}
        return f"{spec} from its config (model_type {model_type!r})" + (f" {rest}" if rest else "")
    return spec + (f" {kwargs}" if kwargs else "")


def _count_nodes(node: Any) -> int:
    if not isinstance(node, dict):
        return 0
    children = node.get("children")
    inner = children.values() if isinstance(children, dict) else []
    return 1 + sum(_count_nodes(child) for child in inner)


def _short(encoded: Any) -> str:
    """``BayesConfig(estimator=lrt, ...)`` from an encoded dataclass, or a mapping's name."""
    if isinstance(encoded, dict) and "__dataclass__" in encoded:
        name = encoded["__dataclass__"].rsplit(":", 1)[-1]
        fields = ", ".join(f"{k}={_short(v)}" for k, v in encoded["fields"].items())
        return f"{name}({fields})"
    if isinstance(encoded, dict) and "__config_mapping__" in encoded:
        return "BayesConfigMapping(...)"
    return str(encoded)
