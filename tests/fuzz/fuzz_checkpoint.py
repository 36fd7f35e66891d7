"""Fuzz target for dnn2bnn's checkpoint readers (``load_bnn``, ``read_checkpoint``, inspect).

The rule under test: whatever the file, the only exception that escapes is
``CheckpointError``, no code from the file runs (hostile pickles and hostile metadata that
name ``builtins:open`` would create a marker file), and nothing is written next to it.

Run it with atheris (``pip install atheris``) for as long as you like::

    PYTHONPATH=.:tests python tests/fuzz/fuzz_checkpoint.py -atheris_runs=20000

The test suite runs the same :func:`check` over a short seeded hypothesis search
(``tests/test_checkpoint.py::test_fuzzed_checkpoints_fail_only_with_checkpoint_error``).
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import pickle
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dnn2bnn
from dnn2bnn.checkpoint._bnn import write_state
from dnn2bnn.checkpoint._read import METADATA_KEY, read_checkpoint
from dnn2bnn.cli._inspect import describe
from dnn2bnn.errors import CheckpointError

#: Created by any hostile payload that runs; must never exist.
MARKER = Path(tempfile.mkdtemp(prefix="dnn2bnn-fuzz-")) / "payload-ran"


class Hostile:
    """Unpickling this opens (creates) :data:`MARKER`."""

    def __reduce__(self) -> Any:
        return (builtins.open, (str(MARKER), "w"))


#: Metadata values that would run code if a reader called what they name.
HOSTILE_VALUES: list[Any] = [
    {"__dataclass__": "builtins:open", "fields": {"file": str(MARKER), "mode": "w"}},
    {"__type__": "builtins:open"},
    {"__items__": [[0, {"__dataclass__": "builtins:open", "fields": {"file": str(MARKER)}}]]},
    {"spec": "builtins:open", "kwargs": {"file": str(MARKER), "mode": "w"}},
    {"spec": "dnn2bnn:module_tree", "kwargs": {"tree": {"class": "builtins:open", "kwargs": {}}}},
    {"spec": "pathlib:Path.touch", "kwargs": {"self": str(MARKER)}},
    {"__dtype__": "not_a_dtype"},
    {"__items__": 5},
    {"__config_mapping__": {"global": None, "types": [["builtins:open", None]], "names": []}},
]
#: Ordinary odd values.
ODD_VALUES: list[Any] = [None, 0, -1, 2**70, 1.5, float("inf"), True, "", "x:y", "torch.nn:Linear",
                         [], {}, [None], [{}], {"spec": 5}, ["builtins:open"]]  # fmt: skip
#: Where a value is injected into the metadata of a BNN checkpoint.
METADATA_PATHS: list[tuple[Any, ...]] = [
    ("format_version",), ("arch",), ("arch", "spec"), ("arch", "kwargs"), ("calls",),
    ("calls", 0), ("calls", 0, "function"), ("calls", 0, "options"), ("calls", 0, "config"),
    ("calls", 0, "layer_types"), ("calls", 0, "include"), ("calls", 0, "params"), ("converted",),
    ("converted", 0), ("layers",), ("layers", "0"), ("layers", "0", "estimator"),
    ("layers", "0", "bayes_mode"),
]  # fmt: skip


def _bnn() -> nn.Module:
    torch.manual_seed(0)
    return dnn2bnn.transform_to_bnn_model(
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), prior_sigma=0.5
    )


@functools.lru_cache(maxsize=1)
def seeds() -> list[tuple[str, bytes]]:
    """(suffix, bytes) of the files the mutations start from."""
    folder = Path(tempfile.mkdtemp(prefix="dnn2bnn-fuzz-seeds-"))
    bnn = _bnn()
    files = []
    for suffix in (".safetensors", ".pt"):
        dnn2bnn.save_bnn(bnn, folder / f"bnn{suffix}")
        files.append(folder / f"bnn{suffix}")
    dnn2bnn.save_bnn(bnn, folder / "bnn.pt2", example_inputs=torch.randn(2, 3))
    files.append(folder / "bnn.pt2")
    torch.save({"state_dict": dnn2bnn.to_dnn(bnn).state_dict()}, folder / "state.pt")
    files.append(folder / "state.pt")
    torch.save({"state_dict": {"0.weight": torch.zeros(2)}, "payload": Hostile()}, folder / "h.pt")
    files.append(folder / "h.pt")
    (folder / "legacy.pt").write_bytes(pickle.dumps({"0.weight": Hostile()}, protocol=2))
    files.append(folder / "legacy.pt")
    return [(path.suffix, path.read_bytes()) for path in files]


def _metadata_of(data: bytes, suffix: str) -> dict[str, Any] | None:
    folder = Path(tempfile.mkdtemp(prefix="dnn2bnn-fuzz-meta-"))
    path = folder / f"seed{suffix}"
    path.write_bytes(data)
    try:
        return read_checkpoint(path).metadata
    except CheckpointError:
        return None


def _inject(metadata: dict[str, Any], keys: tuple[Any, ...], value: Any) -> dict[str, Any]:
    metadata = json.loads(json.dumps(metadata))
    target: Any = metadata
    for key in keys[:-1]:
        try:
            target = target[key]
        except (KeyError, IndexError, TypeError):
            return metadata
    try:
        target[keys[-1]] = value
    except (IndexError, TypeError):
        pass
    return metadata


def mutate(data: bytes) -> tuple[str, bytes]:
    """The file a fuzz input describes: byte 0 picks a seed, byte 1 a mutation."""
    if len(data) < 2:
        return ".pt", data
    files = seeds()
    suffix, seed = files[data[0] % len(files)]
    kind, rest = data[1] % 7, data[2:]
    if kind == 0:  # truncated
        cut = int.from_bytes(rest[:4].ljust(4, b"\0"), "little") % max(len(seed), 1)
        return suffix, seed[:cut]
    if kind == 1:  # bit flips
        out = bytearray(seed)
        for i in range(0, min(len(rest), 32) - 2, 3):
            position = int.from_bytes(rest[i : i + 2], "little") * 997 % len(out)
            out[position] ^= 1 << (rest[i + 2] % 8)
        return suffix, bytes(out)
    if kind == 2:  # a run of bytes overwritten
        start = int.from_bytes(rest[:2].ljust(2, b"\0"), "little") % len(seed)
        return suffix, seed[:start] + rest[2:] + seed[start + len(rest[2:]) :]
    if kind == 3:  # raw bytes with a checkpoint's extension
        return (".safetensors", ".pt", ".pt2", ".pth", ".bin")[len(rest) % 5], rest
    if kind == 4:  # a value injected into a BNN checkpoint's metadata
        base = seeds()[rest[0] % 2 if rest else 0]
        metadata = _metadata_of(base[1], base[0]) or {}
        keys = METADATA_PATHS[(rest[1] if len(rest) > 1 else 0) % len(METADATA_PATHS)]
        values = HOSTILE_VALUES + ODD_VALUES
        value = values[(rest[2] if len(rest) > 2 else 0) % len(values)]
        return base[0], _rewrite(base, _inject(metadata, keys, value), None)
    if kind == 5:  # a BNN state with a wrong dtype or shape
        base = seeds()[rest[0] % 2 if rest else 0]
        return base[0], _rewrite(base, None, rest[1:2] or b"\0")
    # kind 6: a member of a zip archive (.pt, .pt2) replaced by a hostile pickle
    zipped = [(s, d) for s, d in files if s in (".pt", ".pt2") and d[:2] == b"PK"]
    base = zipped[(rest[0] if rest else 0) % len(zipped)]
    return base[0], _replace_member(base[1], rest[1:2] or b"\0")


def _rewrite(
    base: tuple[str, bytes], metadata: dict[str, Any] | None, damage: bytes | None
) -> bytes:
    folder = Path(tempfile.mkdtemp(prefix="dnn2bnn-fuzz-rw-"))
    path = folder / f"seed{base[0]}"
    path.write_bytes(base[1])
    checkpoint = read_checkpoint(path)
    state = dict(checkpoint.state or {})
    if damage is not None:
        key = sorted(state)[damage[0] % len(state)]
        state[key] = state[key].double() if damage[0] % 2 else state[key].reshape(-1)[1:].clone()
    out = folder / f"out{base[0]}"
    try:
        write_state(out, state, metadata if metadata is not None else checkpoint.metadata)
    except (TypeError, ValueError):  # json.dumps of inf is fine; anything else: keep the seed
        return base[1]
    return out.read_bytes()


def _replace_member(data: bytes, choice: bytes) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    names = [n for n in source.namelist() if n.endswith((".pkl", "data/0"))] or source.namelist()
    victim = names[choice[0] % len(names)]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            payload = source.read(name)
            if name == victim:
                payload = pickle.dumps(Hostile(), protocol=2)
            target.writestr(name, payload)
    return out.getvalue()


def check(data: bytes, folder: Path) -> None:
    """Read the file ``data`` describes with every reader; assert the rule above."""
    suffix, content = mutate(data)
    path = folder / f"input{suffix}"
    path.write_bytes(content)
    before = sorted(p.name for p in folder.iterdir())
    for read in (dnn2bnn.load_bnn, read_checkpoint, lambda p: describe(read_checkpoint(p))):
        try:
            read(path)
        except CheckpointError:
            pass
    assert not MARKER.exists(), f"a payload ran while reading a {suffix} file"
    assert sorted(p.name for p in folder.iterdir()) == before, "a reader wrote a file"
    path.unlink()


def _atheris_main() -> None:  # pragma: no cover - run by hand
    import atheris

    folder = Path(tempfile.mkdtemp(prefix="dnn2bnn-fuzz-run-"))
    seeds()  # build the seeds before instrumenting

    def one(data: bytes) -> None:
        check(data, folder)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":  # pragma: no cover
    _atheris_main()
