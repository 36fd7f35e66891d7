"""Self-describing BNN checkpoints: :func:`save_bnn` and :func:`load_bnn`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dnn2bnn._version import __version__
from dnn2bnn.checkpoint._codec import decode, encode
from dnn2bnn.checkpoint._export import export_args_of, export_module, rebuild_bnn
from dnn2bnn.checkpoint._files import WRITABLE_SUFFIXES, atomic_write, check_output, suffix_of
from dnn2bnn.checkpoint._read import METADATA_KEY, match_state, read_checkpoint
from dnn2bnn.checkpoint._rebuild import (  # replay_calls: imported from here by integrations
    check_rebuild,
    infer_arch,
    layer_states,
    rebuild,
    replay_calls,
)
from dnn2bnn.errors import CheckpointError, ConversionWarning
from dnn2bnn.layers import BayesianLayer

__all__ = ["FORMAT_VERSION", "bnn_metadata", "load_bnn", "replay_calls", "save_bnn", "write_state"]

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

    What it writes, :func:`load_bnn` reads: before writing, the model is rebuilt on the meta
    device from what is recorded and compared with ``model`` (module tree, state_dict keys,
    shapes and dtypes, layer settings); a difference raises :class:`CheckpointError` naming
    ``arch=`` and nothing is written. Each Bayesian layer's estimator, mode, prior and
    parametrization are recorded too.

    Args:
        model: a model converted by :func:`dnn2bnn.transform_to_bnn_model` (or one whose
            architecture builds Bayesian layers itself).
        path: ``.safetensors``, ``.pt`` or ``.pt2`` file; an existing file is refused unless
            ``force=True``.
        arch: how to rebuild the deterministic model: ``"torchvision:resnet18"``,
            ``"timm:NAME"``, ``"transformers:NAME"`` or ``"package.module:callable"`` (an
            ``nn.Module`` class or a function annotated to return one). Default: the
            architecture a model returned by :func:`load_bnn` was built from; else, without
            ``arch_kwargs``, a Hugging Face model's class and config, or the recorded tree of
            a ``torch.nn`` container/layer model; else the model's class before conversion
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
    if arch is None and arch_kwargs is None and remembered is not None:
        arch, arch_kwargs = remembered["spec"], remembered["kwargs"]
    if arch is None and suffix != ".pt2":
        arch, arch_kwargs = infer_arch(model, arch_kwargs)
    metadata = bnn_metadata(model, arch=arch, arch_kwargs=arch_kwargs)
    if suffix == ".pt2":
        atomic_write(path, lambda tmp: _export_checked(model, tmp, metadata, example_inputs))
    else:
        check_rebuild(model, metadata, where=str(path))  # what save writes, load reads
        state = model.state_dict()
        atomic_write(path, lambda tmp: write_state(tmp, state, metadata))
    return path


def _export_checked(
    model: nn.Module, tmp: Path, metadata: dict[str, Any], example_inputs: Any
) -> None:
    """Export to ``tmp``, then rebuild the BNN from it as load_bnn will (before the rename)."""
    export_module(model, tmp, metadata, example_inputs)
    if not any(isinstance(m, BayesianLayer) for m in model.modules()):
        return
    try:
        rebuilt = load_bnn(tmp)
    except CheckpointError as exc:
        raise CheckpointError(
            f"the exported archive could not be read back, so it was not written: {exc}. "
            "A .pt2 archive is rebuilt from its graph, which does not yet cover every model "
            "(a layer used more than once per call, a model's own parameter used as a "
            "weight); save it as .safetensors or .pt instead"
        ) from exc
    def posterior(m: nn.Module) -> dict[str, tuple[int, ...]]:
        return {
            n: tuple(t.shape) for n, t in m.state_dict().items() if n.endswith(("_mu", "_rho"))
        }

    if posterior(model) != posterior(rebuilt):
        lost = sorted(set(posterior(model)) - set(posterior(rebuilt)))[:5]
        raise CheckpointError(
            "the exported archive rebuilds a BNN with other posterior parameters (e.g. missing "
            f"{lost}), so it was not written"
        )


def load_bnn(path: str | Path) -> nn.Module:
    """Rebuild the BNN stored by :func:`save_bnn` or ``dnn2bnn convert``; no option needed.

    The architecture is built from its recorded spec (no weights are downloaded), the
    recorded conversion calls are replayed, and the state_dict is loaded strictly. For a
    ``.pt2`` archive the model is rebuilt from the exported graph instead (a
    ``torch.fx.GraphModule`` whose linear/conv calls are Bayesian layers again).
    Conversion warnings were shown when the model was converted and are not repeated.

    Nothing in the file is run: pickles are refused, and the metadata may only name
    ``nn.Module`` classes, functions annotated to return one, and dataclasses.

    Raises:
        CheckpointError: the file is missing, corrupt, not a BNN checkpoint, from a newer
            format, names something else to call, or does not fit the rebuilt architecture
            (keys, shapes or dtypes).

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
    if metadata["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {metadata['format_version']} (written by dnn2bnn "
            f"{metadata.get('dnn2bnn_version')}); this dnn2bnn {__version__} reads up to "
            f"{FORMAT_VERSION}: upgrade dnn2bnn"
        )
    if checkpoint.program is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConversionWarning)
                return rebuild_bnn(checkpoint.program, metadata)
        except CheckpointError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(
                f"{path}: replaying the recorded conversion failed: {exc}"
            ) from exc
    model = rebuild(metadata, where=str(path))
    arch = metadata["arch"]
    target = f"the BNN rebuilt from {arch['spec']}"
    state = match_state(model, checkpoint.state or {}, source=str(path), target=target)
    expected = model.state_dict()
    dtypes = [
        f"{key} is {value.dtype} in the file but {expected[key].dtype} in the model"
        for key, value in state.items()
        if value.dtype != expected[key].dtype
    ]
    if dtypes:  # save_bnn writes the model's own dtypes: the file was changed since
        raise CheckpointError(f"{path} does not fit {target}: {'; '.join(dtypes[:3])}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # e.g. a tensor whose dtype cannot be copied
        raise CheckpointError(f"{path}: loading the state_dict failed: {exc}") from exc
    report = getattr(model, "conversion_report", None)
    if report is not None and metadata.get("posterior_fit") is not None:
        report.posterior_fit = metadata["posterior_fit"]
    # so that save_bnn(model, ...) records the same architecture again without arch=
    model.__dict__[ARCH_ATTR] = {"spec": arch["spec"], "kwargs": decode(arch.get("kwargs") or {})}
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
        "arch": None if arch is None else _arch_entry(model, arch, arch_kwargs),
        "calls": calls,
        # what dnn2bnn.fit_posterior chose (JSON already), restored by load_bnn
        "posterior_fit": getattr(report, "posterior_fit", None),
        "converted": [n for n, m in model.named_modules() if isinstance(m, BayesianLayer)],
        "layers": layer_states(model),
    }


def _arch_entry(model: nn.Module, spec: str, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    entry = {"spec": spec, "kwargs": encode(kwargs or {}, "arch_kwargs")}
    dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.get_default_dtype():
        entry["dtype"] = str(dtype).removeprefix("torch.")  # a bf16 model: built, then cast
    return entry


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
