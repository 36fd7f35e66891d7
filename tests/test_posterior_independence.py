"""fit_posterior warns when a model mixes the examples of a batch in eval mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dnn2bnn
from dnn2bnn.posterior._independence import BatchMixingWarning, mixes_examples
from tests.conftest import mlp


def _batch_stats_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 25, 3),
    ).eval()


def test_batch_statistics_in_eval_mode_are_warned_about():
    """BatchNorm(track_running_stats=False) normalizes over the batch even in eval mode: the
    per-example curvature (a batch of one) fitted another network, silently."""
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(_batch_stats_cnn())
    x, y = torch.randn(16, 1, 5, 5), torch.randint(0, 3, (16,))
    with pytest.warns(BatchMixingWarning, match="changes with the other examples of its batch"):
        dnn2bnn.fit_posterior(bnn, (x, y), progress=False, temperature=1.0)


def test_independent_models_are_not_warned_about():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))
    cnn[1].train()  # train mode: fit_posterior runs it in eval mode (running statistics)
    for model, x in ((mlp((4, 8, 3)), torch.randn(16, 4)), (cnn, torch.randn(16, 1, 5, 5))):
        bnn = dnn2bnn.transform_to_bnn_model(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", BatchMixingWarning)
            dnn2bnn.fit_posterior(bnn, (x, torch.randint(0, 3, (16,))), progress=False, temperature=1.0)


def test_mixes_examples_needs_two_examples_and_a_tensor_output():
    model = _batch_stats_cnn()
    assert mixes_examples(model, torch.randn(2, 1, 5, 5))
    assert not mixes_examples(model, torch.randn(1, 1, 5, 5))
    assert not mixes_examples(nn.Linear(3, 2), torch.randn(4, 3))
