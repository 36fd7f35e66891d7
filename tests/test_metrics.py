"""dnn2bnn.metrics against hand-computed values and scikit-learn."""

import math

import pytest
import torch

from dnn2bnn import metrics

PROBS = torch.tensor([[0.92, 0.08], [0.83, 0.17], [0.26, 0.74], [0.55, 0.45]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_accuracy_nll_brier_by_hand():
    assert metrics.accuracy(PROBS, LABELS) == 0.75
    expected_nll = -(math.log(0.92) + math.log(0.17) + math.log(0.74) + math.log(0.55)) / 4
    assert metrics.nll(PROBS, LABELS) == pytest.approx(expected_nll, abs=1e-6)
    # sum_c (p_c - y_c)^2 per row: 2*0.08^2, 2*0.83^2, 2*0.26^2, 2*0.45^2
    expected_brier = (0.0128 + 1.3778 + 0.1352 + 0.405) / 4
    assert metrics.brier_score(PROBS, LABELS) == pytest.approx(expected_brier, abs=1e-6)


def test_ece_equal_width_by_hand():
    # confidences 0.92, 0.83, 0.74, 0.55; correct 1, 0, 1, 1. Two bins: (0, .5] empty, (.5, 1] all.
    assert metrics.ece(PROBS, LABELS, num_bins=2) == pytest.approx(abs(0.75 - 0.76), abs=1e-6)
    # Ten bins: 0.55->bin 5, 0.74->bin 7, 0.83->bin 8, 0.92->bin 9, one input each.
    expected = (abs(1 - 0.55) + abs(1 - 0.74) + abs(0 - 0.83) + abs(1 - 0.92)) / 4
    assert metrics.ece(PROBS, LABELS, num_bins=10) == pytest.approx(expected, abs=1e-6)


def test_ece_adaptive_bins_by_hand():
    # Sorted confidences 0.55 (ok), 0.74 (ok) | 0.83 (wrong), 0.92 (ok): two bins of two.
    curve = metrics.calibration_curve(PROBS, LABELS, num_bins=2, binning="adaptive")
    assert curve.count.tolist() == [2, 2]
    assert curve.confidence.tolist() == pytest.approx([0.645, 0.875])
    assert curve.accuracy.tolist() == [1.0, 0.5]
    expected = 0.5 * abs(1 - 0.645) + 0.5 * abs(0.5 - 0.875)
    assert metrics.ece(PROBS, LABELS, num_bins=2, binning="adaptive") == pytest.approx(expected)


def test_adaptive_bins_have_equal_mass():
    probs = torch.softmax(torch.randn(103, 4), -1)
    labels = torch.randint(0, 4, (103,))
    curve = metrics.calibration_curve(probs, labels, num_bins=10, binning="adaptive")
    assert curve.count.sum() == 103 and curve.count.max() - curve.count.min() <= 1


def test_a_calibrated_predictor_has_small_ece():
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(20000, generator=g) * 0.5 + 0.5
    correct = torch.rand(20000, generator=g) < conf  # accuracy equals confidence
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.where(correct, 0, 1)
    assert metrics.ece(probs, labels) < 0.02
    assert metrics.ece(probs, 1 - labels) > 0.4


def test_auroc_aupr_by_hand():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0, 0, 1, 1])
    assert metrics.auroc(scores, labels) == 0.75  # 3 of 4 (pos, neg) pairs ordered
    # thresholds 0.8: P=1, R=.5; 0.4: P=.5; 0.35: P=2/3, R=1 -> AP = .5*1 + .5*2/3
    assert metrics.aupr(scores, labels) == pytest.approx(0.5 + 1 / 3)
    assert metrics.auroc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5  # tie counts half
    assert metrics.ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0
    assert metrics.ood_auroc(torch.tensor([0.3, 0.4]), torch.tensor([0.1, 0.2])) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_aupr_match_sklearn_with_ties(seed):
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (80,), generator=g).double()
    labels = torch.randint(0, 2, (80,), generator=g)
    assert metrics.auroc(scores, labels) == pytest.approx(sk.roc_auc_score(labels, scores))
    assert metrics.aupr(scores, labels) == pytest.approx(sk.average_precision_score(labels, scores))
    ins, outs = scores[labels == 0], scores[labels == 1]
    assert metrics.ood_auroc(ins, outs) == pytest.approx(sk.roc_auc_score(labels, scores))


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: metrics.accuracy(torch.rand(4), torch.zeros(4, dtype=torch.long)), ValueError),
        (lambda: metrics.nll(torch.rand(4, 2), torch.zeros(3, dtype=torch.long)), ValueError),
        (lambda: metrics.nll(torch.rand(4, 2), torch.zeros(4)), TypeError),
        (lambda: metrics.ece(PROBS, LABELS, binning="quantile"), ValueError),
        (lambda: metrics.ece(PROBS, LABELS, num_bins=0), ValueError),
        (lambda: metrics.auroc(torch.rand(3), torch.tensor([1, 1, 1])), ValueError),
        (lambda: metrics.auroc(torch.rand(3), torch.tensor([0, 2, 1])), ValueError),
        (lambda: metrics.ood_auroc(torch.rand(3), torch.rand(0)), ValueError),
    ],
)
def test_mistakes_raise(call, error):
    with pytest.raises(error):
        call()
