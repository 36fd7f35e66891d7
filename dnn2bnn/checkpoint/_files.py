"""Safe output files: refuse to clobber, write to a temporary file, rename when complete."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from dnn2bnn.errors import CheckpointError

__all__ = ["STATE_SUFFIXES", "WRITABLE_SUFFIXES", "atomic_write", "check_output", "suffix_of"]

#: Extensions read as a pickled (``torch.save``) state_dict.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: Extensions of every file holding a state_dict.
STATE_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")
#: Extensions a BNN or DNN checkpoint can be written to.
WRITABLE_SUFFIXES = (".safetensors", ".pt", ".pt2")
READABLE_SUFFIXES = (*STATE_SUFFIXES, ".pt2")


def suffix_of(path: Path, allowed: tuple[str, ...], what: str) -> str:
    """The lower-cased extension of ``path``; raise if it is not one of ``allowed``."""
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise CheckpointError(
            f"{path}: unsupported {what} extension {suffix or '(none)'!r}; expected one of "
            f"{', '.join(allowed)}"
        )
    return suffix


def check_output(output: Path, *, inputs: tuple[Path, ...] = (), force: bool = False) -> None:
    """Refuse an output that is one of the inputs, or that exists (unless ``force``)."""
    for source in inputs:
        if output.resolve() == source.resolve() or (
            output.exists() and source.exists() and os.path.samefile(output, source)
        ):
            raise CheckpointError(f"{output} is the input file; refusing to overwrite it")
    if output.is_dir():
        raise CheckpointError(f"{output} is a directory; expected a file name")
    if output.exists() and not force:
        raise CheckpointError(f"{output} already exists; pass --force (force=True) to replace it")
    if not output.parent.is_dir():
        raise CheckpointError(f"cannot write {output}: directory {output.parent} does not exist")


def atomic_write(output: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``output``, then rename it.

    The temporary file keeps ``output``'s extension (``torch.export.save`` wants ``.pt2``).
    On any error it is removed, so a failure never leaves a partial or stale file.
    """
    fd, tmp_name = tempfile.mkstemp(
        dir=output.parent, prefix=f".{output.stem}.", suffix=f".tmp{output.suffix}"
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
