"""The ``dnn2bnn`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dnn2bnn._version import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dnn2bnn",
        description="Turn a trained deterministic PyTorch network into a Bayesian neural network.",
        epilog="Python API: import dnn2bnn; bnn = dnn2bnn.transform_to_bnn_model(model)",
    )
    parser.add_argument("--version", action="version", version=f"dnn2bnn {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0  # pragma: no cover - commands are added by later releases


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
