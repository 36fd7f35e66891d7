"""Post-hoc rows of ``quality_mnist.py``: a posterior fitted to the trained parent, no training.

* ``fit_posterior`` with its defaults (and the plain marginal-likelihood variant, T = 1, to
  show the collapse the defaults avoid);
* then 1 epoch of ELBO from that posterior, with the recommended optimizer and with a plain
  ``torch.optim.Adam(bnn.parameters(), lr=1e-3)``;
* laplace-torch on the same parent (``--laplace``, optional): all weights with a diagonal GGN
  and a marginal-likelihood prior, sampled networks; the last layer with KFAC.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

import dnn2bnn
from _quality_data import Data
from _quality_eval import evaluate, markdown_table


def _fit(parent: nn.Module, data: Data, args: Any, **options: Any) -> tuple[nn.Module, dnn2bnn.PosteriorFit]:
    bnn = dnn2bnn.transform_to_bnn_model(copy.deepcopy(parent))
    torch.manual_seed(args.seed)
    fit = dnn2bnn.fit_posterior(bnn, (data.x_train, data.y_train), progress=False, **options)
    return bnn, fit


def _linearized_row(
    bnn: nn.Module, data: Data, oods: dict[str, Tensor], args: Any, results: dict[str, Any], name: str
) -> None:
    """The same posterior scored with the linearized predictive (one jvp per sample)."""
    from _quality_eval import row_from_samples

    def draw(x: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(args.seed)
        parts = [dnn2bnn.posterior.linearized_samples(bnn, xb, args.samples, generator=g).softmax(-1)
                 for xb in x.split(1000)]
        return torch.cat(parts, 1)

    print(name, flush=True)
    results[name] = row_from_samples(draw, data.x_test, data.y_test, oods)
    print(markdown_table({"linearized": results[name]}), flush=True)


def _validation_split(args: Any) -> tuple[Tensor, Tensor] | None:
    """The 10k MNIST validation images (not used by the parent's training), if reading MNIST."""
    if not getattr(args, "mnist", None):
        return None
    import gzip
    import pickle

    with gzip.open(args.mnist, "rb") as f:
        _, (x, y), _ = pickle.load(f, encoding="latin1")
    return torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 28, 28), torch.as_tensor(y, dtype=torch.long)


def _row(model: nn.Module, data: Data, oods: dict[str, Tensor], args: Any, **extra: Any) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    row, _ = evaluate(model, data.x_test, data.y_test, oods, samples=args.samples)
    row.update(extra)
    return row


def _finetune(bnn: nn.Module, data: Data, args: Any, *, plain: bool) -> float:
    """``--finetune-epochs`` of the per-example ELBO from the fitted posterior.

    The recipe: ``bayes_param_groups`` (rho at 10x) with a cosine decay to 0, as the other
    fine-tuned rows. Plain: ``torch.optim.Adam(bnn.parameters(), lr=1e-3)``, nothing else.
    """
    n = len(data.y_train)
    criterion = dnn2bnn.WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=n)
    params = bnn.parameters() if plain else dnn2bnn.bayes_param_groups(bnn, lr=1e-3)
    optimizer = torch.optim.Adam(params, lr=1e-3)
    steps = args.finetune_epochs * math.ceil(n / 128)
    schedule = None if plain else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    bnn.train()
    for _ in range(args.finetune_epochs):
        for idx in torch.randperm(n, generator=g).split(128):
            loss = criterion(data.x_train[idx], data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
    return time.perf_counter() - start


def _default_fit(parent: nn.Module, data: Data, args: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The default fit, or its saved result (``--fit-cache``: the posterior state and the record)."""
    cache = getattr(args, "fit_cache", None)
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=False)
        bnn = dnn2bnn.transform_to_bnn_model(copy.deepcopy(parent))
        bnn.load_state_dict(saved["state"])
        print(f"fitted posterior loaded from {cache}", flush=True)
        return bnn, saved["fit"]
    bnn, fit = _fit(parent, data, args)
    print(fit, flush=True)
    record = fit.to_dict()
    if cache is not None:
        torch.save({"state": bnn.state_dict(), "fit": record}, cache)
    return bnn, record


def _first_layer(t: float, *, layers: tuple[str, ...] = ("conv1",)) -> dict[str, float]:
    """One temperature per LeNet-5 layer: ``t`` in ``layers``, 1e-8 (the parent) elsewhere."""
    return {name: (t if name in layers else 1e-8) for name in ("conv1", "conv2", "fc1", "fc2", "fc3")}


def run_posthoc(
    args: Any, data: Data, oods: dict[str, Tensor], results: dict[str, Any], parent: nn.Module
) -> None:
    base = "LeNet-5 + fit_posterior"
    print(f"{base} (defaults)", flush=True)
    bnn, fit = _default_fit(parent, data, args)
    results[f"{base} (defaults, no training)"] = _row(
        bnn, data, oods, args, fit_s=fit["seconds"], temperature=fit["temperature"],
        prior_precision=fit["prior_precision"], val_nll=fit["val_nll"], layers=fit["layers"],
        choice=fit.get("choice", ""),
    )
    print(markdown_table({"posthoc": results[f"{base} (defaults, no training)"]}), flush=True)
    if args.linearized:
        _linearized_row(bnn, data, oods, args, results, f"{base} (defaults), linearized predictive")
    state = copy.deepcopy(bnn.state_dict())
    for plain in (False, True):
        name = f"{base} + {args.finetune_epochs} ep. ELBO ({'plain Adam' if plain else 'recipe'})"
        print(name, flush=True)
        bnn.load_state_dict(state)
        seconds = _finetune(bnn, data, args, plain=plain)
        results[name] = _row(bnn, data, oods, args, train_s=seconds, fit_s=fit["seconds"])
        print(markdown_table({"ft": results[name]}), flush=True)
    val = _validation_split(args)
    variants: dict[str, tuple[str, dict[str, Any]]] = {
        "t1": ("marglik per layer, T=1 (no validation)", {"temperature": 1.0}),
        "valdata": ("T on the MNIST validation split (val_data)", {"val_data": val}),
        "global": ("one marglik lambda, T on validation", {"prior_precision": "marglik"}),
        "valprior": ("one lambda on validation NLL, T=1", {"prior_precision": "val"}),
        "valdataprior": ("one lambda on the MNIST validation split, T=1",
                         {"val_data": val, "prior_precision": "val"}),
        # issue 15's research goal: uncertainty in the first layer separates OOD inputs
        "conv1": ("T=1 in conv1 only", {"temperature": _first_layer(1.0)}),
        "conv1t3": ("T=3 in conv1 only", {"temperature": _first_layer(3.0)}),
        "conv1t10": ("T=10 in conv1 only", {"temperature": _first_layer(10.0)}),
        "conv12": ("T=0.1 in conv1 and conv2", {"temperature": _first_layer(0.1, layers=("conv1", "conv2"))}),
    }
    chosen = [v.strip() for v in (args.posthoc_variants or "").split(",") if v.strip()]
    for key in chosen:
        label, options = variants[key]
        if options.get("val_data", 0) is None:
            continue  # no MNIST validation split (synthetic data)
        print(f"{base}: {label}", flush=True)
        bnn, fit = _fit(parent, data, args, **options)
        print(fit, flush=True)
        results[f"{base}: {label}"] = _row(
            bnn, data, oods, args, fit_s=fit.seconds, temperature=fit.temperature,
            prior_precision=fit.prior_precision, val_nll=fit.val_nll, choice=fit.choice,
        )
        print(markdown_table({"variant": results[f"{base}: {label}"]}), flush=True)
        if args.linearized:
            _linearized_row(bnn, data, oods, args, results, f"{base}: {label}, linearized predictive")
    if args.laplace:
        run_laplace_torch(args, data, oods, results, parent)


def _laplace_row(la: Any, data: Data, oods: dict[str, Tensor], args: Any, **extra: Any) -> dict[str, Any]:
    from _quality_eval import row_from_samples

    def draw(x: Tensor) -> Tensor:  # [S, B, C] probabilities of sampled networks
        torch.manual_seed(args.seed)
        parts = [la.predictive_samples(xb, pred_type="nn", n_samples=args.samples) for xb in x.split(1000)]
        return torch.cat(parts, 1)

    row = row_from_samples(draw, data.x_test, data.y_test, oods)
    row.update(extra)
    return row


def _sequential(lenet: nn.Module) -> nn.Sequential:
    """The same LeNet-5 as an nn.Sequential (BackPack extends Sequential models only)."""
    return nn.Sequential(
        lenet.conv1, nn.ReLU(), nn.MaxPool2d(2), lenet.conv2, nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), lenet.fc1, nn.ReLU(), lenet.fc2, nn.ReLU(), lenet.fc3,
    )


def run_laplace_torch(
    args: Any, data: Data, oods: dict[str, Tensor], results: dict[str, Any], parent: nn.Module
) -> None:
    try:
        from laplace import Laplace
    except ImportError:
        print("laplace-torch is not installed: no laplace-torch rows (pip install .[bench])")
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=256
    )
    from laplace.curvature import BackPackGGN

    settings = {  # BackPack: laplace-torch's default curvlinops backend builds dense matrices here
        "laplace-torch: all weights, diag GGN, marglik prior, sampled": dict(
            subset_of_weights="all", hessian_structure="diag", backend=BackPackGGN),
        "laplace-torch: last layer, KFAC GGN, marglik prior, sampled": dict(
            subset_of_weights="last_layer", hessian_structure="kron"),
    }
    for name, options in settings.items():
        print(name, flush=True)
        model = _sequential(copy.deepcopy(parent)).eval()
        start = time.perf_counter()
        la = Laplace(model, "classification", **options)
        la.fit(loader)
        la.optimize_prior_precision(pred_type="nn", method="marglik")
        seconds = time.perf_counter() - start
        prior = la.prior_precision
        results[name] = _laplace_row(
            la, data, oods, args, fit_s=seconds,
            prior_precision=float(prior.mean()) if isinstance(prior, Tensor) else float(prior),
        )
        print(markdown_table({"la": results[name]}), flush=True)

