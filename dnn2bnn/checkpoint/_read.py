"""Reading checkpoint files safely: state_dicts, BNN checkpoints, torch.export archives.

Nothing here runs code from a file: ``.pt``/``.pth``/``.bin`` files are read with
``torch.load(weights_only=True)``; a fully pickled ``nn.Module`` is refused unless the
caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dnn2bnn.checkpoint._files import READABLE_SUFFIXES, suffix_of
from dnn2bnn.errors import CheckpointError

__all__ = ["METADATA_KEY", "Checkpoint", "match_state", "read_checkpoint"]

#: Key of the dnn2bnn metadata (a JSON string) in every file format.
METADATA_KEY = "dnn2bnn"
#: Name of the metadata file inside a ``.pt2`` archive.
PT2_METADATA = "dnn2bnn.json"
#: Where training scripts commonly nest the state_dict, tried in this order.
NESTED_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
    "model_ema",
    "ema",
)
#: Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 5


@dataclass
class Checkpoint:
    """What a checkpoint file holds (exactly one of ``state``/``program``/``module`` is set)."""

    path: Path
    #: ``"safetensors"``, ``"torch"`` (torch.save), or ``"torch.export"`` (.pt2).
    format: str
    state: dict[str, Tensor] | None = None
    program: Any = None  # torch.export.ExportedProgram
    module: nn.Module | None = None
    #: The dnn2bnn metadata of a BNN checkpoint; ``None`` for a deterministic checkpoint.
    metadata: dict[str, Any] | None = None

    @property
    def is_bnn(self) -> bool:
        return self.metadata is not None


def read_checkpoint(
    path: Path | str, *, trust_pickle: bool = False, trust_hint: str | None = None
) -> Checkpoint:
    """Read any supported checkpoint file.

    Args:
        path: the file.
        trust_pickle: unpickle a file holding Python objects (e.g. a whole ``nn.Module``).
        trust_hint: how the caller's user can allow that (``"pass --trust-pickle"``), for
            the error that refuses such a file; ``None`` where the caller never unpickles.

    Raises:
        CheckpointError: missing, corrupt or truncated file, a directory, unsupported
            extension, no state_dict inside, or a pickled object without ``trust_pickle``.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory; expected a checkpoint file "
            f"({', '.join(READABLE_SUFFIXES)})"
        )
    suffix = suffix_of(path, READABLE_SUFFIXES, "input")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    try:
        if suffix == ".safetensors":
            return _read_safetensors(path)
        if suffix == ".pt2":
            return _read_pt2(path)
        return _read_torch(path, trust_pickle=trust_pickle, trust_hint=trust_hint)
    except OSError as exc:  # unreadable: permissions, I/O errors
        raise CheckpointError(f"{path}: cannot read it ({_line(exc)})") from exc


def match_state(
    model: nn.Module, state: Mapping[str, Tensor], *, source: str, target: str
) -> dict[str, Tensor]:
    """``state`` with wrapper prefixes removed, checked against ``model.state_dict()``.

    Raises:
        CheckpointError: naming the first missing/unexpected keys or mismatching shapes.
    """
    expected = model.state_dict()
    state = _strip_prefixes(dict(state), expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"{_count(missing, 'missing key')} {_first(missing)}")
    if unexpected:
        problems.append(f"{_count(unexpected, 'unexpected key')} {_first(unexpected)}")
    if not problems:
        shapes = [
            f"{k} is {tuple(state[k].shape)} in the file but "
            f"{tuple(expected[k].shape)} in the model"
            for k in expected
            if tuple(state[k].shape) != tuple(expected[k].shape)
        ]
        if shapes:
            problems.append(
                f"{_count(shapes, 'shape mismatch', 'shape mismatches')}: {'; '.join(shapes[:3])}"
            )
    if problems:
        raise CheckpointError(f"{source} does not fit {target}: {'; '.join(problems)}")
    return state


# ------------------------------------------------------------------------- formats
def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # SafetensorError and friends: not a valid file
        raise CheckpointError(f"{path}: not a readable safetensors file ({_line(exc)})") from exc
    return Checkpoint(
        path, "safetensors", state=state, metadata=_metadata(path, header.get(METADATA_KEY))
    )


def _read_torch(path: Path, *, trust_pickle: bool, trust_hint: str | None) -> Checkpoint:
    with open(path, "rb") as handle:
        magic = handle.read(1)
    if not zipfile.is_zipfile(path) and magic != b"\x80":  # torch.save: a zip, or a legacy pickle
        raise CheckpointError(
            f"{path}: not a torch checkpoint (neither a torch.save zip archive nor a "
            "pickle; truncated?)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"{path}: corrupt pickle ({_line(exc)})") from exc
        if not trust_pickle:
            raise CheckpointError(
                f"{path} holds pickled Python objects (e.g. a whole nn.Module), and unpickling "
                "can run arbitrary code, so it was refused; save model.state_dict() instead"
                + (
                    f", or {trust_hint} if you trust where the file came from"
                    if trust_hint
                    else " (only `dnn2bnn convert --trust-pickle` unpickles, for a file you "
                    "trust)"
                )
            ) from exc
        obj = _load_trusted(path)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_line(exc)})") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get(METADATA_KEY), str):
        state = obj.get("state_dict")
        if not _is_state(state):
            raise CheckpointError(f"{path}: dnn2bnn checkpoint without a 'state_dict' entry")
        return Checkpoint(
            path, "torch", state=dict(state), metadata=_metadata(path, obj[METADATA_KEY])
        )
    found = _find_state(obj, depth=0)
    if isinstance(found, nn.Module):
        return Checkpoint(path, "torch", module=found)
    if found is None:
        keys = list(obj)[:8] if isinstance(obj, Mapping) else []
        raise CheckpointError(
            f"{path}: no state_dict found; expected a dict of tensors, possibly nested under "
            f"{', '.join(repr(k) for k in NESTED_KEYS[:3])}, ...; found {type(obj).__name__}"
            + (f" with keys {keys}" if keys else "")
        )
    return Checkpoint(path, "torch", state=found)


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: unpickling failed ({_line(exc)})") from exc


def _read_pt2(path: Path) -> Checkpoint:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch.export archive (not a zip file; truncated?)")
    extra = {PT2_METADATA: ""}
    try:
        with _quiet_export_logs():
            program = torch.export.load(path, extra_files=extra)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable torch.export archive ({_line(exc)})"
        ) from exc
    return Checkpoint(
        path, "torch.export", program=program, metadata=_metadata(path, extra[PT2_METADATA] or None)
    )


# ------------------------------------------------------------------------- helpers
def _metadata(path: Path, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt dnn2bnn metadata ({exc})") from exc
    if not isinstance(metadata, dict) or "format_version" not in metadata:
        raise CheckpointError(f"{path}: dnn2bnn metadata without a format_version")
    expected = {
        "format_version": int,
        "arch": (dict, type(None)),
        "calls": list,
        "converted": list,
        "layers": dict,
    }
    for key, types in expected.items():
        value = metadata.get(key)
        if key in metadata and (not isinstance(value, types) or isinstance(value, bool)):
            raise CheckpointError(
                f"{path}: corrupt dnn2bnn metadata: {key!r} is {type(value).__name__} "
                f"{str(value)[:60]!r}"
            )
    if not all(isinstance(c, dict) for c in metadata.get("calls", [])) or not all(
        isinstance(n, str) for n in metadata.get("converted", [])
    ):
        raise CheckpointError(f"{path}: corrupt dnn2bnn metadata: malformed 'calls' or 'converted'")
    return metadata


def _is_state(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _find_state(obj: Any, depth: int) -> dict[str, Tensor] | nn.Module | None:
    if isinstance(obj, nn.Module):
        return obj
    if _is_state(obj):
        return dict(obj)
    if isinstance(obj, Mapping) and depth < 3:
        for key in NESTED_KEYS:
            if key in obj:
                found = _find_state(obj[key], depth + 1)
                if found is not None:
                    return found
    return None


def _strip_prefixes(state: dict[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if (
                state
                and all(k.startswith(prefix) for k in state)
                and not any(k.startswith(prefix) for k in expected)
            ):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


@contextmanager
def _quiet_export_logs() -> Iterator[None]:
    """torch.export logs a traceback on a failed load; we report one line instead."""
    logger = logging.getLogger("torch.export")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _count(items: list[str], noun: str, plural: str | None = None) -> str:
    return f"{len(items)} {noun if len(items) == 1 else plural or noun + 's'}"


def _first(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return "(" + ", ".join(items[:_SHOWN]) + more + ")"


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
