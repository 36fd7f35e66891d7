"""Evaluation for ``quality_mnist.py``: Monte Carlo predictive, metrics, OOD AUROC, tables, plots.

Uses :func:`dnn2bnn.predict`, :mod:`dnn2bnn.metrics` and :mod:`dnn2bnn.plots` when this
version of dnn2bnn has them. Otherwise (an older dnn2bnn) it falls back to the minimal
local implementations at the bottom of this file, marked ``FALLBACK``, and the JSON says
``"evaluation": "fallback"``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import dnn2bnn

try:  # the library's implementations (issue 5)
    from dnn2bnn import metrics as _metrics
    from dnn2bnn import plots as _plots
    from dnn2bnn import predict as _predict

    EVALUATION = "dnn2bnn"
except ImportError:  # pragma: no cover - depends on the installed dnn2bnn
    _metrics = _plots = _predict = None
    EVALUATION = "fallback"

__all__ = ["EVALUATION", "evaluate", "markdown_table", "row_from_samples", "save_plots"]

#: Columns of the markdown table: (JSON key, header, format).
COLUMNS = (
    ("accuracy", "acc. %", "{:.2f}"),
    ("nll", "NLL", "{:.4f}"),
    ("ece", "ECE (15 bins)", "{:.4f}"),
    ("brier", "Brier", "{:.4f}"),
    ("auroc_entropy_flip+inv", "AUROC H flip+inv", "{:.3f}"),
    ("auroc_mi_flip+inv", "AUROC MI flip+inv", "{:.3f}"),
    ("auroc_entropy_digits", "AUROC H digits", "{:.3f}"),
    ("auroc_mi_digits", "AUROC MI digits", "{:.3f}"),
    ("mean_mi_test", "mean MI (test)", "{:.2e}"),
    ("mi_ratio_flip+inv", "MI OOD/test flip+inv", "{:.1f}"),
    ("fit_s", "fit s", "{:.0f}"),
    ("train_s", "train s", "{:.0f}"),
)


def _has_bayes(model: nn.Module) -> bool:
    """Whether some Bayesian layer of ``model`` samples (not a DNN, not all in "mean" mode)."""
    return any(
        dnn2bnn.is_bayesian_layer(m) and getattr(m, "bayes_mode", "sample") == "sample"
        for m in model.modules()
    )


@torch.no_grad()
def predictive(
    model: nn.Module, x: Tensor, samples: int, batch_size: int = 500
) -> dict[str, Tensor]:
    """Class probabilities, predictive entropy and mutual information of ``model`` on ``x``."""
    if not _has_bayes(model):  # deterministic: one pass, no epistemic part
        was = model.training
        model.eval()
        chunks = [model(x[i : i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)]
        probs = torch.cat(chunks)
        model.train(was)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        return {"probs": probs, "entropy": entropy, "mi": torch.zeros_like(entropy)}
    if _predict is not None:
        result = _predict(model, x, num_samples=samples, batch_size=batch_size)
        return {
            "probs": result.probs,
            "entropy": result.predictive_entropy,
            "mi": result.mutual_information,
        }
    return _fallback_predictive(model, x, samples, batch_size)


def evaluate(
    model: nn.Module, x_test: Tensor, y_test: Tensor, oods: dict[str, Tensor], *, samples: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """The table row of ``model`` and the raw outputs (for the plots)."""
    return _score(lambda x: predictive(model, x, samples), x_test, y_test, oods)


def _score(
    predict: Any, x_test: Tensor, y_test: Tensor, oods: dict[str, Tensor]
) -> tuple[dict[str, float], dict[str, Any]]:
    """The table row and raw outputs of ``predict(x) -> {"probs", "entropy", "mi"}``."""
    m = _metrics if _metrics is not None else _Fallback
    inside = predict(x_test)
    probs = inside["probs"]
    row = {
        "accuracy": 100.0 * m.accuracy(probs, y_test),
        "nll": m.nll(probs, y_test),
        "ece": m.ece(probs, y_test, num_bins=15),
        "brier": m.brier_score(probs, y_test),
        "mean_mi_test": inside["mi"].mean().item(),
    }
    raw: dict[str, Any] = {"probs": probs, "labels": y_test, "in": inside, "out": {}}
    for name, x_out in oods.items():
        outside = predict(x_out)
        raw["out"][name] = outside
        row[f"auroc_entropy_{name}"] = m.ood_auroc(inside["entropy"], outside["entropy"])
        row[f"auroc_mi_{name}"] = m.ood_auroc(inside["mi"], outside["mi"])
        _mi_ratio(row, name, inside["mi"], outside["mi"])
    return row, raw


def _mi_ratio(row: dict[str, Any], name: str, mi_in: Tensor, mi_out: Tensor) -> None:
    """Mean mutual information on the OOD set, and its ratio to that on the test set."""
    row[f"mean_mi_{name}"] = mi_out.mean().item()
    test = mi_in.mean().item()
    row[f"mi_ratio_{name}"] = row[f"mean_mi_{name}"] / test if test > 0 else float("nan")


def _from_probs(p: Tensor) -> dict[str, Tensor]:
    """Predictive of stacked per-network probabilities ``[S, B, C]``."""
    probs = p.mean(0)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    expected = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(0)
    return {"probs": probs, "entropy": entropy, "mi": (entropy - expected).clamp_min(0)}


@torch.no_grad()
def row_from_samples(
    draw: Any, x_test: Tensor, y_test: Tensor, oods: dict[str, Tensor]
) -> dict[str, float]:
    """A table row from ``draw(x) -> [S, B, C]`` probabilities (e.g. laplace-torch's samples)."""
    return _score(lambda x: _from_probs(draw(x)), x_test, y_test, oods)[0]


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """One line per model; missing numbers are shown as ``-``."""
    head = "| model | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)
    lines = [head, rule]
    for name, row in rows.items():
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            cells.append(fmt.format(value) if ok else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plots(raw: dict[str, Any], directory: Path, stem: str) -> list[str]:
    """Reliability diagram and uncertainty histograms (needs dnn2bnn.plots and matplotlib)."""
    if _plots is None:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}_reliability.png", directory / f"{stem}_entropy.png"]
    _plots.reliability_diagram(raw["probs"], raw["labels"], title=stem, path=paths[0])
    _plots.uncertainty_histogram(
        raw["in"]["entropy"],
        {name: out["entropy"] for name, out in raw["out"].items()},
        xlabel="predictive entropy",
        in_label="MNIST test",
        title=stem,
        path=paths[1],
    )
    if float(raw["in"]["mi"].abs().sum()) > 0:
        paths.append(directory / f"{stem}_mi.png")
        _plots.uncertainty_histogram(
            raw["in"]["mi"],
            {name: out["mi"] for name, out in raw["out"].items()},
            xlabel="mutual information",
            in_label="MNIST test",
            title=stem,
            path=paths[2],
        )
    return [str(p) for p in paths]


# ---------------------------------------------------------------------- FALLBACK
# Minimal stand-ins used only when dnn2bnn has no predict/metrics (before issue 5 is merged).


def _fallback_predictive(
    model: nn.Module, x: Tensor, samples: int, batch_size: int
) -> dict[str, Tensor]:
    was = model.training
    model.eval()
    chunks = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        chunks.append(torch.stack([model(xb).softmax(-1) for _ in range(samples)]))
    model.train(was)
    p = torch.cat(chunks, 1)  # [S, N, C]
    probs = p.mean(0)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    expected = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(0)
    return {"probs": probs, "entropy": entropy, "mi": (entropy - expected).clamp_min(0)}


class _Fallback:
    @staticmethod
    def accuracy(probs: Tensor, labels: Tensor) -> float:
        return (probs.argmax(-1) == labels).double().mean().item()

    @staticmethod
    def nll(probs: Tensor, labels: Tensor) -> float:
        return -probs.double().gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()

    @staticmethod
    def brier_score(probs: Tensor, labels: Tensor) -> float:
        onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
        return ((probs.double() - onehot) ** 2).sum(-1).mean().item()

    @staticmethod
    def ece(probs: Tensor, labels: Tensor, *, num_bins: int = 15) -> float:
        confidence, predicted = probs.double().max(-1)
        correct = (predicted == labels).double()
        bins = (confidence * num_bins).ceil().clamp(1, num_bins).long() - 1
        total = 0.0
        for b in range(num_bins):
            mask = bins == b
            if mask.any():
                gap = (confidence[mask].mean() - correct[mask].mean()).abs().item()
                total += mask.double().mean().item() * gap
        return total

    @staticmethod
    def ood_auroc(in_scores: Tensor, out_scores: Tensor) -> float:
        scores = torch.cat([in_scores, out_scores]).double()
        _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
        ranks = (counts.cumsum(0).double() - (counts.double() - 1) / 2)[inverse]
        n_in, n_out = len(in_scores), len(out_scores)
        u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
        return (u / (n_in * n_out)).item()
