"""Self-describing BNN checkpoints: :func:`save_bnn` and :func:`load_bnn`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dnn2bnn._version import __version__
from dnn2bnn.checkpoint._arch import _import, build_arch, spec_of
from dnn2bnn.checkpoint._codec import decode, encode
from dnn2bnn.checkpoint._export import export_args_of, export_module, rebuild_bnn
from dnn2bnn.checkpoint._files import WRITABLE_SUFFIXES, atomic_write, check_output, suffix_of
from dnn2bnn.checkpoint._read import METADATA_KEY, match_state, read_checkpoint
from dnn2bnn.conversion import transform_to_bnn_layer, transform_to_bnn_model
from dnn2bnn.errors import CheckpointError, ConversionWarning
from dnn2bnn.layers import BayesianLayer

__all__ = ["FORMAT_VERSION", "bnn_metadata", "load_bnn", "save_bnn", "write_state"]

#: Version of the metadata layout; a file with a higher version is refused.
FORMAT_VERSION = 1
#: Instance attribute in which load_bnn remembers the architecture it rebuilt.
ARCH_ATTR = "_dnn2bnn_arch"


def save_bnn(
    model: nn.Module,
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    example_inputs: Any = None,
    force: bool = False,
) -> Path:
    """Write a BNN to a self-describing checkpoint that :func:`load_bnn` rebuilds alone.

    The format follows the extension: ``.safetensors`` or ``.pt`` hold the state_dict plus
    metadata (format version, dnn2bnn version, architecture spec and keyword arguments,
    every conversion call with its options, the converted module names); ``.pt2`` is a
    ``torch.export`` archive whose graph samples the weights, so it runs with
    ``torch.export.load(path).module()`` and no dnn2bnn installed. The file is written to a
    temporary name and renamed, so a failure leaves nothing behind.

    Args:
        model: a model converted by :func:`dnn2bnn.transform_to_bnn_model` (or one whose
            architecture builds Bayesian layers itself).
        path: ``.safetensors``, ``.pt`` or ``.pt2`` file; an existing file is refused unless
            ``force=True``.
        arch: how to rebuild the deterministic model: ``"torchvision:resnet18"``,
            ``"timm:NAME"`` or ``"package.module:callable"``. Default: the architecture a
            model returned by :func:`load_bnn` was built from, else the model's own class
            called with ``arch_kwargs``.
        arch_kwargs: keyword arguments of the architecture call (JSON-serialisable).
        example_inputs: for ``.pt2``: a tensor or tuple of positional inputs to export with
            (not needed for a model that came from a ``.pt2`` archive).
        force: replace an existing file.

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Linear(3, 2), prior_sigma=0.5)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = dnn2bnn.save_bnn(bnn, pathlib.Path(folder) / "bnn.safetensors",
        ...                             arch="torch.nn:Linear",
        ...                             arch_kwargs={"in_features": 3, "out_features": 2})
        ...     dnn2bnn.load_bnn(path).weight_prior_sigma.item()
        0.5
    """
    path = Path(path)
    suffix = suffix_of(path, WRITABLE_SUFFIXES, "output")
    check_output(path, force=force)
    from_graph = export_args_of(model) is not None
    if suffix != ".pt2" and from_graph and arch is None:
        raise CheckpointError(
            f"{type(model).__name__} was rebuilt from a torch.export archive and has no Python "
            "architecture to record; save it as .pt2"
        )
    remembered = model.__dict__.get(ARCH_ATTR)
    own_arch = getattr(model, "dnn2bnn_arch_spec", None)  # converted Hugging Face models
    if arch is None and own_arch is not None:
        arch, arch_kwargs = own_arch()
    elif arch is None and remembered is not None:
        arch, arch_kwargs = remembered["spec"], remembered["kwargs"]
    if suffix == ".pt2":
        spec = arch
    else:
        spec = arch if arch is not None else spec_of(model)
    metadata = bnn_metadata(model, arch=spec, arch_kwargs=arch_kwargs)
    if suffix == ".pt2":
        atomic_write(path, lambda tmp: export_module(model, tmp, metadata, example_inputs))
    else:
        state = model.state_dict()
        atomic_write(path, lambda tmp: write_state(tmp, state, metadata))
    return path


def load_bnn(path: str | Path) -> nn.Module:
    """Rebuild the BNN stored by :func:`save_bnn` or ``dnn2bnn convert``; no option needed.

    The architecture is built from its recorded spec (no weights are downloaded), the
    recorded conversion calls are replayed, and the state_dict is loaded strictly. For a
    ``.pt2`` archive the model is rebuilt from the exported graph instead (a
    ``torch.fx.GraphModule`` whose linear/conv calls are Bayesian layers again).
    Conversion warnings were shown when the model was converted and are not repeated.

    Raises:
        CheckpointError: the file is missing, corrupt, not a BNN checkpoint, from a newer
            format, or does not fit the rebuilt architecture.

    Example: see :func:`save_bnn`.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    metadata = checkpoint.metadata
    if metadata is None:
        raise CheckpointError(
            f"{path} is not a dnn2bnn BNN checkpoint (it has no dnn2bnn metadata); convert it "
            "with `dnn2bnn convert` or save the BNN with dnn2bnn.save_bnn"
        )
    if int(metadata["format_version"]) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {metadata['format_version']} (written by dnn2bnn "
            f"{metadata.get('dnn2bnn_version')}); this dnn2bnn {__version__} reads up to "
            f"{FORMAT_VERSION}: upgrade dnn2bnn"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConversionWarning)
            if checkpoint.program is not None:
                return rebuild_bnn(checkpoint.program, metadata)
            arch = metadata.get("arch")
            if not arch or not arch.get("spec"):
                raise CheckpointError(f"{path}: no architecture recorded in its metadata")
            model = build_arch(arch["spec"], arch.get("kwargs") or {})
            model = replay_calls(model, metadata.get("calls", []))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: replaying the recorded conversion failed: {exc}") from exc
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, BayesianLayer))
    recorded = sorted(metadata.get("converted", []))
    if converted != recorded:
        extra, lost = sorted(set(converted) - set(recorded)), sorted(set(recorded) - set(converted))
        raise CheckpointError(
            f"{path}: the rebuilt model's Bayesian layers differ from the recorded ones "
            f"(not recorded: {extra[:5]}, not rebuilt: {lost[:5]})"
        )
    target = f"the BNN rebuilt from {arch['spec']}"
    model.load_state_dict(
        match_state(model, checkpoint.state or {}, source=str(path), target=target)
    )
    # so that save_bnn(model, ...) records the same architecture again without arch=
    model.__dict__[ARCH_ATTR] = {"spec": arch["spec"], "kwargs": arch.get("kwargs") or {}}
    return model


def replay_calls(model: nn.Module, calls: list[dict[str, Any]]) -> nn.Module:
    """Apply recorded conversion calls to ``model`` in place; returns the (new) root."""
    for call in calls:
        common = {
            "include": call.get("include"),
            "exclude": call.get("exclude"),
            "strict": call.get("strict", False),
            "inplace": True,
            **decode(call.get("options", {})),
        }
        if call.get("config") is not None:
            common["config"] = decode(call["config"])
        if call["function"] == "transform_to_bnn_model":
            names = call.get("layer_types")
            types = None if names is None else [_import(*n.split(":", 1)) for n in names]
            params = call.get("params")
            model = transform_to_bnn_model(model, layer_types=types, params=params, **common)
        elif call["function"] == "transform_to_bnn_layer":
            dnn_type = _import(*call["dnn_layer_type"].split(":", 1))
            bnn_type = _import(*call["bnn_layer_type"].split(":", 1))
            model = transform_to_bnn_layer(model, dnn_type, bnn_type, **common)
        else:
            raise CheckpointError(f"unknown recorded conversion function {call['function']!r}")
    return model


def bnn_metadata(
    model: nn.Module, *, arch: str | None, arch_kwargs: dict[str, Any] | None
) -> dict[str, Any]:
    """The metadata :func:`save_bnn` writes (all JSON-serialisable)."""
    report = getattr(model, "conversion_report", None)
    calls = [encode(call, "conversion call") for call in (report.calls if report else [])]
    return {
        "format": "dnn2bnn-bnn",
        "format_version": FORMAT_VERSION,
        "dnn2bnn_version": __version__,
        "torch_version": torch.__version__,
        "arch": (
            None
            if arch is None
            else {"spec": arch, "kwargs": encode(arch_kwargs or {}, "arch_kwargs")}
        ),
        "calls": calls,
        "converted": [n for n, m in model.named_modules() if isinstance(m, BayesianLayer)],
    }


def write_state(path: Path, state: dict[str, Tensor], metadata: dict[str, Any] | None) -> None:
    """Write a state_dict (``.safetensors`` or ``.pt``), with dnn2bnn metadata if given."""
    text = None if metadata is None else json.dumps(metadata)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        seen: set[int] = set()
        tensors = {}
        for key, value in state.items():
            value = value.detach().contiguous()
            if value.numel() and value.data_ptr() in seen:  # tied tensors: store a copy
                value = value.clone()
            seen.add(value.data_ptr())
            tensors[key] = value
        save_file(tensors, str(path), metadata=None if text is None else {METADATA_KEY: text})
    else:
        torch.save(state if text is None else {METADATA_KEY: text, "state_dict": state}, path)
