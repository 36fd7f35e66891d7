"""Uncertainty quality on real MNIST: a deterministic LeNet-5, the same network converted
with one call and fine-tuned, and Blundell et al. (2015)'s Bayesian MLP.

    python benchmarks/quality_mnist.py --mnist ../shared/data/mnist.pkl.gz          # full run
    python benchmarks/quality_mnist.py --mnist PATH --parts lenet                    # LeNet only
    python benchmarks/quality_mnist.py --mnist PATH --quick                          # minutes
    python benchmarks/quality_mnist.py --merge a.json b.json --readme benchmarks/README.md
    python benchmarks/quality_mnist.py --synthetic --quick                           # smoke test

Everything uses dnn2bnn's defaults and fixed seeds:

1. ``LeNet-5 (deterministic parent)``: Adam with a one-cycle learning rate, ``--parent-epochs``.
2. ``LeNet-5 converted + fine-tuned``: ``dnn2bnn.transform_to_bnn_model(parent)`` (nothing
   else), then ``--finetune-epochs`` of the true per-example ELBO (``WithBNNLoss.elbo``: mean
   cross-entropy + KL summed over all weights / N) with the recommended optimizer
   (``dnn2bnn.bayes_param_groups``: a 10x larger learning rate for rho).
3. ``Blundell MLP``: ``BayesLinear`` 784-1200-1200-10 with the scale-mixture prior
   (pi=0.5, sigma1=1, sigma2=e^-6), trained from scratch as a BNN, for as many epochs as fit in
   ``--mlp-minutes`` (the table reports the epochs).

Each model is evaluated on the 10k MNIST test images with ``--samples`` Monte Carlo samples;
OOD AUROC separates the test images from flipped+inverted test images and from scikit-learn's
digits upscaled to 28x28, by predictive entropy (H) and by mutual information (MI). The JSON
goes to ``--out``; with ``--readme`` the markdown table replaces the block between the
``quality_mnist`` markers of that file.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dnn2bnn  # noqa: E402
from _quality_data import Data, load_mnist, ood_sets, synthetic  # noqa: E402
from _quality_eval import EVALUATION, evaluate, markdown_table, save_plots  # noqa: E402
from _quality_posthoc import run_posthoc  # noqa: E402
from _quality_models import LeNet5, blundell_mlp, mlp_prior, mlp_prior_name  # noqa: E402

BEGIN, END = "<!-- quality_mnist:begin -->", "<!-- quality_mnist:end -->"
TARGETS = {
    "converted": {"accuracy": (">=", 99.0), "nll": ("<=", 0.030), "ece": ("<=", 0.005),
                  "auroc_entropy_flip+inv": (">=", 0.985), "auroc_entropy_digits": (">=", 0.97)},
    "mlp": {"accuracy": (">=", 98.5)},
}


def batches(n: int, batch_size: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def train_parent(
    data: Data, *, epochs: int, seed: int, batch_size: int = 128, make: Callable[[], nn.Module] = LeNet5
) -> tuple[nn.Module, float]:
    """A deterministic network (LeNet-5 by default): Adam, one-cycle schedule peaking at 3e-3."""
    torch.manual_seed(seed)
    model = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * math.ceil(len(data.y_train) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in batches(len(data.y_train), batch_size, g):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model, time.perf_counter() - start


def train_bnn(
    model: nn.Module,
    data: Data,
    *,
    lr: float,
    seed: int,
    epochs: int | None = None,
    minutes: float | None = None,
    batch_size: int = 128,
    cosine: bool = True,
) -> tuple[int, float, list[dict[str, float]]]:
    """Minimise the true per-example negative ELBO for ``epochs``, or for as many epochs as
    fit in ``minutes``: the first epoch's time fixes that number, and with ``cosine`` the
    learning rates then decay to 0 over the remaining epochs (reproducible given the count)."""
    n = len(data.y_train)
    criterion = dnn2bnn.WithBNNLoss.elbo(model, nn.CrossEntropyLoss(), num_train_examples=n)
    optimizer = torch.optim.Adam(dnn2bnn.bayes_param_groups(model, lr=lr))
    steps_per_epoch = math.ceil(n / batch_size)
    schedule = None
    if cosine:  # cosine over the epochs after the first (when the count is known) down to 0
        horizon: dict[str, int] = {"steps": (epochs or 1) * steps_per_epoch}

        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step / horizon["steps"], 1.0)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        if epochs is None:
            horizon["steps"] = 10**12  # constant until the first epoch fixes the count
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start, done, log = time.perf_counter(), 0, []
    model.train()
    while epochs is None or done < epochs:
        elapsed = time.perf_counter() - start
        if epochs is None and minutes is not None and done:
            epochs = max(1, int(60 * minutes // elapsed))  # as many as the first one says fit
            print(f"    {epochs} epochs fit in {minutes:g} min", flush=True)
            if schedule is not None:
                horizon["steps"] = (epochs - 1) * steps_per_epoch
                schedule.last_epoch = 0  # the cosine starts now, from the base rates
            if done >= epochs:
                break
        total = kl = 0.0
        for idx in batches(n, batch_size, g):
            loss = criterion(data.x_train[idx], data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            total += loss.item() * len(idx)
            kl = criterion.last_kl.item()
        done += 1
        log.append({"epoch": done, "loss": total / n, "kl_over_n": kl / n,
                    "elapsed_s": time.perf_counter() - start})
        print(f"    epoch {done}: -ELBO/N {total / n:.4f}  KL/N {kl / n:.4f}", flush=True)
    return done, time.perf_counter() - start, log


def posterior_width(model: nn.Module) -> dict[str, float]:
    """Median posterior sigma and median sigma/|mu| over all Bayesian weights."""
    sigmas, ratios = [], []
    for m in model.modules():
        if dnn2bnn.is_bayesian_layer(m):
            sigma = m.posterior_sigma("weight").detach().flatten()
            sigmas.append(sigma)
            ratios.append(sigma / m.weight_mu.detach().abs().flatten().clamp_min(1e-12))
    return {"median_sigma": torch.cat(sigmas).median().item(),
            "median_sigma_over_abs_mu": torch.cat(ratios).median().item()}


def check_targets(kind: str, row: dict[str, Any], parent: dict[str, Any] | None) -> list[str]:
    missed = []
    for key, (op, bound) in TARGETS.get(kind, {}).items():
        value = row[key]
        if not (value >= bound if op == ">=" else value <= bound):
            missed.append(f"{key} {value:.4g} (target {op} {bound})")
    if parent is not None:
        for key in ("nll", "ece"):
            if row[key] > parent[key]:
                missed.append(f"{key} {row[key]:.4g} worse than the parent's {parent[key]:.4g}")
    return missed


def get_parent(args: argparse.Namespace, data: Data) -> tuple[nn.Module, float]:
    """The LeNet-5 parent: trained here, or loaded from / saved to ``--parent`` when given."""
    if args.parent is not None and args.parent.exists():
        parent = LeNet5()
        parent.load_state_dict(torch.load(args.parent, weights_only=True))
        print(f"LeNet-5 parent loaded from {args.parent}", flush=True)
        return parent, float("nan")
    print(f"LeNet-5 parent: {args.parent_epochs} epochs", flush=True)
    parent, seconds = train_parent(data, epochs=args.parent_epochs, seed=args.seed)
    if args.parent is not None:
        args.parent.parent.mkdir(parents=True, exist_ok=True)
        torch.save(parent.state_dict(), args.parent)
    return parent, seconds


def run_lenet(
    args: argparse.Namespace, data: Data, oods: dict[str, Tensor], results: dict, parts: set[str]
) -> nn.Module:
    parent, seconds = get_parent(args, data)
    row, raw = evaluate(parent, data.x_test, data.y_test, oods, samples=1)
    row.update(train_s=seconds, epochs=args.parent_epochs)
    row["plots"] = save_plots(raw, args.plots, "lenet_parent") if args.plots else []
    results["LeNet-5 (deterministic parent)"] = row
    print(markdown_table({"parent": row}), flush=True)
    if "lenet" not in parts:
        return parent

    print(f"LeNet-5 converted + {args.finetune_epochs} epochs of fine-tuning", flush=True)
    bnn = dnn2bnn.transform_to_bnn_model(parent, parametrization=args.parametrization)
    torch.manual_seed(args.seed)
    after, _ = evaluate(bnn, data.x_test, data.y_test, {}, samples=args.samples)
    with dnn2bnn.set_mode(bnn, "mean"):
        mean_acc = evaluate(bnn, data.x_test, data.y_test, {}, samples=1)[0]["accuracy"]
    epochs, seconds, log = train_bnn(
        bnn, data, lr=args.lr, seed=args.seed, epochs=args.finetune_epochs
    )
    torch.manual_seed(args.seed)
    row, raw = evaluate(bnn, data.x_test, data.y_test, oods, samples=args.samples)
    row.update(train_s=seconds, epochs=epochs, log=log, **posterior_width(bnn),
               accuracy_at_conversion_sampled=after["accuracy"],
               accuracy_at_conversion_mean=mean_acc)
    parent_row = results["LeNet-5 (deterministic parent)"]
    row["missed_targets"] = check_targets("converted", row, parent_row)
    row["plots"] = save_plots(raw, args.plots, "lenet_converted") if args.plots else []
    results[f"LeNet-5 converted + {epochs} ep."] = row
    print(markdown_table({"converted": row}), flush=True)
    return parent


def run_mlp(args: argparse.Namespace, data: Data, oods: dict[str, Tensor], results: dict) -> None:
    budget = f"{args.mlp_epochs} epochs" if args.mlp_epochs else f"{args.mlp_minutes:g} min"
    print(f"Blundell MLP 784-1200-1200-10, {mlp_prior_name(args.mlp_estimator)}, {budget}",
          flush=True)
    torch.manual_seed(args.seed)
    model = blundell_mlp(hidden=args.mlp_hidden, estimator=args.mlp_estimator,
                         parametrization=args.parametrization)
    pretrain_s, name = 0.0, "Blundell MLP BNN"
    if args.mlp_pretrain_epochs:  # the dnn2bnn way: train deterministically, convert, go on
        dnn, pretrain_s = train_parent(
            data, epochs=args.mlp_pretrain_epochs, seed=args.seed,
            make=lambda: blundell_mlp(hidden=args.mlp_hidden, bayesian=False))
        options = {"prior": mlp_prior(), "estimator": args.mlp_estimator,
                   "parametrization": args.parametrization}
        model = dnn2bnn.transform_to_bnn_model(dnn, **options)
        name = f"Blundell MLP, {args.mlp_pretrain_epochs} det. ep. + converted"
        print(f"    {args.mlp_pretrain_epochs} deterministic epochs in {pretrain_s:.0f} s", flush=True)
    minutes = None if args.mlp_epochs else max(args.mlp_minutes - pretrain_s / 60, 0.1)
    epochs, seconds, log = train_bnn(model, data, lr=args.lr, seed=args.seed,
                                     minutes=minutes, epochs=args.mlp_epochs)
    seconds += pretrain_s
    torch.manual_seed(args.seed)
    row, raw = evaluate(model, data.x_test, data.y_test, oods, samples=args.samples)
    row.update(train_s=seconds, epochs=epochs, log=log, prior=mlp_prior_name(args.mlp_estimator),
               **posterior_width(model))
    row["missed_targets"] = check_targets("mlp", row, None)
    row["plots"] = save_plots(raw, args.plots, "blundell_mlp") if args.plots else []
    row["pretrain_epochs"] = args.mlp_pretrain_epochs
    results[f"{name}, {epochs} ep."] = row
    print(markdown_table({"mlp": row}), flush=True)


def update_readme(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip() + ("\n\n" if old else "") + block + "\n"
    path.write_text(new)


def merge_reports(args: argparse.Namespace) -> dict[str, Any]:
    reports = [json.loads(path.read_text()) for path in args.merge]
    models: dict[str, Any] = {}
    for report in reports:  # a model in several reports (the parent): the first one counts
        for name, row in report["models"].items():
            models.setdefault(name, row)
    table = markdown_table(models)
    parts = [{k: v for k, v in r.items() if k not in ("models", "table")} for r in reports]
    report = {**reports[0], "models": models, "table": table,
              "merged_from": [str(p) for p in args.merge], "parts": parts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table)
    if args.readme:
        update_readme(args.readme, table)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mnist", type=Path, metavar="PATH", help="the MNIST gzip pickle")
    source.add_argument("--synthetic", action="store_true", help="tiny synthetic data (smoke test)")
    source.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="no training: join the models of earlier JSON reports (e.g. of "
                        "--parts lenet and --parts mlp run in parallel) into --out and --readme")
    parser.add_argument("--parts", default="lenet,mlp",
                        help="comma list of: lenet, mlp, posthoc (fit_posterior on the LeNet parent)")
    parser.add_argument("--parent", type=Path, default=None,
                        help="LeNet-5 parent state_dict: loaded if the file exists, else saved there")
    parser.add_argument("--fit-cache", type=Path, default=None,
                        help="posthoc: the default fit's result, loaded if the file exists, else saved")
    parser.add_argument("--linearized", action="store_true",
                        help="posthoc: also score the fitted posteriors with the linearized predictive")
    parser.add_argument("--laplace", action="store_true",
                        help="posthoc: add laplace-torch rows on the same parent (needs .[bench])")
    parser.add_argument("--posthoc-variants", default="",
                        help="posthoc: comma list of non-default fit_posterior variants: t1, "
                        "valdata, global, valprior, valdataprior, conv1, conv1t3, conv1t10, conv12")
    parser.add_argument("--quick", action="store_true",
                        help="1+1 LeNet epochs, 2 MLP minutes, 8 samples")
    parser.add_argument("--parent-epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--mlp-minutes", type=float, default=20.0)
    parser.add_argument("--mlp-epochs", type=int, default=None,
                        help="a fixed number of MLP epochs instead of --mlp-minutes")
    parser.add_argument("--mlp-estimator", default="reparam", choices=["reparam", "lrt", "flipout"],
                        help="reparam fits more epochs in the budget than lrt (better here)")
    parser.add_argument("--mlp-pretrain-epochs", type=int, default=0,
                        help="train the MLP deterministically this many epochs first, convert "
                        "it with dnn2bnn, then train the BNN for the rest of the time budget")
    parser.add_argument("--mlp-hidden", type=int, default=1200)
    parser.add_argument("--parametrization", default="exp", choices=["softplus", "exp"],
                        help="how rho maps to sigma in every Bayesian layer (issue 17)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the means")
    parser.add_argument("--samples", type=int, default=20,
                        help="Monte Carlo samples for evaluation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality_mnist.json"))
    parser.add_argument("--plots", type=Path, default=None, help="folder for the PNG plots")
    parser.add_argument("--readme", type=Path, default=None,
                        help="markdown file to put the table in")
    args = parser.parse_args(argv)
    if args.quick:
        args.parent_epochs, args.finetune_epochs = 1, 1
        args.mlp_minutes, args.samples = min(args.mlp_minutes, 2.0), min(args.samples, 8)
    if args.merge:
        return merge_reports(args)
    torch.set_num_threads(args.threads)
    data = synthetic() if args.synthetic else load_mnist(args.mnist)
    oods = ood_sets(data.x_test, digits=True)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"lenet", "mlp", "posthoc"}:
        parser.error(f"--parts takes lenet, mlp and/or posthoc, got {args.parts!r}")
    if parts & {"lenet", "posthoc"}:
        parent = run_lenet(args, data, oods, results, parts)
        if "posthoc" in parts:
            run_posthoc(args, data, oods, results, parent)
    if "mlp" in parts:
        run_mlp(args, data, oods, results)
    table = markdown_table(results)
    report = {
        "data": data.name, "evaluation": EVALUATION, "samples": args.samples, "seed": args.seed,
        "threads": args.threads, "torch": torch.__version__, "dnn2bnn": dnn2bnn.__version__,
        "machine": platform.machine(), "command": " ".join(sys.argv),
        "total_s": time.perf_counter() - start, "models": results, "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{table}\n\nJSON: {args.out}  (evaluation: {EVALUATION})")
    for name, row in results.items():
        if row.get("missed_targets"):
            print(f"missed by {name}: " + "; ".join(row["missed_targets"]))
    if args.readme:
        update_readme(args.readme, table)
    return report


if __name__ == "__main__":
    main()
