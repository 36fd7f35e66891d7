"""The ``dnn2bnn`` command line: ``convert``, ``inspect`` and ``to-dnn``.

Every command prints one line ``dnn2bnn: error: ...`` on stderr and exits with status 1
when its input or options are wrong (2 for malformed command lines, from argparse); the
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from dnn2bnn._version import __version__
from dnn2bnn.cli import _convert, _inspect, _to_dnn
from dnn2bnn.errors import ConversionWarning

__all__ = ["build_parser", "main"]

_COMMANDS = (_convert, _inspect, _to_dnn)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dnn2bnn`` command (one sub-parser per command)."""
    parser = argparse.ArgumentParser(
        prog="dnn2bnn",
        description="Turn a trained deterministic PyTorch network into a Bayesian neural network.",
        epilog=(
            "example: dnn2bnn convert resnet18.pt bnn.safetensors --arch torchvision:resnet18\n"
            "Run 'dnn2bnn COMMAND --help' for the options of a command.\n"
            "Python API: import dnn2bnn; bnn = dnn2bnn.transform_to_bnn_model(model)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dnn2bnn {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        try:
            return int(args.run(args))
        except Exception as exc:
            if args.debug:
                raise
            text = " ".join(str(exc).split()) or type(exc).__name__
            if not isinstance(exc, (ValueError, TypeError, OSError)):
                text = f"{type(exc).__name__}: {text} (run with --debug for the traceback)"
            print(f"dnn2bnn: error: {text}", file=sys.stderr)
            return 1
        finally:
            for warning in caught:
                if issubclass(warning.category, ConversionWarning):
                    print(f"dnn2bnn: warning: {warning.message}", file=sys.stderr)
                elif args.debug:
                    print(
                        warnings.formatwarning(
                            warning.message, warning.category, warning.filename, warning.lineno
                        ),
                        file=sys.stderr,
                        end="",
                    )
