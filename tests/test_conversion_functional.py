"""Functional weights: a model's own parameters used by F.linear/F.conv*, @, matmul, einsum,
bmm, addmm (conversion/_trace.py and the functional step of conversion/_plan.py)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnn2bnn
from dnn2bnn import ConversionError, ConversionWarning, set_mode, transform_to_bnn_model


class Functional(nn.Module):
    """``self.w`` (and ``self.b``) used by one functional form, then a Linear head."""

    def __init__(self, form, w_shape=(4, 4), b_shape=None):
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.randn(*w_shape) * 0.5)
        self.b = None if b_shape is None else nn.Parameter(torch.randn(*b_shape) * 0.1)
        self.register_buffer("mask", (torch.rand(*w_shape) > 0.3).float())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        w, b = self.w, self.b
        forms = {
            "at": lambda: x @ w,
            "at_t": lambda: x @ w.t(),
            "matmul": lambda: torch.matmul(x, w),
            "method": lambda: x.matmul(w),
            "weight_first": lambda: (w @ x.T).T,
            "einsum": lambda: torch.einsum("bi,ij->bj", x, w),
            "bmm": lambda: torch.bmm(x.unsqueeze(1), w.expand(x.shape[0], 4, 4)).squeeze(1),
            "masked": lambda: x @ (w * self.mask),
            "linear": lambda: F.linear(x, w, b),
            "addmm": lambda: torch.addmm(b, x, w),
            "conv": lambda: F.conv1d(x.unsqueeze(1), w, b).mean(1),
        }
        return self.head(torch.tanh(forms[self.form]()))


FORMS = [
    ("at", {}, ("w",)),
    ("at_t", {}, ("w",)),
    ("matmul", {}, ("w",)),
    ("method", {}, ("w",)),
    ("weight_first", {}, ("w",)),
    ("einsum", {}, ("w",)),
    ("bmm", {}, ("w",)),
    ("masked", {}, ("w",)),
    ("linear", {"b_shape": (4,)}, ("w", "b")),
    ("addmm", {"b_shape": (4,)}, ("w", "b")),
    ("conv", {"w_shape": (3, 1, 1), "b_shape": (3,)}, ("w", "b")),
]


@pytest.mark.parametrize("form, kwargs, expected", FORMS, ids=[f[0] for f in FORMS])
def test_own_parameters_used_as_weights_become_bayesian(form, kwargs, expected):
    dnn = Functional(form, **kwargs).eval()
    x = torch.randn(4, 4)
    bnn = transform_to_bnn_model(dnn, strict=True, posterior_sigma_init=0.05)
    report = bnn.conversion_report
    root = {c.name: c for c in report.converted}[""]
    assert root.params == expected and root.reason.startswith("w: used as")
    assert not report.skipped
    assert isinstance(bnn, Functional) and isinstance(bnn, dnn2bnn.BayesianParameters)
    with torch.no_grad(), set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(x), dnn(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert not torch.equal(bnn(x), bnn(x))
    assert torch.equal(bnn.mask, dnn.mask)  # a buffer feeding the weight stays a buffer
    bnn(x).sum().backward()
    assert bnn.w_rho.grad is not None and bnn.w_rho.grad.abs().sum() > 0


def test_a_vector_operand_is_reported_warned_and_strict_raises():
    class Dot(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = nn.Parameter(torch.randn(4))
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) @ self.v

    with pytest.warns(ConversionWarning, match=r"v: used as an operand of @\(\), a 1-d tensor"):
        bnn = transform_to_bnn_model(Dot())
    assert [(s.name, s.type) for s in bnn.conversion_report.skipped] == [("v", "nn.Parameter")]
    assert isinstance(bnn.v, nn.Parameter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConversionError, match="strict conversion: 1 skipped: v"):
            transform_to_bnn_model(Dot(), strict=True)
    bnn = transform_to_bnn_model(Dot(), params="v", strict=True)  # the way to convert it
    assert bnn.conversion_report.converted[0].params == ("v",)


def test_a_bias_whose_weight_stays_deterministic_is_reported():
    class Gram(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return torch.addmm(self.b, x, x.t())

    with pytest.warns(ConversionWarning, match=r"b: used as the bias of addmm\(\) whose weight"):
        bnn = transform_to_bnn_model(Gram())
    assert [s.name for s in bnn.conversion_report.skipped] == ["b"]


def test_a_child_module_weight_used_by_the_parent_is_converted_on_the_child():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return x @ self.block.kernel + x @ self.block.kernel.T

    dnn = Net()
    bnn = transform_to_bnn_model(dnn, posterior_sigma_init=0.5)
    converted = {c.name: c for c in bnn.conversion_report.converted}
    assert list(converted) == ["block"] and converted["block"].params == ("kernel",)
    assert bnn.conversion_report.shared == ["block"]  # read twice: one sample per call
    x = torch.eye(4)
    out = bnn(x)
    # with x = I, out = K + K^T for one sample K: symmetric only if both reads see the same K
    torch.testing.assert_close(out, out.T)
    with pytest.warns(ConversionWarning, match="nothing in Net was converted: every one of the 1"):
        excluded = transform_to_bnn_model(dnn, exclude="block")
    assert [(s.name, s.reason) for s in excluded.conversion_report.skipped] == [
        ("block.kernel", "used as an operand of @(); its owner is excluded by 'block'")
    ]


def test_transform_to_bnn_layer_and_layer_types_leave_functional_weights_with_a_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))
            self.fc = nn.Linear(4, 4)
            self.conv = nn.Conv1d(1, 1, 1)

        def forward(self, x):
            return F.linear(x @ self.w, self.fc.weight) + self.conv(x.unsqueeze(1)).squeeze(1)

    layer = dnn2bnn.transform_to_bnn_layer(Mixed(), nn.Conv1d)  # deliberate: no warning
    skipped = {s.name: s.reason for s in layer.conversion_report.skipped}
    assert skipped == {
        "w": "used as an operand of @(); transform_to_bnn_layer converts only the layers of its type",
        "fc.weight": "used as the weight of linear(); transform_to_bnn_layer converts only the "
        "layers of its type",
    }
    typed = transform_to_bnn_model(Mixed(), layer_types=[nn.Conv1d])
    skipped = {s.name: s.reason for s in typed.conversion_report.skipped}
    assert skipped == {"fc.weight": "used as the weight of linear(); its owner (nn.Linear) is not in layer_types"}
    assert typed.conversion_report.converted[0].params == ("w",)  # the model's own weight


def test_an_embedding_used_as_a_tied_output_projection_is_converted():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4)

        def forward(self, idx):
            return F.linear(self.tok(idx), self.tok.weight)

    bnn = transform_to_bnn_model(LM(), posterior_sigma_init=0.1, strict=True)
    converted = {c.name: c for c in bnn.conversion_report.converted}
    assert converted["tok"].params == ("weight",) and converted["tok"].new_type == "BayesEmbedding"
    assert bnn.conversion_report.shared == ["tok"]
    # one sample E per call for the lookup and the projection: logits = E E^T is symmetric
    logits = bnn(torch.arange(10))
    torch.testing.assert_close(logits, logits.T)
    assert not torch.equal(logits, bnn(torch.arange(10)))


def test_a_model_that_cannot_be_traced_reports_parameters_of_unknown_use():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x @ self.w)
            return self.fc(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnn = transform_to_bnn_model(Branchy())
    messages = [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]
    assert len(messages) == 1 and "1 parameter(s) of unknown use were left deterministic (w)" in messages[0]
    assert [(s.name, s.reason.split(",")[0]) for s in bnn.conversion_report.skipped] == [
        ("w", "tracing failed")
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConversionError, match="strict conversion: 1 skipped: w"):
            transform_to_bnn_model(Branchy(), strict=True)
        assert transform_to_bnn_model(Branchy(), params="w", strict=True).conversion_report.converted


@pytest.mark.slow
def test_timm_condconv_weights_are_bayesian():
    """efficientnet_cc_b0_4e mixes its CondConv2d weights with torch.matmul(routing, weight)
    and passes the result to F.conv2d: those weights (10.7M of 12M) must not stay
    deterministic in silence."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        dnn = timm.create_model("efficientnet_cc_b0_4e", pretrained=False)
    cond = [m for m in dnn.modules() if type(m).__name__ == "CondConv2d"]
    bnn = transform_to_bnn_model(dnn, inplace=True, strict=True)
    report = bnn.conversion_report
    assert len(cond) == 24 and not report.skipped
    converted = [c for c in report.converted if c.old_type.endswith("CondConv2d")]
    assert len(converted) == 24
    assert all("weight" in c.params and "operand of matmul()" in c.reason for c in converted)
    left = [n for n, p in bnn.named_parameters() if not n.endswith(("_mu", "_rho"))]
    assert all(".bn" in n or n.startswith("bn") for n in left), left[:5]


def test_timm_condconv_layer_mean_mode_equals_the_dnn():
    cond_conv = pytest.importorskip("timm.layers.cond_conv2d")
    dnn = cond_conv.CondConv2d(3, 4, 3, num_experts=4, bias=True).eval()
    x, routing = torch.randn(2, 3, 6, 6), torch.softmax(torch.randn(2, 4), 1)
    bnn = transform_to_bnn_model(dnn, posterior_sigma_init=0.01, strict=True)
    assert bnn.conversion_report.converted[0].params == ("weight", "bias")
    with torch.no_grad(), set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(x, routing), dnn(x, routing), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert not torch.equal(bnn(x, routing), dnn(x, routing))


def test_separate_biases_of_a_converted_layer_weight_are_converted():
    """EVA-02's attention: F.linear(x, self.qkv.weight, torch.cat((q_bias, k_bias, v_bias)))."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12, bias=False)
            self.q_bias = nn.Parameter(torch.randn(4))
            self.register_buffer("k_bias", torch.zeros(4), persistent=False)
            self.v_bias = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))

    dnn = Attention()
    bnn = transform_to_bnn_model(dnn, strict=True)
    converted = {c.name: c for c in bnn.conversion_report.converted}
    assert converted[""].params == ("q_bias", "v_bias") and converted["qkv"].new_type == "BayesLinear"
    assert converted[""].reason == "q_bias: used as the bias of linear(); v_bias: used as the bias of linear()"
    x = torch.randn(2, 4)
    with torch.no_grad(), set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(x), dnn(x), rtol=0, atol=0)


def test_a_functional_embedding_table_is_reported_and_convertible_by_name():
    """Regression: a model's own table used by F.embedding was left deterministic without a
    word (not in the report, also with strict=True); it is opt-in like nn.Embedding."""

    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 4))
            self.head = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(F.embedding(ids, self.table))

    bnn = dnn2bnn.transform_to_bnn_model(Lookup())
    skipped = {s.name: s.reason for s in bnn.conversion_report.skipped}
    assert "table of embedding()" in skipped["table"] and "params=" in skipped["table"]
    assert not hasattr(bnn, "table_mu")
    chosen = dnn2bnn.transform_to_bnn_model(Lookup(), params=["table"])
    assert hasattr(chosen, "table_mu") and chosen(torch.tensor([[1, 2]])).shape == (1, 2, 2)
