"""Model-wide conversion of chosen parameters and opt-in layer types (conversion/_params.py)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnn2bnn
from dnn2bnn import ConversionError, ConversionWarning, set_mode, transform_to_bnn_model


class Tiny(nn.Module):
    """A transformer-ish model: token + position embeddings, attention, norm, LSTM, head."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(20, 8)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8) * 0.1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.w_out = nn.Parameter(torch.randn(3, 8) * 0.1)

    def forward(self, idx):
        x = self.tok(idx) + self.pos_embed
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.rnn(self.norm(x))[0]
        return F.linear(x.mean(1), self.w_out)


def _names(bnn):
    return {c.name: (c.new_type, c.params) for c in bnn.conversion_report.converted}


def test_default_converts_attention_and_leaves_opt_in_layers_alone():
    dnn = Tiny().eval()
    bnn = transform_to_bnn_model(dnn)
    assert _names(bnn) == {
        "": ("BayesTiny", ("w_out",)),  # the root's own weight, used by F.linear
        "attn": ("BayesMultiheadAttention", ("in_proj_weight", "in_proj_bias")),
        "attn.out_proj": ("BayesNonDynamicallyQuantizableLinear", ()),
    }
    converted = {c.name: c.traced_use for c in bnn.conversion_report.converted}
    assert converted == {"": True, "attn": True, "attn.out_proj": True}  # out_proj runs inside attn
    idx = torch.randint(0, 20, (2, 5))
    with torch.no_grad(), set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(idx), dnn(idx), rtol=0, atol=1e-6)


def test_opt_in_types_and_params_globs():
    dnn = Tiny().eval()
    bnn = transform_to_bnn_model(
        dnn, layer_types=[nn.MultiheadAttention, nn.Linear, nn.Embedding, nn.LayerNorm, nn.LSTM],
        params=["pos_embed", "w_*"],
    )
    names = _names(bnn)
    assert names[""] == ("BayesTiny", ("pos_embed", "w_out"))  # the root's own parameters
    assert names["tok"] == ("BayesEmbedding", ("weight",))
    assert names["norm"] == ("BayesLayerNorm", ("weight", "bias"))
    assert names["rnn"][1] == ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    assert isinstance(bnn, Tiny) and not bnn.conversion_report.skipped
    # every parameter of the model is now a posterior mean or rho
    assert all(n.endswith(("_mu", "_rho")) for n, _ in bnn.named_parameters())
    idx = torch.randint(0, 20, (2, 5))
    with torch.no_grad(), set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(idx), dnn(idx), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert not torch.equal(bnn(idx), bnn(idx))
    loss = bnn(idx).sum() + dnn2bnn.kl_divergence(bnn)
    loss.backward()
    assert all(p.grad is not None for p in bnn.parameters())
    assert type(bnn.to_dnn()) is Tiny


def test_params_union_with_type_choice_and_bypass_of_exclude():
    dnn = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3, bias=True))
    bnn = transform_to_bnn_model(dnn, layer_types=[nn.Linear], exclude="0", params=["0.weight", "1.bias"])
    names = _names(bnn)
    assert names["0"] == ("BayesLinear", ("weight",)) and not isinstance(bnn[0], dnn2bnn.BayesLinear)
    assert names["1"] == ("BayesLayerNorm", ("bias",))
    assert isinstance(bnn[0].bias, nn.Parameter)


def test_params_errors():
    with pytest.raises(ConversionError, match="params pattern 'nope' matches no parameter"):
        transform_to_bnn_model(Tiny(), params="nope")
    with pytest.raises(TypeError, match="qualified parameter names"):
        transform_to_bnn_model(Tiny(), params=[3])
    with pytest.raises(TypeError, match="no Bayesian layer for nn.PReLU"):
        transform_to_bnn_model(Tiny(), layer_types=[nn.PReLU])


def test_opt_in_skips_are_warned_and_strict_raises():
    dnn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False), nn.BatchNorm1d(3))
    with pytest.warns(ConversionWarning, match="1: BatchNorm1d has no parameter to make Bayesian"):
        bnn = transform_to_bnn_model(dnn, layer_types=[nn.Linear, nn.BatchNorm1d])
    assert [s.name for s in bnn.conversion_report.skipped] == ["1"]
    assert "BayesBatchNorm1d [weight, bias]" in str(bnn.conversion_report)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConversionError, match="strict conversion: 1 skipped: 1"):
            transform_to_bnn_model(dnn, layer_types=[nn.BatchNorm1d], strict=True)


def test_transform_to_bnn_layer_accepts_opt_in_types():
    dnn = nn.Sequential(nn.GRU(3, 4))
    bnn = dnn2bnn.transform_to_bnn_layer(dnn, nn.GRU)
    assert type(bnn[0]).__name__ == "BayesGRU" and len(bnn[0].bayes_params) == 4


def test_converted_copy_shares_no_storage_with_the_user_model():
    dnn = Tiny()
    dnn.head = nn.Linear(8, 20, bias=False)
    dnn.head.weight = dnn.tok.weight  # tied: copied, not shared
    before = {k: v.clone() for k, v in dnn.state_dict().items()}
    with pytest.warns(ConversionWarning):
        bnn = transform_to_bnn_model(dnn, layer_types=[nn.MultiheadAttention, nn.Linear, nn.LSTM])
    ptrs = {t.data_ptr() for t in dnn.state_dict().values()}
    assert not ptrs & {t.data_ptr() for t in bnn.state_dict().values()}
    assert type(dnn.attn) is nn.MultiheadAttention and type(dnn.rnn) is nn.LSTM
    with torch.no_grad():
        for p in bnn.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in dnn.state_dict().items())
    idx = torch.randint(0, 20, (1, 5))
    assert dnn(idx).shape == (1, 3)  # the user's LSTM still has its own flat weights


class Scale(nn.Module):
    """A user layer with parameters not called weight/bias."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.full((4,), 2.0))
        self.shift = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return x * self.gain + self.shift


def test_parameter_converter_for_a_user_layer_type():
    from dnn2bnn.layers import parameter_converter

    dnn = nn.Sequential(Scale(), nn.Linear(4, 4), Scale())
    bnn = dnn2bnn.transform_to_bnn_layer(dnn, Scale, parameter_converter(Scale, ("gain",)))
    assert [c.params for c in bnn.conversion_report.converted] == [("gain",), ("gain",)]
    assert isinstance(bnn[0], Scale) and isinstance(bnn[0].shift, nn.Parameter)
    x = torch.randn(3, 4)
    with set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(x), dnn(x), rtol=0, atol=0)


def test_a_layer_configured_none_keeps_its_own_copy_of_the_weights():
    dnn = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    config = dnn2bnn.BayesConfigMapping(dnn2bnn.BayesConfig()).set_module_name("1", None)
    bnn = transform_to_bnn_model(dnn, config=config)
    assert isinstance(bnn[0], dnn2bnn.BayesLinear) and type(bnn[1]) is nn.Linear
    assert bnn[1].weight is not dnn[1].weight and torch.equal(bnn[1].weight, dnn[1].weight)
    assert bnn[1].weight.data_ptr() != dnn[1].weight.data_ptr()


def test_to_dnn_makes_nested_and_root_level_layers_plain():
    dnn = Tiny().eval()
    bnn = transform_to_bnn_model(dnn, layer_types=[nn.MultiheadAttention, nn.Linear, nn.LSTM], params=["w_out"])
    idx = torch.randint(0, 20, (2, 5))
    for plain in (dnn2bnn.to_dnn(bnn), bnn.to_dnn()):
        assert not any(isinstance(m, dnn2bnn.BayesianLayer) for m in plain.modules())
        assert type(plain) is Tiny and type(plain.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        with torch.no_grad():
            torch.testing.assert_close(plain(idx), dnn(idx), rtol=0, atol=1e-6)
