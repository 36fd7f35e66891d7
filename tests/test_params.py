"""Parameter-level Bayesian layers (dnn2bnn/layers/params.py)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

import dnn2bnn
from dnn2bnn import BayesianParameters, BayesMultiheadAttention, opt_in_mapping, set_mode


def _run(module, inputs):
    out = module(*inputs)
    if isinstance(out, tuple):  # RNNs: (output, state); attention: (output, weights)
        out = out[0]
    if hasattr(out, "data") and isinstance(out, nn.utils.rnn.PackedSequence):
        out = out.data
    return out


# (factory, inputs, number of Bayesian parameters expected)
OPT_IN = [
    (lambda: nn.Embedding(10, 4, padding_idx=0), lambda: (torch.tensor([[0, 3, 9]]),), 1),
    (lambda: nn.EmbeddingBag(10, 4, mode="sum"), lambda: (torch.tensor([[1, 2], [3, 4]]),), 1),
    (lambda: nn.LayerNorm(6), lambda: (torch.randn(2, 6),), 2),
    (lambda: nn.LayerNorm(6, bias=False), lambda: (torch.randn(2, 6),), 1),
    (lambda: nn.GroupNorm(2, 4), lambda: (torch.randn(2, 4, 3),), 2),
    (lambda: nn.RMSNorm(6), lambda: (torch.randn(2, 6),), 1),
    (lambda: nn.BatchNorm1d(4), lambda: (torch.randn(3, 4),), 2),
    (lambda: nn.BatchNorm2d(4).eval(), lambda: (torch.randn(2, 4, 3, 3),), 2),
    (lambda: nn.InstanceNorm2d(3, affine=True), lambda: (torch.randn(2, 3, 4, 4),), 2),
    (lambda: nn.LSTM(4, 5, num_layers=2, bidirectional=True), lambda: (torch.randn(3, 2, 4),), 16),
    (lambda: nn.LSTM(4, 5, proj_size=3, batch_first=True, bias=False), lambda: (torch.randn(2, 3, 4),), 3),
    (lambda: nn.GRU(4, 5), lambda: (torch.randn(3, 2, 4),), 4),
    (lambda: nn.RNN(4, 5, nonlinearity="relu"), lambda: (torch.randn(3, 2, 4),), 4),
    (lambda: nn.LSTMCell(4, 5), lambda: (torch.randn(2, 4),), 4),
    (lambda: nn.GRUCell(4, 5, bias=False), lambda: (torch.randn(2, 4),), 2),
    (lambda: nn.RNNCell(4, 5), lambda: (torch.randn(2, 4),), 4),
]
IDS = [type(make()).__name__ + f"-{i}" for i, (make, _, _) in enumerate(OPT_IN)]


def _convert(make):
    dnn = make()
    return dnn, opt_in_mapping()[type(dnn)].from_dnn(dnn, posterior_sigma_init=0.05)


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize("make, inputs, count", OPT_IN, ids=IDS)
def test_opt_in_layers_mean_mode_sampling_and_gradients(make, inputs, count):
    dnn, bnn = _convert(make)
    x = inputs()
    assert type(bnn).__name__ == "Bayes" + type(dnn).__name__ and isinstance(bnn, type(dnn))
    assert len(bnn.bayes_params) == count
    assert {n + "_mu" for n in bnn.bayes_params} <= set(dict(bnn.named_parameters()))
    for name in bnn.bayes_params:
        assert torch.equal(getattr(bnn, name + "_mu"), getattr(dnn, name))
    with set_mode(bnn, "mean"):
        torch.testing.assert_close(_run(bnn, x), _run(dnn, x), rtol=0, atol=1e-6)
    first, second = _run(bnn, x), _run(bnn, x)
    assert not torch.equal(first, second)
    (first.sum() + bnn.kl()).backward()
    for name in bnn.bayes_params:
        for suffix in ("_mu", "_rho"):
            grad = getattr(bnn, name + suffix).grad
            assert grad is not None and torch.isfinite(grad).all(), name + suffix
    # between calls nothing holds on to a sample (RNNs keep their means in _flat_weights)
    assert bnn._sample_cache is None
    for w in getattr(bnn, "_flat_weights", []):
        assert w is None or isinstance(w, nn.Parameter)


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize("make, inputs, count", OPT_IN, ids=IDS)
def test_opt_in_layers_round_trips(make, inputs, count, tmp_path):
    dnn, bnn = _convert(make)
    x = inputs()
    with torch.no_grad():
        for name in bnn.bayes_params:
            getattr(bnn, name + "_mu").add_(0.01)
    with set_mode(bnn, "mean"):
        expected = _run(bnn, x)
    back = bnn.to_dnn()
    assert type(back) is type(dnn)
    torch.testing.assert_close(_run(back, x), expected, rtol=0, atol=1e-6)
    torch.save(bnn, tmp_path / "m.pt")
    for restored in (torch.load(tmp_path / "m.pt", weights_only=False), copy.deepcopy(bnn), pickle.loads(pickle.dumps(bnn))):
        assert type(restored) is type(bnn)
        with set_mode(restored, "mean"):
            torch.testing.assert_close(_run(restored, x), expected, rtol=0, atol=1e-6)
    fresh = _convert(make)[1]
    fresh.load_state_dict(bnn.state_dict())
    with set_mode(fresh, "mean"):
        torch.testing.assert_close(_run(fresh, x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("parametrization", ["exp", "softplus"])
def test_kl_is_the_closed_form_over_the_chosen_parameters(parametrization):
    bnn = BayesianParameters.from_dnn(
        nn.LayerNorm(5), params=["weight"], prior_sigma=0.5, posterior_sigma_init=0.1, parametrization=parametrization
    )
    with torch.no_grad():
        bnn.weight_rho.add_(torch.linspace(-1.0, 2.0, 5))
    sigma_of = torch.exp if parametrization == "exp" else F.softplus
    q = Normal(bnn.weight_mu, sigma_of(bnn.weight_rho))
    expected = kl_divergence(q, Normal(torch.tensor(0.0), torch.tensor(0.5))).sum()
    torch.testing.assert_close(bnn.kl(), expected)
    assert isinstance(bnn.bias, nn.Parameter)  # not chosen: still the plain parameter
    torch.testing.assert_close(dnn2bnn.kl_divergence(nn.Sequential(bnn)), expected)


class Twice(nn.Module):
    """Reads its parameter twice per call; without a per-call sample the output is noise."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.bias = None  # a plain attribute named like a Bayesian one

    def forward(self, x):
        return x * self.w - x * self.w


def test_one_sample_per_call_and_plain_attributes_survive():
    bnn = BayesianParameters.from_dnn(Twice(), params=["w"], posterior_sigma_init=1.0)
    assert torch.equal(bnn(torch.ones(3)), torch.zeros(3))
    assert not torch.equal(bnn.w, bnn.w)  # outside a call, each read samples
    assert bnn.bias is None
    bnn.bias = 3
    assert bnn.bias == 3 and "bias" not in bnn._parameters
    with pytest.raises(AttributeError, match="w_mu"):
        bnn.w = torch.zeros(3)
    with torch.no_grad():
        bnn.w_rho.fill_(5.0)
    bnn.reset_parameters()  # Twice has no reset_parameters: sigma only
    torch.testing.assert_close(bnn.posterior_sigma("w"), torch.full((3,), 1.0))


def test_bad_parameter_choices_raise_clear_errors():
    with pytest.raises(TypeError, match=r"LayerNorm.running is not a parameter.*\['weight', 'bias'\]"):
        BayesianParameters.from_dnn(nn.LayerNorm(3), params=["running"])
    with pytest.raises(TypeError, match="no dots"):
        BayesianParameters.from_dnn(nn.Sequential(nn.LayerNorm(3)), params=["0.weight"])
    with pytest.raises(TypeError, match="has no parameter to make Bayesian"):
        BayesianParameters.from_dnn(nn.LayerNorm(3, elementwise_affine=False))
    with pytest.raises(TypeError, match="list of parameter names"):
        BayesianParameters.from_dnn(nn.LayerNorm(3), params="weight")
    with pytest.raises(TypeError, match="bias is None"):
        BayesianParameters.from_dnn(nn.Linear(3, 2, bias=False), params=["bias"])
    with pytest.raises(TypeError, match="already a Bayesian layer"):
        BayesianParameters.from_dnn(dnn2bnn.BayesLinear(2, 2), params=["weight_mu"])
    with pytest.raises(ValueError, match="posterior_sigma_init must be > 0"):
        BayesianParameters.from_dnn(nn.LayerNorm(3), posterior_sigma_init=0)
    clash = nn.LayerNorm(3)
    clash.register_buffer("weight_prior_mu", torch.zeros(()))
    with pytest.raises(TypeError, match="already has an attribute 'weight_prior_mu'"):
        BayesianParameters.from_dnn(clash, params=["weight"])


MHA_CASES = [
    dict(embed_dim=8, num_heads=2),
    dict(embed_dim=8, num_heads=2, batch_first=True, bias=False),
    dict(embed_dim=8, num_heads=2, kdim=5, vdim=3, add_bias_kv=True),
]


@pytest.mark.parametrize("kwargs", MHA_CASES, ids=["packed", "batch-first-no-bias", "kdim-vdim-bias-kv"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-fast-path"])
def test_multihead_attention(kwargs, train):
    dnn = nn.MultiheadAttention(**kwargs).train(train)
    bnn = BayesMultiheadAttention.from_dnn(dnn)
    expected = [n for n, p in dnn._parameters.items() if p is not None]
    assert list(bnn.bayes_params) == [n for n in BayesMultiheadAttention.candidate_params if n in expected]
    assert isinstance(bnn, BayesMultiheadAttention) and isinstance(bnn.out_proj, dnn2bnn.BayesLinear)
    shape = (1, 4, 8) if kwargs.get("batch_first") else (4, 1, 8)
    q = torch.randn(shape)
    k = torch.randn(*shape[:-1], kwargs.get("kdim", 8))
    v = torch.randn(*shape[:-1], kwargs.get("vdim", 8))
    with torch.no_grad():
        with set_mode(bnn, "mean"):
            torch.testing.assert_close(bnn(q, k, v)[0], dnn(q, k, v)[0], rtol=0, atol=1e-6)
        assert not torch.equal(bnn(q, k, v)[0], bnn(q, k, v)[0])
    bnn(q, k, v)[0].sum().backward()
    for name in bnn.bayes_params:
        assert getattr(bnn, name + "_rho").grad is not None
    assert bnn.out_proj.weight_rho.grad is not None
    assert type(bnn.to_dnn()) is nn.MultiheadAttention


def test_multihead_attention_constructor():
    attn = BayesMultiheadAttention(8, 2, prior_sigma=0.3)
    assert attn.bayes_params == ("in_proj_weight", "in_proj_bias")
    assert attn.prior.sigma == 0.3 and attn.out_proj.prior.sigma == 0.3
    assert dnn2bnn.kl_divergence(attn) > 0
    x = torch.randn(3, 1, 8)
    assert attn(x, x, x)[0].shape == (3, 1, 8)


def test_gpt2_conv1d():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    dnn = nn.Sequential(pytorch_utils.Conv1D(6, 4), nn.Tanh(), pytorch_utils.Conv1D(2, 6))
    assert pytorch_utils.Conv1D in dnn2bnn.default_mapping()
    bnn = dnn2bnn.transform_to_bnn_model(dnn)
    assert [type(m).__name__ for m in bnn] == ["BayesConv1D", "Tanh", "BayesConv1D"]
    assert bnn[0].weight_mu.shape == (4, 6)  # GPT-2 keeps [in, out]
    x = torch.randn(2, 3, 4)
    with set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(x), dnn(x), rtol=0, atol=1e-6)
    assert not torch.equal(bnn(x), bnn(x))


class WithWeightProperty(nn.Module):
    def __init__(self):
        super().__init__()
        self.raw = nn.Parameter(torch.ones(2))

    @property
    def weight(self):
        return self.raw * 2

    def forward(self, x):
        return x * self.weight


def test_a_class_defined_weight_property_is_kept():
    bnn = BayesianParameters.from_dnn(WithWeightProperty(), params=["raw"])
    with set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(torch.ones(2)), torch.full((2,), 2.0))


def test_parameter_level_layers_use_reparam_and_say_so():
    with pytest.warns(dnn2bnn.ConversionWarning, match="'flipout' cannot be applied; it uses 'reparam'"):
        bnn = BayesianParameters.from_dnn(nn.LayerNorm(3), estimator="flipout")
    assert bnn.estimator.value == "reparam"
    dnn = nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 8))
    with pytest.warns(dnn2bnn.ConversionWarning, match="1: LSTM has parameter-level"):
        converted = dnn2bnn.transform_to_bnn_model(dnn, layer_types=[nn.Linear, nn.LSTM], estimator="flipout")
    assert converted[0].estimator.value == "flipout" and converted[1].estimator.value == "reparam"


@pytest.mark.parametrize("make", [
    lambda: nn.Embedding(6, 3, padding_idx=2),
    lambda: nn.EmbeddingBag(6, 3, mode="sum", padding_idx=2),
], ids=["Embedding", "EmbeddingBag"])
def test_embedding_padding_row_is_deterministic_without_kl_or_gradient(make):
    """Issue 14 item 6: the padding row stays exactly zero, has no KL and no gradient."""
    torch.manual_seed(0)
    dnn = make()
    bnn = opt_in_mapping()[type(dnn)].from_dnn(dnn, posterior_sigma_init=0.3, prior_sigma=0.5)
    tokens = torch.tensor([[2, 1, 2], [2, 2, 2]])
    out = bnn(tokens)
    if isinstance(bnn, nn.Embedding):
        assert out[:, [0, 2]].abs().max() == 0 and out[1].abs().max() == 0
    else:
        assert out[1].abs().max() == 0  # a bag of padding tokens only
    (out.pow(2).sum() + bnn.kl()).backward()
    assert bnn.weight_rho.grad[2].abs().max() == 0
    assert bnn.weight_mu.grad[2].abs().max() == 0
    keep = [0, 1, 3, 4, 5]
    mu, sigma = bnn.weight_mu.detach()[keep], torch.exp(bnn.weight_rho.detach()[keep])  # exp: the default
    expected = kl_divergence(Normal(mu, sigma), Normal(torch.tensor(0.0), torch.tensor(0.5))).sum()
    torch.testing.assert_close(bnn.kl(), expected)
    with torch.no_grad():
        torch.testing.assert_close(dnn2bnn.kl_divergence(bnn), expected)
    with set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(tokens), dnn(tokens))


def test_embedding_max_norm_trains():
    """Issue 14 item 6: ``max_norm`` renormalises the call's sample and backward works."""
    torch.manual_seed(0)
    dnn = nn.Embedding(6, 3, max_norm=0.5)
    bnn = opt_in_mapping()[nn.Embedding].from_dnn(dnn, posterior_sigma_init=0.3)
    out = bnn(torch.tensor([1, 3, 1]))
    assert out.norm(dim=1).max() <= 0.5 + 1e-6
    (out.sum() + bnn.kl()).backward()
    assert bnn.weight_rho.grad[1].abs().sum() > 0
