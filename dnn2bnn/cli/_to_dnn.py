"""``dnn2bnn to-dnn INPUT OUTPUT``: collapse a BNN checkpoint to its posterior means."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dnn2bnn.checkpoint._bnn import load_bnn, write_state
from dnn2bnn.conversion.deploy import to_dnn
from dnn2bnn.checkpoint._export import export_module
from dnn2bnn.checkpoint._files import WRITABLE_SUFFIXES, atomic_write, check_output, suffix_of
from dnn2bnn.cli._common import emit, example_inputs, input_shape, params
from dnn2bnn.errors import CheckpointError
from dnn2bnn.layers import BayesianLayer

__all__ = ["add_parser", "run"]

_EXAMPLES = """\
examples:
  dnn2bnn to-dnn bnn.safetensors mean.safetensors   # load with model.load_state_dict(...)
  dnn2bnn to-dnn bnn.pt2 mean.pt2                   # a deterministic exported program
"""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "to-dnn",
        parents=[common],
        help="collapse a BNN checkpoint to a deterministic one (posterior means)",
        description=(
            "Write a deterministic checkpoint holding the posterior means of a BNN checkpoint: "
            "a plain state_dict with the original model's keys (.safetensors or .pt), or an "
            "exported program (.pt2)."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", help="BNN checkpoint written by dnn2bnn")
    parser.add_argument("output", metavar="OUTPUT", help=".safetensors, .pt or .pt2 file to write")
    parser.add_argument(
        "--input-shape",
        metavar="N,C,...",
        type=input_shape,
        help="example input shape, to write a .pt2 OUTPUT from a state_dict BNN",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    source, output = Path(args.input), Path(args.output)
    suffix = suffix_of(output, WRITABLE_SUFFIXES, "output")
    check_output(output, inputs=(source,), force=args.force)
    from_program = source.suffix.lower() == ".pt2"
    if suffix == ".pt2" and not from_program and args.input_shape is None:
        raise CheckpointError(
            f"writing a .pt2 OUTPUT from {source} (a state_dict BNN) needs --input-shape to "
            "export the model with"
        )
    bnn = load_bnn(source)
    layers = sum(isinstance(m, BayesianLayer) for m in bnn.modules())
    dnn = to_dnn(bnn)
    if not from_program:
        # a model rebuilt from a state_dict starts in training mode: export it for
        # inference (BatchNorm with running statistics, no dropout), as `convert` does
        dnn.eval()
    if suffix == ".pt2":
        inputs = example_inputs(args.input_shape)
        atomic_write(output, lambda tmp: export_module(dnn, tmp, None, inputs))
    else:
        state = dnn.state_dict()
        atomic_write(output, lambda tmp: write_state(tmp, state, None))
    count = sum(p.numel() for p in dnn.parameters())
    result = {
        "input": str(source),
        "output": str(output),
        "collapsed_layers": layers,
        "params": count,
    }
    emit(
        args,
        result,
        [
            f"wrote {output}: posterior means of {layers} Bayesian layers, "
            f"{params(count)} parameters"
        ],
    )
    return 0
