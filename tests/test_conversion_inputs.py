"""What conversion accepts, refuses and warns about: lazy layers, empty conversions, layer
type names, numeric options, non-finite weights, weight tying (conversion/_request.py,
conversion/_plan.py, config.py)."""

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnn2bnn
from dnn2bnn import (
    BayesConfig,
    BayesLinear,
    ConversionError,
    ConversionWarning,
    transform_to_bnn_layer,
    transform_to_bnn_model,
)
from tests.conftest import mlp


# ---------------------------------------------------------------------------- lazy layers
def test_a_lazy_layer_is_warned_about_skipped_and_strict_raises():
    dnn = nn.Sequential(nn.Linear(3, 3), nn.LazyLinear(2))
    with pytest.warns(ConversionWarning, match="1: LazyLinear.weight is uninitialized"):
        bnn = transform_to_bnn_model(dnn)
    assert isinstance(bnn[0], BayesLinear) and type(bnn[1]) is nn.LazyLinear
    assert [(s.name, s.type) for s in bnn.conversion_report.skipped] == [("1", "nn.LazyLinear")]
    assert bnn(torch.randn(4, 3)).shape == (4, 2)  # the lazy layer still initialises
    with pytest.raises(ConversionError, match="strict conversion: 1 skipped: 1 .nn.LazyLinear."):
        transform_to_bnn_model(dnn, strict=True, inplace=True)
    assert type(dnn[0]) is nn.Linear  # strict raises before anything changes


def test_uninitialized_parameters_anywhere_are_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.lazy_conv = nn.LazyConv2d(2, 3)
            self.norm = nn.LazyBatchNorm2d()
            self.w = nn.parameter.UninitializedParameter()

        def forward(self, x):
            x = self.norm(self.lazy_conv(self.conv(x)))
            return F.linear(x.flatten(1), self.w)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnn = transform_to_bnn_model(Net())  # torch cannot deep-copy lazy buffers itself
    assert len([w for w in caught if issubclass(w.category, ConversionWarning)]) == 1
    skipped = {s.name: s.reason for s in bnn.conversion_report.skipped}
    assert set(skipped) == {"lazy_conv", "norm.weight", "norm.bias", "w"}
    assert "uninitialized (lazy)" in skipped["w"] and "used as the weight of linear()" in skipped["w"]
    assert skipped["norm.weight"].startswith("uninitialized (a lazy LazyBatchNorm2d)")
    assert [c.name for c in bnn.conversion_report.converted] == ["conv"]


# ---------------------------------------------------------------------------- nothing converted
@pytest.mark.parametrize(
    "make, kwargs, why",
    [
        (lambda: nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), {}, "it has no layer of the requested types"),
        (lambda: mlp(), {"exclude": "*"}, "every one of the 3 candidate"),
        (lambda: mlp(), {"layer_types": [nn.Conv2d]}, r"requested types \(nn.Conv2d\)"),
        (lambda: nn.Sequential(nn.LazyLinear(2)), {}, "1 candidate.s. left deterministic .0: LazyLinear"),
    ],
    ids=["no-layer", "all-excluded", "other-types", "all-refused"],
)
def test_a_conversion_that_converts_nothing_warns_why(make, kwargs, why):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnn = transform_to_bnn_model(make(), **kwargs)
    messages = [str(w.message) for w in caught if "nothing in" in str(w.message)]
    assert len(messages) == 1 and re.search(why, messages[0]), messages
    assert not bnn.conversion_report.converted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transform_to_bnn_layer(nn.Sequential(nn.ReLU()), nn.Linear)
    assert ["nothing in Sequential was converted" in str(w.message) for w in caught] == [True]


# ---------------------------------------------------------------------------- layer type names
@pytest.mark.parametrize(
    "name", ["Linear", "nn.Linear", "torch.nn.Linear", "torch.nn.modules.linear:Linear", "torch.nn:Linear"]
)
def test_layer_types_accept_class_names(name):
    bnn = transform_to_bnn_model(nn.Sequential(nn.Linear(2, 2), nn.Conv1d(1, 1, 1)), layer_types=[name])
    assert [c.name for c in bnn.conversion_report.converted] == ["0"]
    assert bnn.conversion_report.calls[0]["layer_types"] == ["torch.nn.modules.linear:Linear"]
    assert type(transform_to_bnn_layer(nn.Sequential(nn.Linear(2, 2)), name)[0]) is BayesLinear


@pytest.mark.parametrize(
    "entry, message",
    [
        ("Lnear", r"got 'Lnear' \(found nothing\)"),
        ("os:path", r"got 'os:path' \(found <module"),
        ("no_such_package.module:Class", r"got 'no_such_package.module:Class' \(found nothing\)"),
        (3, "got int 3"),
        (nn.Linear(2, 2), "got Linear Linear"),
        ("PReLU", "layer_types: no Bayesian layer for nn.PReLU"),
    ],
)
def test_a_bad_layer_type_entry_is_named(entry, message):
    with pytest.raises(TypeError, match=message):
        transform_to_bnn_model(mlp(), layer_types=[nn.Conv2d, entry])


# ---------------------------------------------------------------------------- numeric options
@pytest.mark.parametrize(
    "value", [np.float32(0.25), np.float64(0.25), np.int64(1), torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64)]
)
def test_numpy_scalars_and_0d_tensors_are_real_numbers(value):
    bnn = transform_to_bnn_model(
        mlp(), prior_sigma=value, prior_mean=value, posterior_sigma_init=value, moped_delta=value
    )
    expected = float(value)
    assert bnn[0].prior == dnn2bnn.NormalPrior(expected, expected)
    assert bnn[0].bayes_config.moped_delta == expected and bnn[0].posterior_sigma_init == expected
    options = bnn.conversion_report.calls[0]["options"]
    assert all(type(v) is float for v in options.values())  # what save_bnn records
    assert BayesConfig(posterior_sigma_init=value).posterior_sigma_init == expected


@pytest.mark.parametrize("option", ["prior_sigma", "prior_mean", "posterior_sigma_init", "moped_delta"])
@pytest.mark.parametrize(
    "value, error, message",
    [
        (True, TypeError, "must be a real number, got bool True"),
        (np.bool_(False), TypeError, "must be a real number, got bool"),
        ("0.1", TypeError, "must be a real number, got str '0.1'"),
        (torch.tensor([0.1, 0.2]), TypeError, r"must be a real number or a 0-d real tensor, got a tensor of shape \(2,\)"),
        (float("nan"), ValueError, "must be finite, got nan"),
        (torch.tensor(float("inf")), ValueError, "must be finite, got inf"),
        (-0.5, ValueError, "must be > 0, got -0.5"),
    ],
)
def test_bad_numeric_options_are_refused_naming_the_option(option, value, error, message):
    if option == "prior_mean" and message.startswith("must be > 0"):
        assert transform_to_bnn_model(mlp(), prior_mean=value)[0].prior.mean == -0.5
        return
    dnn = mlp()
    named = option
    if option == "prior_sigma" and message.startswith("must be > 0"):
        named = "NormalPrior.sigma"  # the prior checks its own sigma
    with pytest.raises(error, match=f"{named} {message}"):
        transform_to_bnn_model(dnn, inplace=True, **{option: value})
    assert type(dnn[0]) is nn.Linear  # refused before anything changed


# ---------------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_layer_and_parameter(bad):
    dnn = mlp()
    with torch.no_grad():
        dnn[2].bias[1] = bad
    with pytest.raises(ConversionError, match=r"2.bias \(nn.Linear\) holds 1 NaN or infinite value"):
        transform_to_bnn_model(dnn, inplace=True)
    assert not any(isinstance(m, BayesLinear) for m in dnn.modules())
    bnn = transform_to_bnn_model(dnn, exclude="2")  # the way out the message names
    assert torch.isfinite(dnn2bnn.kl_divergence(bnn))


# ---------------------------------------------------------------------------- weight tying
class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx))


def test_weight_tying_says_what_happened_to_each_side():
    with pytest.warns(ConversionWarning, match="head.weight was tied to emb.weight; .* emb.weight stays deterministic"):
        transform_to_bnn_model(TiedLM())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnn = transform_to_bnn_model(TiedLM(), layer_types=[nn.Linear, nn.Embedding])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "stays deterministic" not in messages[0]
    assert "emb.weight was tied to head.weight; both became Bayesian, each with its own posterior" in messages[0]
    assert bnn.conversion_report.notes == [messages[0][len("dnn2bnn: ") : -len(" (see conversion_report)")]]
