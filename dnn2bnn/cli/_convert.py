"""``dnn2bnn convert INPUT OUTPUT``: a trained checkpoint in, a self-describing BNN out."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnn2bnn.checkpoint._arch import build_arch, guess_timm, guess_torchvision
from dnn2bnn.checkpoint._bnn import save_bnn
from dnn2bnn.checkpoint._export import lift_program
from dnn2bnn.checkpoint._files import WRITABLE_SUFFIXES, check_output, suffix_of
from dnn2bnn.checkpoint._read import match_state, read_checkpoint
from dnn2bnn.checkpoint._rebuild import infer_arch
from dnn2bnn.checkpoint._tree import TREE_SPEC
from dnn2bnn.cli._common import emit, example_inputs, input_shape, json_object, params
from dnn2bnn.conversion import default_mapping, transform_to_bnn_model
from dnn2bnn.errors import CheckpointError, ConversionError, ConversionWarning
from dnn2bnn.layers import BayesLinear

__all__ = ["add_parser", "run"]

ESTIMATORS = ("reparam", "flipout", "lrt")

_EXAMPLES = """\
examples:
  dnn2bnn convert resnet18.pt bnn.safetensors --arch torchvision:resnet18
  dnn2bnn convert ckpt.pth bnn.pt --arch mypkg.models:Net --arch-kwargs '{"width": 64}' \\
      --layers linear --exclude 'head.*' --prior-sigma 0.1
  dnn2bnn convert exported.pt2 bnn.pt2          # no Python class needed
"""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "convert",
        parents=[common],
        help="convert a trained checkpoint into a BNN checkpoint",
        description=(
            "Convert a trained model checkpoint into a self-describing BNN checkpoint "
            "(.safetensors, .pt or .pt2, by OUTPUT's extension) that dnn2bnn.load_bnn() "
            "rebuilds without any option."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input",
        metavar="INPUT",
        help="state_dict (.pt/.pth/.bin/.safetensors) or torch.export archive (.pt2)",
    )
    parser.add_argument(
        "output", metavar="OUTPUT", help="BNN checkpoint to write: .safetensors, .pt or .pt2"
    )
    arch = parser.add_argument_group("architecture (for state_dict inputs)")
    arch.add_argument(
        "--arch", metavar="SPEC", help="torchvision:NAME, timm:NAME or package.module:callable"
    )
    arch.add_argument(
        "--arch-kwargs",
        metavar="JSON",
        type=json_object,
        default=None,
        help="keyword arguments of the architecture call, a JSON object",
    )
    arch.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a fully pickled nn.Module as INPUT (unpickling can run arbitrary code)",
    )
    arch.add_argument(
        "--input-shape",
        metavar="N,C,...",
        type=input_shape,
        help="example input shape, to write a .pt2 OUTPUT from a state_dict",
    )
    conv = parser.add_argument_group("conversion")
    conv.add_argument(
        "--layers",
        metavar="LIST",
        help="comma-separated layer types to convert (default: all of "
        f"{', '.join(_layer_names())})",
    )
    conv.add_argument(
        "--include",
        metavar="GLOB",
        action="append",
        help="convert only modules matching this qualified-name glob (repeatable)",
    )
    conv.add_argument(
        "--exclude",
        metavar="GLOB",
        action="append",
        help="leave modules matching this glob deterministic (repeatable)",
    )
    conv.add_argument(
        "--prior-mean", type=float, metavar="F", help="mean of the Normal prior (default 0)"
    )
    conv.add_argument(
        "--prior-sigma",
        type=float,
        metavar="F",
        help="standard deviation of the Normal prior (default 1)",
    )
    conv.add_argument(
        "--posterior-sigma-init",
        type=float,
        metavar="F",
        help="initial posterior standard deviation (default 1e-3)",
    )
    conv.add_argument(
        "--estimator", choices=ESTIMATORS, help="gradient estimator of the Bayesian layers"
    )
    conv.add_argument(
        "--parametrization",
        choices=("exp", "softplus"),
        help="how rho maps to the posterior sigma: exp (default, sigma = exp(rho)) or softplus "
        "(sigma = log(1 + exp(rho)), the default before dnn2bnn issue 17)",
    )
    fit = parser.add_argument_group("posterior (no training)")
    fit.add_argument(
        "--fit-data",
        metavar="FILE",
        help="fit a Laplace posterior with dnn2bnn.fit_posterior on this data: a .pt/.safetensors "
        "file with 'input' and 'target' tensors, or package.module:callable returning a DataLoader",
    )
    fit.add_argument(
        "--fit-options",
        metavar="JSON",
        type=json_object,
        default=None,
        help='keyword options of fit_posterior, a JSON object (e.g. \'{"temperature": 0.1}\')',
    )
    parser.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    source, output = Path(args.input), Path(args.output)
    out_suffix = suffix_of(output, WRITABLE_SUFFIXES, "output")
    check_output(output, inputs=(source,), force=args.force)
    options = bayes_options(args)
    layer_types = parse_layers(args.layers)

    checkpoint = read_checkpoint(
        source, trust_pickle=args.trust_pickle, trust_hint="pass --trust-pickle"
    )
    if checkpoint.is_bnn:
        raise CheckpointError(
            f"{source} is already a dnn2bnn BNN checkpoint; see `dnn2bnn inspect` or "
            "`dnn2bnn to-dnn`"
        )
    arch, arch_kwargs = args.arch, args.arch_kwargs
    notes: list[str] = []
    if checkpoint.program is not None:
        if arch is not None or arch_kwargs is not None:
            raise CheckpointError(
                f"{source} is a torch.export archive and holds its own graph; drop "
                "--arch/--arch-kwargs"
            )
        if out_suffix != ".pt2":
            raise CheckpointError(
                f"a BNN converted from the .pt2 archive {source} has no Python "
                "architecture; write it as .pt2"
            )
        model, notes = lift_program(checkpoint.program)
        if not notes and not any(
            isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules()
        ):
            notes = [
                "the exported graph has no aten.linear/aten.conv call on a parameter (a "
                "program decomposed with run_decompositions() has none)"
            ]
    elif checkpoint.module is not None:
        model = checkpoint.module
        if arch is None:
            arch, arch_kwargs, note = _pickled_arch(model, arch_kwargs)
            notes.append(note)
        _check_rebuildable(model, arch, arch_kwargs)
    else:
        if arch is None:
            raise CheckpointError(
                f"{source} holds only weights (a state_dict); pass --arch torchvision:NAME, "
                "timm:NAME or package.module:callable to say which model they belong to"
            )
        model = build_arch(arch, arch_kwargs)
        model.load_state_dict(
            match_state(model, checkpoint.state or {}, source=str(source), target=arch)
        )
    if out_suffix == ".pt2" and checkpoint.program is None and args.input_shape is None:
        raise CheckpointError(
            "writing a .pt2 OUTPUT from a state_dict needs --input-shape to export the model with"
        )

    if checkpoint.program is None:
        model.eval()  # a module rebuilt from a .pt2 keeps the mode it was exported in
    with warnings.catch_warnings():
        # converting nothing is an error below, with the reasons: not a warning too
        warnings.filterwarnings("ignore", "dnn2bnn: nothing in .* was converted", ConversionWarning)
        bnn = transform_to_bnn_model(
            model,
            layer_types=layer_types,
            include=args.include,
            exclude=args.exclude,
            inplace=True,
            **options,
        )
    if not bnn.conversion_report.converted:
        skipped = "; ".join(f"{s.name}: {s.reason}" for s in bnn.conversion_report.skipped[:3])
        raise ConversionError(
            f"no layer of {source} was converted "
            f"({'; '.join(notes[:3]) or skipped or 'it has no Linear or Conv layer'}); "
            "nothing written"
        )
    fitted = _fit(bnn, args)
    save_bnn(
        bnn,
        output,
        arch=arch,
        arch_kwargs=arch_kwargs,
        example_inputs=example_inputs(args.input_shape),
        force=args.force,
    )

    report = bnn.conversion_report
    result = {
        "input": str(source),
        "output": str(output),
        "input_format": checkpoint.format,
        "arch": arch,
        "arch_kwargs": arch_kwargs or {},
        "options": {k: v for k, v in options.items()},
        "converted": [
            {"name": c.name, "from": c.old_type, "to": c.new_type} for c in report.converted
        ],
        "skipped": [{"name": s.name, "type": s.type, "reason": s.reason} for s in report.skipped],
        "notes": notes + report.notes,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "posterior_fit": None if fitted is None else fitted.to_dict(),
    }
    kinds: dict[str, int] = {}
    for c in report.converted:
        kinds[c.new_type] = kinds.get(c.new_type, 0) + 1
    text = [
        f"converted {source} -> {output}"
        + (f" (architecture {arch})" if arch else " (exported graph)"),
        f"  Bayesian layers: {len(report.converted)} "
        f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); "
        f"skipped: {len(report.skipped)}",
        f"  parameters: {params(report.params_before)} -> {params(report.params_after)}",
    ]
    if options:
        text.append("  options: " + ", ".join(f"{k}={v}" for k, v in options.items()))
    text += [f"  skipped {s.name}: {s.reason}" for s in report.skipped[:10]]
    text += [f"  note: {n}" for n in result["notes"]]
    if fitted is not None:
        text += ["  " + line for line in str(fitted).splitlines()]
    text.append(f"  load it with: dnn2bnn.load_bnn({str(output)!r})")
    emit(args, result, text)
    return 0


def _fit(bnn: nn.Module, args: argparse.Namespace) -> Any:
    """Fit the Laplace posterior when --fit-data is given (``None`` otherwise)."""
    if args.fit_data is None:
        if args.fit_options is not None:
            raise ConversionError("--fit-options applies with --fit-data; add --fit-data FILE")
        return None
    from dnn2bnn.posterior import fit_posterior
    from dnn2bnn.posterior.data_file import load_fit_data

    try:
        data = load_fit_data(args.fit_data)
        return fit_posterior(
            bnn, data, progress=not getattr(args, "json", False), **(args.fit_options or {})
        )
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"--fit-data {args.fit_data}: {exc}") from exc


def bayes_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``**bayes_options`` of transform_to_bnn_model given on the command line."""
    options: dict[str, Any] = {}
    for key in ("prior_mean", "prior_sigma", "posterior_sigma_init", "parametrization"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.estimator is not None:
        if not supports_option("estimator", args.estimator):
            raise ConversionError(
                f"--estimator {args.estimator}: the Bayesian layers of this dnn2bnn have no "
                "estimator option (they always use the reparameterization trick); drop --estimator"
            )
        options["estimator"] = args.estimator
    return options


def supports_option(name: str, value: Any) -> bool:
    """Whether the built-in Bayesian layers accept the option ``name=value``.

    Asks the layers themselves (``check_options`` raises ``TypeError`` for an unknown
    option), so an option added to the layers works here without a change.
    """
    try:
        BayesLinear.check_options(**{name: value})
    except TypeError:
        return False
    return True


def parse_layers(text: str | None) -> list[type[nn.Module]] | None:
    """``"linear,conv2d"`` -> ``[nn.Linear, nn.Conv2d]`` (names of the default mapping)."""
    if text is None:
        return None
    known = {_layer_name(cls): cls for cls in default_mapping()}
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConversionError(
            f"--layers: unknown layer type {', '.join(unknown) or repr(text)}; expected some "
            f"of {', '.join(known)}"
        )
    return [known[n] for n in names]


def _layer_name(cls: type[nn.Module]) -> str:
    """``conv1d`` for ``nn.Conv1d``; a layer of another library is qualified by it
    (``transformers.conv1d`` for GPT-2's ``Conv1D``), so the two never share a name."""
    name = cls.__name__.lower()
    return name if cls.__module__.startswith("torch.") else f"{cls.__module__.split('.')[0]}.{name}"


def _layer_names() -> list[str]:
    """The torch.nn layer names of the default mapping (the same whatever is imported)."""
    return [_layer_name(cls) for cls in default_mapping() if cls.__module__.startswith("torch.")]


def _pickled_arch(
    model: nn.Module, kwargs: dict[str, Any] | None
) -> tuple[str, dict[str, Any], str]:
    """How to rebuild a pickled model (spec, kwargs), and a note saying how it was found."""
    what = f"the pickled {type(model).__name__}"
    guess = (guess_torchvision(model) or guess_timm(model)) if kwargs is None else None
    if guess is not None:
        return guess[0], guess[1], f"architecture of {what} inferred: {guess[0]} {guess[1]}"
    try:
        spec, kwargs = infer_arch(model, kwargs)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot record how to rebuild {what}: {exc}; pass --arch") from exc
    if spec == TREE_SPEC:
        return spec, kwargs, f"{what} is recorded as its tree of torch.nn modules"
    if "config" in kwargs:
        return spec, kwargs, f"{what} is recorded as {spec} with its config"
    return spec, kwargs, f"{what} is recorded as its class {spec}"


def _check_rebuildable(model: nn.Module, arch: str, kwargs: dict[str, Any] | None) -> None:
    """A pickled model is only accepted if ``arch`` rebuilds it, so load_bnn can too."""
    try:
        with torch.device("meta"):
            built = build_arch(arch, kwargs)
        match_state(built, model.state_dict(), source="the pickled model", target=arch)
    except CheckpointError as exc:
        raise CheckpointError(
            f"cannot record how to rebuild the pickled {type(model).__name__}: {exc}; pass "
            "--arch/--arch-kwargs"
        ) from exc
