"""Issue 15's research goal: which layers' uncertainty separates OOD inputs, without training.

    python benchmarks/quality_posthoc_layers.py --mnist ../shared/data/mnist.pkl.gz --parent parent.pt \
        --curvature curv.pt --out results/posthoc_layers.json

One LeNet-5 parent (``--parent``: loaded, or trained as in ``quality_mnist.py`` and saved),
one diagonal Fisher over the 50k training images (``--curvature``: loaded, or computed and
saved), the per-layer marginal-likelihood prior precision, then for every variant
``sigma^2 = T_layer / (N c + lambda_layer)`` with a temperature per layer (a layer a variant
does not name gets T = 1e-8: the parent). Each posterior is scored as in ``quality_mnist.py``
(10k test images, 20 sampled networks, OOD by predictive entropy) and by its NLL on the 10k
MNIST validation images, the only data that could choose among them; OOD data chooses
nothing. With ``--elbo-rho``, each posterior then gets one epoch of ELBO (the recipe of
``quality_mnist.py``) on its ``rho`` only, the means frozen at the parent's, and is scored
again. The tables are in docs/posterior.md ("More OOD uncertainty without training").
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dnn2bnn  # noqa: E402
from _quality_data import load_mnist, ood_sets  # noqa: E402
from _quality_eval import evaluate, markdown_table  # noqa: E402
from _quality_models import LeNet5  # noqa: E402
from _quality_posthoc import _validation_split  # noqa: E402
from dnn2bnn.posterior._choose import sum_sq  # noqa: E402
from dnn2bnn.posterior._targets import at_means, find_targets, set_posterior_  # noqa: E402
from dnn2bnn.posterior._validation import predictive_nlls  # noqa: E402
from dnn2bnn.posterior.curvature import Curvature, Likelihood, diagonal_curvature  # noqa: E402
from dnn2bnn.posterior.prior import marglik_precision  # noqa: E402

ALL = ("conv1", "conv2", "fc1", "fc2", "fc3")
#: key -> (label, temperature of each named layer; the others: the parent).
VARIANTS: dict[str, tuple[str, dict[str, float]]] = {
    "all0.001": ("T=0.001, all layers (the old default)", dict.fromkeys(ALL, 1e-3)),
    "all0.03": ("T=0.03, all layers", dict.fromkeys(ALL, 0.03)),
    "fc3": ("T=1, fc3 only", {"fc3": 1.0}),
    "fc23": ("T=1, fc2 and fc3", {"fc2": 1.0, "fc3": 1.0}),
    "conv12": ("T=0.1, conv1 and conv2", {"conv1": 0.1, "conv2": 0.1}),
    "conv1": ("T=1, conv1 only", {"conv1": 1.0}),
    "conv1t3": ("T=3, conv1 only", {"conv1": 3.0}),
    "conv1t3conv2": ("T=3 conv1, T=0.1 conv2", {"conv1": 3.0, "conv2": 0.1}),
    "conv1t10": ("T=10, conv1 only", {"conv1": 10.0}),
    "conv1t30": ("T=30, conv1 only", {"conv1": 30.0}),
}
PARENT_T = 1e-8


def parent_model(path: Path, data: Any) -> nn.Module:
    if path.exists():
        model = LeNet5()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    from quality_mnist import train_parent

    model, _ = train_parent(data, epochs=6, seed=0)
    torch.save(model.state_dict(), path)
    return model.eval()


def curvature(path: Path, bnn: nn.Module, means: dict[str, Tensor], data: Any) -> dict[str, Tensor]:
    """The Fisher diagonal summed over the training images (N c), cached in ``path``."""
    if path.exists():
        return torch.load(path, weights_only=True)
    batches = list(zip(data.x_train.split(256), data.y_train.split(256)))
    with at_means(bnn):
        result = diagonal_curvature(
            bnn, means, batches, likelihood=Likelihood.CLASSIFICATION, curvature=Curvature.FISHER,
            generator=torch.Generator().manual_seed(0),
        )
    torch.save(result.diag, path)
    return result.diag


def elbo_rho(bnn: nn.Module, data: Any, oods: dict[str, Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """One epoch of ELBO (recipe) on the ``rho`` of ``bnn`` (in place), then its table row."""
    from _quality_posthoc import _finetune

    for name, parameter in bnn.named_parameters():
        parameter.requires_grad_(name.endswith("_rho"))
    seconds = _finetune(bnn, data, argparse.Namespace(finetune_epochs=1, seed=0), plain=False)
    torch.manual_seed(0)
    row, _ = evaluate(bnn, data.x_test, data.y_test, oods, samples=args.samples)
    return {**row, "train_s": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, required=True)
    parser.add_argument("--parent", type=Path, required=True, help="LeNet-5 state_dict (loaded or saved)")
    parser.add_argument("--curvature", type=Path, required=True, help="the curvature (loaded or saved)")
    parser.add_argument("--variants", default="", help=f"comma list of variant keys (default: all): {', '.join(VARIANTS)}")
    parser.add_argument("--elbo-rho", action="store_true",
                        help="also 1 epoch of ELBO on rho only (means frozen) from each posterior")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/posthoc_layers.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_mnist(args.mnist)
    oods = ood_sets(data.x_test, digits=True)
    x_val, y_val = _validation_split(args)
    val_batches = list(zip(x_val.split(500), y_val.split(500)))
    parent = parent_model(args.parent, data)
    reference = dnn2bnn.transform_to_bnn_model(copy.deepcopy(parent))
    groups = find_targets(reference)
    means = {t.key: t.mu.detach() for g in groups.values() for t in g}
    curv = curvature(args.curvature, reference, means, data)
    lambdas = {n: marglik_precision([curv[t.key] for t in g], sum_sq(g)) for n, g in groups.items()}

    def val_nll(sigmas: dict[str, Tensor] | None) -> float:
        with at_means(reference):
            per = predictive_nlls(reference, means, sigmas, val_batches, likelihood=Likelihood.CLASSIFICATION,
                                  num_samples=8, noise_sigma=1.0, seed=0)
            return float(per.mean())

    results: dict[str, Any] = {}
    row, _ = evaluate(parent, data.x_test, data.y_test, oods, samples=1)
    results["parent (means)"] = {**row, "val_nll": val_nll(None)}
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(VARIANTS)
    for key in chosen:
        name, temps = VARIANTS[key]
        sigmas = {t.key: (temps.get(n, PARENT_T) / (curv[t.key] + lambdas[n])).sqrt()
                  for n, g in groups.items() for t in g}
        bnn = dnn2bnn.transform_to_bnn_model(copy.deepcopy(parent))
        for n, g in find_targets(bnn).items():
            for t in g:
                set_posterior_(t, sigmas[t.key], lambdas[n])
        start = time.perf_counter()
        torch.manual_seed(0)
        row, _ = evaluate(bnn, data.x_test, data.y_test, oods, samples=args.samples)
        results[name] = {**row, "val_nll": val_nll(sigmas), "temperature": temps, "eval_s": time.perf_counter() - start}
        print(markdown_table({name: results[name]}), f"MNIST-val NLL {results[name]['val_nll']:.4f}", flush=True)
        if args.elbo_rho:
            results[f"{name} + 1 ep. ELBO on rho only"] = elbo_rho(bnn, data, oods, args)
            print(markdown_table({"elbo": results[f"{name} + 1 ep. ELBO on rho only"]}), flush=True)
    report = {"lambda": lambdas, "models": results, "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown_table(results))
    return report


if __name__ == "__main__":
    main()
