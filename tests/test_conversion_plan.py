"""The conversion's steps one at a time: analyse -> plan_conversion -> check -> apply_plan ->
report_plan (conversion/_trace.py, _request.py, _plan.py, _apply.py, report.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnn2bnn
from dnn2bnn import BayesianLayer, ConversionError
from dnn2bnn.conversion._apply import apply_plan
from dnn2bnn.conversion._mapping import default_mapping
from dnn2bnn.conversion._candidates import Action
from dnn2bnn.conversion._plan import check_finite, plan_conversion
from dnn2bnn.conversion._request import build_request, layer_type_mapping, resolve_layer_type
from dnn2bnn.conversion._trace import ParamUse, analyse
from dnn2bnn.conversion.report import report_plan
from tests.conftest import state_equal


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.aux = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))
        self.b = nn.Parameter(torch.zeros(4))
        self.scale = nn.Parameter(torch.ones(4))
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        h = F.linear(self.fc(x), self.w.t(), self.b)
        return self.norm(h * self.scale) + self.fc(h)


def _request(model, **kwargs):
    options = kwargs.pop("options", {})
    args = dict(
        mapping=default_mapping(),
        function="transform_to_bnn_model",
        explicit_types=False,
        include=None,
        exclude=None,
        config=None,
        options=options,
        params=None,
    )
    args.update(kwargs)
    return build_request(model, **args)


def test_analyse_finds_uses_and_weight_slots():
    model = Net()
    trace = analyse(model, (*default_mapping(), BayesianLayer))
    assert trace.ok
    assert trace.uses[id(model.fc)] == 2 and id(model.aux) not in trace.uses
    assert trace.param_uses == {
        "w": [ParamUse("linear", "weight")],
        "b": [ParamUse("linear", "bias", ("w",))],
    }  # scale (elementwise) and norm (a module) are no weights


def test_plan_decides_without_changing_the_model():
    model = Net()
    before = copy.deepcopy(model)
    trace = analyse(model, (*default_mapping(), BayesianLayer))
    plan = plan_conversion(model, _request(model, exclude="aux"), trace)
    decisions = {c.name: (c.action, c.reason) for c in plan.candidates}
    assert decisions == {
        "": (Action.CONVERT, "w: used as the weight of linear(); b: used as the bias of linear()"),
        "fc": (Action.CONVERT, ""),
        "aux": (Action.SKIP, "excluded by 'aux'"),
    }
    root = plan.candidates[0]
    assert root.params == ("w", "b") and root.config == dnn2bnn.BayesConfig()
    assert state_equal(model, before) and not any(isinstance(m, BayesianLayer) for m in model.modules())


def test_apply_and_report_carry_out_the_plan():
    model = Net().eval()
    x = torch.randn(3, 4)
    expected = model(x)
    trace = analyse(model, (*default_mapping(), BayesianLayer))
    plan = plan_conversion(model, _request(model), trace)
    result = apply_plan(model, plan, {})
    assert result is model and isinstance(model, dnn2bnn.BayesianParameters)
    assert isinstance(model.fc, dnn2bnn.BayesLinear) and model.fc._share_samples  # used twice
    with torch.no_grad(), dnn2bnn.set_mode(model, "mean"):
        torch.testing.assert_close(model(x), expected)
    report = report_plan(plan, params_before=0, result=result, call={"function": "test"})
    assert [(c.name, c.new_type, c.params) for c in report.converted] == [
        ("", "BayesNet", ("w", "b")),
        ("fc", "BayesLinear", ()),
        ("aux", "BayesLinear", ()),
    ]
    assert report.shared == ["fc"] and report.params_after == sum(p.numel() for p in model.parameters())
    assert [c.traced_use for c in report.converted] == [True, True, False]


def test_check_finite_refuses_before_apply():
    model = Net()
    with torch.no_grad():
        model.w[0, 0] = float("nan")
    plan = plan_conversion(model, _request(model), analyse(model, (*default_mapping(), BayesianLayer)))
    with pytest.raises(ConversionError, match=r"<root>.w \(\S*Net\) holds 1 NaN"):
        check_finite(plan)


def test_request_validation_and_filters():
    model = Net()
    request = _request(model, include=["fc", "aux"], exclude="aux")
    assert request.filtered_out(["fc"]) is None
    assert request.filtered_out(["aux"]) == "excluded by 'aux'"
    assert request.filtered_out(["norm"]) == "not matched by include"
    with pytest.raises(ConversionError, match="exclude pattern 'nope' matches no module of Net"):
        _request(model, exclude="nope")
    with pytest.raises(TypeError, match="include patterns must be non-empty strings"):
        _request(model, include=[""])
    assert resolve_layer_type("Conv2d", where="x") is nn.Conv2d
    assert list(layer_type_mapping(["Linear", nn.Conv2d])) == [nn.Linear, nn.Conv2d]


def test_a_plan_keeps_and_reconfigures_bayesian_layers():
    model = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Linear(2, 2)))
    trace = analyse(model, (*default_mapping(), BayesianLayer))
    kept = plan_conversion(model, _request(model), trace)
    assert [(c.name, c.action) for c in kept.candidates] == [("0", Action.KEEP)]
    changed = plan_conversion(model, _request(model, options={"posterior_sigma_init": 0.1}), trace)
    (candidate,) = changed.candidates
    assert candidate.action is Action.RECONFIGURE and candidate.reset_sigma
    assert candidate.config.posterior_sigma_init == 0.1
