"""BayesConfig / BayesConfigMapping: priority, keyword shortcuts, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dnn2bnn
from dnn2bnn import BayesConfig, BayesConfigMapping, Estimator, NormalPrior, ScaleMixturePrior
from dnn2bnn.errors import ConversionError
from tests.conftest import LeNet5


def _estimators(bnn):
    return {n: m.estimator.value for n, m in bnn.named_modules() if hasattr(m, "estimator")}


def test_priority_name_beats_type_beats_global():
    mapping = (
        BayesConfigMapping()
        .set_global(BayesConfig(estimator="flipout"))
        .set_module_type(nn.Conv2d, BayesConfig(estimator="lrt", prior=NormalPrior(0, 0.1)))
        .set_module_name("features.3", BayesConfig(estimator="reparam"))
        .set_module_name("classifier", BayesConfig(prior=ScaleMixturePrior()))
        .set_module_name("classifier.5", None)
    )
    bnn = dnn2bnn.transform_to_bnn_model(LeNet5(), config=mapping)
    assert _estimators(bnn) == {
        "features.0": "lrt",  # type
        "features.3": "reparam",  # name beats type
        "classifier.1": "reparam",  # ancestor name beats global
        "classifier.3": "reparam",
    }
    assert type(bnn.classifier[5]) is nn.Linear  # None: left deterministic
    assert any(s.name == "classifier.5" and "None" in s.reason for s in bnn.conversion_report.skipped)
    assert bnn.features[0].prior == NormalPrior(0, 0.1)
    assert isinstance(bnn.classifier[1].prior, ScaleMixturePrior)
    # the deepest matching pattern wins regardless of order; among equals the latest
    later = BayesConfigMapping().set_module_name("classifier.1", BayesConfig(estimator="lrt"))
    later.set_module_name("classifier", BayesConfig(estimator="flipout"))
    assert later.config_for("classifier.1", nn.Linear).estimator is Estimator.LRT
    assert later.config_for("classifier.3", nn.Linear).estimator is Estimator.FLIPOUT


def test_a_single_config_and_keyword_shortcuts_are_equivalent():
    cfg = BayesConfig(prior=NormalPrior(0.0, 0.3), posterior_sigma_init=0.01, estimator="lrt")
    a = dnn2bnn.transform_to_bnn_model(LeNet5(), config=cfg)
    b = dnn2bnn.transform_to_bnn_model(LeNet5(), prior_sigma=0.3, posterior_sigma_init=0.01, estimator=Estimator.LRT)
    assert [m.bayes_config for m in a.modules() if hasattr(m, "bayes_config")] == [
        m.bayes_config for m in b.modules() if hasattr(m, "bayes_config")
    ] == [cfg] * 5
    # shortcuts on top of a single config
    c = dnn2bnn.transform_to_bnn_model(LeNet5(), config=cfg, estimator="flipout")
    assert set(_estimators(c).values()) == {"flipout"} and c.features[0].prior.sigma == 0.3


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"estimatr": "lrt"}, TypeError, "unknown Bayesian option 'estimatr'"),
        ({"estimator": "bbb"}, ValueError, "estimator must be one of"),
        ({"prior": "normal"}, TypeError, "prior must be one of"),
        ({"prior": NormalPrior(), "prior_sigma": 0.1}, TypeError, "either prior= or prior_mean="),
        ({"config": {"estimator": "lrt"}}, TypeError, "config must be a BayesConfig or a BayesConfigMapping"),
        ({"config": BayesConfigMapping(), "estimator": "lrt"}, TypeError, "either a BayesConfigMapping"),
        (
            {"config": BayesConfigMapping().set_module_name("fc9", None)},
            ConversionError,
            "config name pattern 'fc9' matches no module",
        ),
    ],
)
def test_bad_configuration_names_the_option(kwargs, error, message):
    with pytest.raises(error, match=message):
        dnn2bnn.transform_to_bnn_model(LeNet5(), **kwargs)


def test_mapping_setters_check_their_arguments():
    with pytest.raises(TypeError, match="set_module_type: module_type must be an nn.Module subclass"):
        BayesConfigMapping().set_module_type("Linear", BayesConfig())
    with pytest.raises(TypeError, match="set_global: expected a BayesConfig or None, got dict"):
        BayesConfigMapping().set_global({"estimator": "lrt"})
    with pytest.raises(TypeError, match="pattern must be a non-empty string"):
        BayesConfigMapping().set_module_name("", BayesConfig())
    with pytest.raises(ValueError, match="posterior_sigma_init must be > 0"):
        BayesConfig(posterior_sigma_init=0)
    with pytest.raises(Exception, match="cannot assign"):
        BayesConfig().estimator = "lrt"  # frozen


def test_layer_constructor_accepts_config_and_shortcuts():
    layer = dnn2bnn.BayesConv2d(1, 2, 3, config=BayesConfig(estimator="flipout"), prior_sigma=0.2)
    assert layer.estimator is Estimator.FLIPOUT and layer.prior == NormalPrior(0.0, 0.2)
    assert layer(torch.randn(2, 1, 5, 5)).shape == (2, 2, 3, 3)
