"""Metrics for probabilistic classifiers and out-of-distribution detection, on torch tensors.

Classification metrics take ``probs`` (``[N, C]`` predicted probabilities, e.g.
``dnn2bnn.predict(...).probs``) and integer ``labels`` (``[N]``). Detection metrics take a
score per input, where a HIGHER score means "more likely out-of-distribution" (an
uncertainty such as the predictive entropy or the mutual information).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CalibrationCurve",
    "accuracy",
    "aupr",
    "auroc",
    "brier_score",
    "calibration_curve",
    "ece",
    "nll",
    "ood_aupr",
    "ood_auroc",
]

_BINNINGS = ("equal_width", "adaptive")


def _check(probs: Tensor, labels: Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must be [N, C] probabilities, got shape {tuple(probs.shape)}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(
            f"labels must be [N] = [{probs.shape[0]}] class indices, "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of inputs whose most probable class is the label.

    Example:
        >>> dnn2bnn.metrics.accuracy(torch.tensor([[0.9, 0.1], [0.4, 0.6]]), torch.tensor([0, 0]))
        0.5
    """
    _check(probs, labels)
    return (probs.argmax(-1) == labels).double().mean().item()


def nll(probs: Tensor, labels: Tensor, *, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-mean log p(label)`` in nats (``p`` clamped at ``eps``).

    Example:
        >>> round(dnn2bnn.metrics.nll(torch.tensor([[0.5, 0.5]]), torch.tensor([1])), 4)
        0.6931
    """
    _check(probs, labels)
    picked = probs.double().gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return -picked.clamp_min(eps).log().mean().item()


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Mean over inputs of ``sum_c (p_c - onehot_c)^2`` (0 is perfect, 2 the worst).

    Example:
        >>> dnn2bnn.metrics.brier_score(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
        0.5
    """
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).double()
    return (probs.double() - onehot).pow(2).sum(1).mean().item()


@dataclass(frozen=True)
class CalibrationCurve:
    """Per-bin statistics of confidence (max probability) against accuracy; empty bins dropped.

    Attributes:
        confidence: mean confidence in each bin.
        accuracy: accuracy in each bin.
        count: number of inputs in each bin.
        edges: the bin edges (``num_bins + 1``, empty bins included).
        bins: index of each non-empty bin (bin ``k`` spans ``edges[k]`` to ``edges[k + 1]``).
    """

    confidence: Tensor
    accuracy: Tensor
    count: Tensor
    edges: Tensor
    bins: Tensor

    @property
    def ece(self) -> float:
        """Expected calibration error: ``sum_b (n_b / N) |acc_b - conf_b|``."""
        weights = self.count.double() / self.count.sum()
        return (weights * (self.accuracy - self.confidence).abs()).sum().item()


def calibration_curve(
    probs: Tensor, labels: Tensor, *, num_bins: int = 15, binning: str = "equal_width"
) -> CalibrationCurve:
    """Bin inputs by confidence (the max probability) and compare it with accuracy per bin.

    Args:
        probs: ``[N, C]`` probabilities.
        labels: ``[N]`` class indices.
        num_bins: number of bins.
        binning: ``"equal_width"`` (bins ``(k/M, (k+1)/M]``, the first one closed at 0) or
            ``"adaptive"`` (equal-mass bins: sorted by confidence, ``N`` split into ``M``
            groups whose sizes differ by at most one).

    Example:
        >>> curve = dnn2bnn.metrics.calibration_curve(
        ...     torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([0, 1]), num_bins=2)
        >>> curve.confidence, curve.accuracy, curve.count
        (tensor([0.8500], dtype=torch.float64), tensor([0.5000], dtype=torch.float64), tensor([2]))
    """
    _check(probs, labels)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    if binning not in _BINNINGS:
        raise ValueError(f"binning must be one of {list(_BINNINGS)}, got {binning!r}")
    confidence, predicted = probs.double().max(1)
    correct = (predicted == labels).double()
    n = confidence.shape[0]
    if binning == "equal_width":
        edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64, device=probs.device)
        index = (torch.ceil(confidence * num_bins) - 1).clamp(0, num_bins - 1).long()
    else:
        order = confidence.argsort(stable=True)
        index = torch.empty(n, dtype=torch.long, device=probs.device)
        index[order] = torch.arange(n, device=probs.device) * num_bins // max(n, 1)
        sorted_conf = confidence[order]
        starts = [int(-(-k * n // num_bins)) for k in range(num_bins)]  # ceil(k*n/M)
        lows = [sorted_conf[s].item() if s < n else 1.0 for s in starts]
        edges = torch.tensor([0.0, *lows[1:], 1.0], dtype=torch.float64, device=probs.device)
    count = torch.zeros(num_bins, dtype=torch.long, device=probs.device).index_add_(
        0, index, torch.ones_like(index)
    )
    zeros = torch.zeros(num_bins, dtype=torch.float64, device=probs.device)
    conf_sum = zeros.clone().index_add_(0, index, confidence)
    acc_sum = zeros.clone().index_add_(0, index, correct)
    keep = count > 0
    return CalibrationCurve(
        confidence=conf_sum[keep] / count[keep],
        accuracy=acc_sum[keep] / count[keep],
        count=count[keep],
        edges=edges,
        bins=keep.nonzero().squeeze(1),
    )


def ece(
    probs: Tensor, labels: Tensor, *, num_bins: int = 15, binning: str = "equal_width"
) -> float:
    """Expected calibration error (see :func:`calibration_curve` for the binning).

    Example:
        >>> probs, labels = torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([0, 1])
        >>> round(dnn2bnn.metrics.ece(probs, labels, num_bins=2), 4)  # |0.5 - 0.85|
        0.35
    """
    return calibration_curve(probs, labels, num_bins=num_bins, binning=binning).ece


def _binary(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"scores and labels must be 1-d of the same length, got {tuple(scores.shape)} and "
            f"{tuple(labels.shape)}"
        )
    positives = labels.bool() if labels.dtype == torch.bool else labels == 1
    if labels.dtype != torch.bool and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0/1 (or bool), 1 marking the positive class")
    if positives.all() or not positives.any():
        raise ValueError("labels must contain both classes (0 and 1)")
    return scores.double(), positives


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve: ``P(score_pos > score_neg) + P(tie) / 2``.

    Args:
        scores: ``[N]`` scores, higher meaning "positive".
        labels: ``[N]`` 0/1 or bool, 1 for positives.

    Example:
        >>> dnn2bnn.metrics.auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    s, pos = _binary(scores, labels)
    ranks = _average_ranks(s)
    n_pos = pos.sum().double()
    n_neg = (~pos).sum().double()
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2  # Mann-Whitney U of the positives
    return (u / (n_pos * n_neg)).item()


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks, ties sharing their average rank."""
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    return average[inverse]


def aupr(scores: Tensor, labels: Tensor) -> float:
    """Area under the precision-recall curve as average precision,
    ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds (ties form one step).

    Example:
        >>> scores, labels = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
        >>> round(dnn2bnn.metrics.aupr(scores, labels), 4)
        0.8333
    """
    s, pos = _binary(scores, labels)
    unique, inverse = torch.unique(s, return_inverse=True)
    k = unique.shape[0]
    tp = torch.zeros(k, dtype=torch.float64, device=s.device).index_add_(0, inverse, pos.double())
    total = torch.zeros(k, dtype=torch.float64, device=s.device).index_add_(
        0, inverse, torch.ones_like(s)
    )
    # Thresholds from the highest score down.
    tp_cum = tp.flip(0).cumsum(0)
    predicted = total.flip(0).cumsum(0)
    precision = tp_cum / predicted
    recall = tp_cum / pos.sum()
    step = torch.diff(recall, prepend=recall.new_zeros(1))
    return (step * precision).sum().item()


def _ood(in_scores: Tensor, out_scores: Tensor) -> tuple[Tensor, Tensor]:
    for name, value in (("in_scores", in_scores), ("out_scores", out_scores)):
        if value.dim() != 1 or value.numel() == 0:
            raise ValueError(
                f"{name} must be a non-empty 1-d tensor, got shape {tuple(value.shape)}"
            )
    scores = torch.cat([in_scores.double(), out_scores.double().to(in_scores.device)])
    labels = torch.cat(
        [
            torch.zeros(len(in_scores), dtype=torch.long, device=in_scores.device),
            torch.ones(len(out_scores), dtype=torch.long, device=in_scores.device),
        ]
    )
    return scores, labels


def ood_auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """AUROC of telling out-of-distribution inputs (positives) from in-distribution ones by
    a score that is higher out of distribution (e.g. predictive entropy).

    Example:
        >>> dnn2bnn.metrics.ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.15]))
        0.75
    """
    return auroc(*_ood(in_scores, out_scores))


def ood_aupr(in_scores: Tensor, out_scores: Tensor) -> float:
    """AUPR (average precision) with out-of-distribution inputs as positives.

    Example:
        >>> round(dnn2bnn.metrics.ood_aupr(torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.15])), 4)
        0.8333
    """
    return aupr(*_ood(in_scores, out_scores))
