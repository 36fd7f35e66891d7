import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

import dnn2bnn
from dnn2bnn import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    BayesLinear,
    set_mode,
)
from dnn2bnn.layers._base import softplus_inverse

# (dnn factory, bayes class, input shape) for every built-in layer and many constructor arguments
CASES = [
    (lambda **kw: nn.Linear(6, 4, **kw), BayesLinear, (3, 6)),
    (lambda **kw: nn.Linear(6, 4, bias=False, **kw), BayesLinear, (3, 6)),
    (lambda **kw: nn.Conv1d(2, 4, 3, stride=2, padding=1, **kw), BayesConv1d, (2, 2, 9)),
    (lambda **kw: nn.Conv1d(4, 4, 3, groups=2, padding="same", padding_mode="circular", **kw), BayesConv1d, (2, 4, 9)),
    (lambda **kw: nn.Conv2d(2, 6, 3, dilation=2, padding="valid", **kw), BayesConv2d, (2, 2, 9, 9)),
    (lambda **kw: nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", bias=False, **kw), BayesConv2d, (2, 2, 7, 7)),
    (lambda **kw: nn.Conv2d(4, 4, (3, 1), groups=4, padding="same", padding_mode="replicate", **kw), BayesConv2d, (2, 4, 6, 5)),
    (lambda **kw: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(1, 0, 1), **kw), BayesConv3d, (1, 2, 4, 5, 4)),
    (lambda **kw: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, **kw), BayesConvTranspose1d, (2, 4, 7)),
    (lambda **kw: nn.ConvTranspose2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0), dilation=(1, 2), bias=False, **kw), BayesConvTranspose2d, (2, 2, 5, 5)),
    (lambda **kw: nn.ConvTranspose3d(2, 2, 2, stride=2, output_padding=1, dilation=2, groups=2, **kw), BayesConvTranspose3d, (1, 2, 3, 3, 3)),
]
IDS = [f"{c[1].__name__}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("make, bayes_cls, shape", CASES, ids=IDS)
def test_from_dnn_keeps_means_and_mean_mode_equals_dnn(make, bayes_cls, shape):
    dnn = make()
    dnn.eval()
    before = {k: v.clone() for k, v in dnn.state_dict().items()}
    bnn = bayes_cls.from_dnn(dnn)
    assert type(bnn) is bayes_cls and isinstance(bnn, type(dnn))
    assert torch.equal(bnn.weight_mu, dnn.weight)
    assert (bnn.bias_mu is None) == (dnn.bias is None)
    assert not bnn.training  # eval mode kept
    # every constructor argument (stride, padding, output_padding, dilation, groups, padding_mode, ...)
    carried = {k: v for k, v in vars(dnn).items() if not isinstance(v, (dict, set, torch.Tensor))}
    assert carried and {k: getattr(bnn, k) for k in carried} == carried
    x = torch.randn(shape)
    with set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(x), dnn(x), rtol=0, atol=1e-6)
    assert not torch.equal(bnn(x), bnn(x))  # sample mode: fresh weights each call
    # the DNN is untouched and shares no storage with the BNN
    assert all(torch.equal(before[k], v) for k, v in dnn.state_dict().items())
    with torch.no_grad():
        bnn.weight_mu.add_(1.0)
    assert torch.equal(before["weight"], dnn.weight)


@pytest.mark.parametrize("make, bayes_cls, shape", CASES, ids=IDS)
def test_constructor_matches_torch_nn(make, bayes_cls, shape):
    """Built by hand with the same arguments, the layer has the torch.nn layer's attributes."""
    dnn = make()
    keys = ("stride", "padding", "dilation", "groups", "padding_mode")
    keys += ("output_padding",) if getattr(dnn, "transposed", False) else ()
    args = {k: getattr(dnn, k) for k in keys if hasattr(dnn, k)}
    if isinstance(dnn, nn.Linear):
        bnn = bayes_cls(dnn.in_features, dnn.out_features, bias=dnn.bias is not None)
    else:
        bnn = bayes_cls(dnn.in_channels, dnn.out_channels, dnn.kernel_size, bias=dnn.bias is not None, **args)
    for key, value in args.items():
        assert getattr(bnn, key) == value
    assert bnn.weight_mu.shape == dnn.weight.shape
    assert bnn(torch.randn(shape)).shape == dnn(torch.randn(shape)).shape


@pytest.mark.parametrize("make, bayes_cls, shape", CASES, ids=IDS)
def test_to_dnn_round_trip(make, bayes_cls, shape):
    dnn = make()
    bnn = bayes_cls.from_dnn(dnn, posterior_sigma_init=0.05)
    back = bnn.to_dnn()
    assert type(back) is type(dnn)
    assert set(dict(back.named_parameters())) == set(dict(dnn.named_parameters()))
    x = torch.randn(shape)
    torch.testing.assert_close(back(x), dnn(x), rtol=0, atol=1e-6)


def test_device_dtype_passthrough():
    layer = BayesLinear(3, 2, dtype=torch.float64)
    assert layer.weight_mu.dtype == layer.weight_rho.dtype == torch.float64
    assert layer(torch.randn(4, 3, dtype=torch.float64)).dtype == torch.float64
    converted = BayesConv2d.from_dnn(nn.Conv2d(1, 2, 3, dtype=torch.float64))
    assert converted.weight_mu.dtype == torch.float64


def test_posterior_sigma_init_and_sample_statistics():
    layer = BayesLinear(50, 40, posterior_sigma_init=0.2)
    torch.testing.assert_close(layer.posterior_sigma(), torch.full((40, 50), 0.2))
    samples = torch.stack([layer.weight.detach() for _ in range(400)])
    mean_err = (samples.mean(0) - layer.weight_mu).abs().mean()
    assert mean_err < 4 * 0.2 / math.sqrt(400)  # the mean abs error of the MC mean is ~0.8 sigma/sqrt(n)
    assert abs(samples.std(0).mean().item() - 0.2) < 0.01


def test_softplus_inverse():
    for value in (1e-6, 1e-3, 0.5, 3.0):
        assert F.softplus(torch.tensor(softplus_inverse(value), dtype=torch.float64)).item() == pytest.approx(value, rel=1e-9)


@pytest.mark.parametrize("parametrization", ["exp", "softplus"])
@pytest.mark.parametrize("make, bayes_cls, shape", CASES[:3], ids=IDS[:3])
def test_kl_matches_torch_distributions(make, bayes_cls, shape, parametrization):
    bnn = bayes_cls.from_dnn(
        make(), prior_mean=0.1, prior_sigma=0.3, posterior_sigma_init=0.05, parametrization=parametrization
    )
    sigma_of = torch.exp if parametrization == "exp" else F.softplus
    with torch.no_grad():
        bnn.weight_rho.add_(torch.randn_like(bnn.weight_rho))
    expected = 0
    for name in ("weight", "bias"):
        mu = getattr(bnn, f"{name}_mu")
        if mu is None:
            continue
        q = Normal(mu, sigma_of(getattr(bnn, f"{name}_rho")))
        expected = expected + kl_divergence(q, Normal(torch.tensor(0.1), torch.tensor(0.3))).sum()
    torch.testing.assert_close(bnn.kl(), expected)
    # direction: KL(q||p), not KL(p||q)
    mu = bnn.weight_mu
    reverse = kl_divergence(Normal(torch.tensor(0.1), torch.tensor(0.3)), Normal(mu, sigma_of(bnn.weight_rho))).sum()
    assert not torch.allclose(bnn.kl(), reverse)


def test_gradients_reach_mu_and_rho():
    layer = BayesConv2d(2, 3, 3)
    layer(torch.randn(4, 2, 6, 6)).pow(2).sum().add(layer.kl()).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_weight_cannot_be_assigned():
    layer = BayesLinear(3, 2)
    with pytest.raises(AttributeError, match="weight_mu"):
        layer.weight = torch.zeros(2, 3)


def test_repr_does_not_draw_samples():
    layer = BayesConv2d(1, 2, 3, bias=False)
    state = torch.get_rng_state()
    text = repr(layer)
    assert torch.equal(state, torch.get_rng_state())
    assert "bias=False" in text and "prior=NormalPrior" in text


def test_reset_parameters_reinitialises_means_and_sigma():
    layer = BayesLinear(5, 3, posterior_sigma_init=0.1)
    with torch.no_grad():
        layer.weight_mu.zero_()
        layer.weight_rho.fill_(3.0)
    layer.reset_parameters()
    assert layer.weight_mu.abs().sum() > 0
    torch.testing.assert_close(layer.posterior_sigma(), torch.full((3, 5), 0.1))


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="posterior_sigma_init must be > 0"):
        BayesLinear(3, 2, posterior_sigma_init=0.0)
    with pytest.raises(ValueError, match="NormalPrior.sigma must be > 0"):
        BayesLinear.from_dnn(nn.Linear(3, 2), prior_sigma=-1.0)
    with pytest.raises(TypeError, match="BayesLinear converts torch.nn.modules.linear.Linear, got Conv2d"):
        BayesLinear.from_dnn(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="already a Bayesian layer"):
        BayesLinear.from_dnn(BayesLinear(2, 2))
    with pytest.raises(TypeError, match="uninitialized"):
        BayesLinear.from_dnn(nn.LazyLinear(3))


def test_parametrized_layer_is_refused():
    from torch.nn.utils.parametrizations import weight_norm

    with pytest.raises(TypeError, match="parametriz"):
        BayesLinear.from_dnn(weight_norm(nn.Linear(3, 2)))


class ScaledLinear(nn.Linear):
    def __init__(self, a, b, scale):
        super().__init__(a, b)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


def test_subclass_keeps_its_forward_and_pickles(tmp_path):
    dnn = ScaledLinear(4, 3, scale=2.5)
    bnn = BayesLinear.from_dnn(dnn)
    assert isinstance(bnn, ScaledLinear) and isinstance(bnn, BayesLinear) and bnn.scale == 2.5
    x = torch.randn(2, 4)
    with set_mode(bnn, "mean"):
        torch.testing.assert_close(bnn(x), dnn(x))
    restored = pickle.loads(pickle.dumps(bnn))
    assert type(restored) is type(bnn)
    torch.save(bnn, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with set_mode(loaded, "mean"):
        torch.testing.assert_close(loaded(x), dnn(x))
    assert type(bnn.to_dnn()) is ScaledLinear


def test_aliases():
    assert dnn2bnn.DenseReparam is BayesLinear
    assert dnn2bnn.ConvReparam is BayesConv2d


@pytest.mark.parametrize("estimator", ["reparam", "flipout", "lrt"])
def test_transposed_conv_output_size_argument(estimator):
    dnn = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
    bnn = BayesConvTranspose2d.from_dnn(dnn, estimator=estimator)
    x = torch.randn(1, 2, 4, 4)
    with set_mode(bnn, "mean"):
        out = bnn(x, output_size=[8, 8])
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out, dnn(x, output_size=[8, 8]), rtol=0, atol=1e-6)
    sampled = bnn(x, output_size=[8, 8])
    assert sampled.shape == (1, 3, 8, 8) and not torch.equal(sampled, out)
    assert bnn(x).shape == (1, 3, 7, 7)
    assert type(bnn.to_dnn()) is nn.ConvTranspose2d and not hasattr(bnn.to_dnn(), "_call_output_padding")


@pytest.mark.parametrize("parametrization", ["softplus", "exp"])
def test_parametrization_sigma_samples_and_kl(parametrization):
    """Both parametrizations give the configured sigma, matching samples and the closed-form KL
    (against torch.distributions), through the layer, its fused paths and kl_divergence."""
    torch.manual_seed(0)
    layer = BayesLinear(300, 250, posterior_sigma_init=0.2, prior_sigma=0.5, parametrization=parametrization)
    assert layer.parametrization.value == parametrization and "parametrization" in dnn2bnn.config.OPTION_NAMES
    torch.testing.assert_close(layer.posterior_sigma(), torch.full((250, 300), 0.2))
    with torch.no_grad():
        layer.weight_rho.add_(0.3 * torch.randn_like(layer.weight_rho))
    transform = torch.exp if parametrization == "exp" else F.softplus
    sigma = transform(layer.weight_rho.detach())
    torch.testing.assert_close(layer.posterior_sigma(), sigma)
    with torch.no_grad():
        draws = torch.stack([layer.weight - layer.weight_mu for _ in range(50)])
    z = draws / sigma
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    expected = sum(
        kl_divergence(Normal(getattr(layer, n + "_mu"), transform(getattr(layer, n + "_rho"))),
                      Normal(torch.tensor(0.0), torch.tensor(0.5))).sum()
        for n in ("weight", "bias")
    )
    layer(torch.randn(2, 300))  # training forward: the large weight's KL comes from its sample node
    fused = dnn2bnn.kl_divergence(layer)
    torch.testing.assert_close(fused, expected)
    got = torch.autograd.grad(fused, (layer.weight_rho, layer.bias_rho))
    want = torch.autograd.grad(expected, (layer.weight_rho, layer.bias_rho))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_parametrization_is_checked_and_defaults_to_exp():
    """Issue 17: exp is the default; rho starts at log(sigma init) (the exp inverse)."""
    layer = BayesLinear(2, 2, posterior_sigma_init=0.3)
    assert layer.parametrization.value == "exp" and dnn2bnn.BayesConfig().parametrization.value == "exp"
    torch.testing.assert_close(layer.weight_rho, torch.full((2, 2), math.log(0.3)))
    moped = BayesLinear.from_dnn(nn.Linear(3, 2), moped_delta=0.1)
    torch.testing.assert_close(moped.posterior_sigma(), (0.1 * moped.weight_mu.abs()).clamp_min(1e-8))
    with pytest.raises(ValueError, match="parametrization must be one of"):
        BayesLinear(2, 2, parametrization="log")


def test_tiny_posterior_sigma_init_trains_with_exact_gradients():
    """Issue 14 item 13: sigma 1e-12 is accepted and its rho gradient is not zero."""
    layer = BayesLinear(3, 2, posterior_sigma_init=1e-12)
    layer(torch.randn(4, 3)).sum().backward()
    assert (layer.weight_rho.grad != 0).all() and torch.isfinite(layer.weight_rho.grad).all()


@pytest.mark.parametrize("how", ["option", "config"])
def test_parametrization_round_trips_through_save_and_load(tmp_path, how):
    from _models import TinyNet

    options = {"parametrization": "exp"} if how == "option" else {"config": dnn2bnn.BayesConfig(parametrization="exp")}
    bnn = dnn2bnn.transform_to_bnn_model(TinyNet(), **options)
    with torch.no_grad():
        bnn.head.weight_rho.add_(0.5)
    dnn2bnn.save_bnn(bnn, tmp_path / "b.pt")
    back = dnn2bnn.load_bnn(tmp_path / "b.pt")
    assert back.head.parametrization.value == "exp"
    torch.testing.assert_close(back.head.posterior_sigma(), bnn.head.posterior_sigma())


def test_a_layer_pickled_before_the_parametrization_option_loads_as_softplus():
    layer = BayesLinear(3, 2, posterior_sigma_init=0.1, parametrization="softplus")
    state = layer.__getstate__()
    for key in ("parametrization", "_exp", "_replay"):
        del state[key]
    # a BayesConfig pickled then has no parametrization field: the class default ("exp") shows
    config = state["bayes_config"] = dnn2bnn.BayesConfig.__new__(dnn2bnn.BayesConfig)
    vars(config).update({k: v for k, v in vars(layer.bayes_config).items() if k != "parametrization"})
    assert config.parametrization.value == "exp"
    old = BayesLinear.__new__(BayesLinear)
    old.__setstate__(state)
    assert old.parametrization.value == "softplus" and old.bayes_config.parametrization.value == "softplus"
    torch.testing.assert_close(old.posterior_sigma(), torch.full((2, 3), 0.1))
    old(torch.ones(1, 3)).sum().backward()


@pytest.mark.parametrize("saved, target", [("exp", "softplus"), ("softplus", "exp")])
def test_a_state_dict_of_another_parametrization_is_refused_after_torch_save(tmp_path, saved, target):
    """Issue 17: rho means softplus(rho) or exp(rho); the keys agree, so a mismatch was silent."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Conv1d(1, 2, 3))
    source = dnn2bnn.transform_to_bnn_model(model, parametrization=saved, posterior_sigma_init=0.1)
    with torch.no_grad():
        source[0].weight_rho.add_(0.25)
    torch.save(source.state_dict(), tmp_path / "sd.pt")
    state = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert state._metadata["0"]["dnn2bnn_parametrization"] == saved
    other = dnn2bnn.transform_to_bnn_model(model, parametrization=target)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf"(?s)0: the state_dict's weight_rho, bias_rho were written under "
                       rf"parametrization='{saved}'.*this layer uses parametrization='{target}'.*\n\s*2: "):
        other.load_state_dict(state)
    with pytest.raises(RuntimeError, match="parametrization"):
        other.load_state_dict(state, strict=False)  # a wrong sigma is never a "partial" load
    # the same parametrization loads exactly, and sigma is the saved one
    same = dnn2bnn.transform_to_bnn_model(model, parametrization=saved, posterior_sigma_init=0.3)
    same.load_state_dict(state)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(same.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(same[0].posterior_sigma(), source[0].posterior_sigma(), rtol=0, atol=0)
    # without the metadata (an old checkpoint, a plain dict): nothing says how rho was meant
    other.load_state_dict(dict(state))
    assert not torch.equal(other[0].weight_rho, before["0.weight_rho"])


@pytest.mark.parametrize("target", ["exp", "softplus"])
def test_a_torch_state_dict_written_before_the_record_loads_as_softplus(tmp_path, target):
    """Issue 17: exp became the default; a state_dict torch.save'd by a dnn2bnn that recorded no
    parametrization (softplus was the only one) keeps its sigmas in an exp model."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Conv1d(1, 2, 3))
    source = dnn2bnn.transform_to_bnn_model(model, parametrization="softplus", posterior_sigma_init=0.1)
    with torch.no_grad():
        source[0].weight_rho.add_(torch.linspace(-40.0, 3.0, 12).view(4, 3))  # tiny to large sigmas
    state = source.state_dict()
    for entry in state._metadata.values():  # as the old dnn2bnn wrote it: torch's version only
        entry.pop("dnn2bnn_parametrization", None)
    torch.save(state, tmp_path / "old.pt")
    old = torch.load(tmp_path / "old.pt", weights_only=True)
    assert old._metadata["0"] == {"version": 1}
    bnn = dnn2bnn.transform_to_bnn_model(model, parametrization=target)
    bnn.load_state_dict(old)
    for index in (0, 2):
        for name in ("weight", "bias"):
            torch.testing.assert_close(
                bnn[index].posterior_sigma(name), source[index].posterior_sigma(name), rtol=1e-6, atol=0
            )
    assert torch.equal(old["0.weight_rho"], source[0].weight_rho)  # the caller's dict is not changed


def test_a_state_dict_without_bayesian_keys_loads_whatever_was_recorded():
    source = BayesLinear(3, 2, parametrization="exp")
    state = source.state_dict()
    assert state._metadata[""]["dnn2bnn_parametrization"] == "exp"
    partial = type(state)((k, v) for k, v in state.items() if not k.endswith("_rho"))
    partial._metadata = state._metadata
    target = BayesLinear(3, 2)
    target.load_state_dict(partial, strict=False)  # no rho loaded: no sigma to misread
    torch.testing.assert_close(target.weight_mu, source.weight_mu, rtol=0, atol=0)


@pytest.mark.parametrize("parametrization", ["softplus", "exp"])
def test_kl_after_a_data_write_to_rho_between_forward_and_kl(parametrization):
    """``rho.data`` writes do not bump the version counter: the KL used the sigma of the
    forward's draw (the old KL; a negative one under exp, which reads log sigma as rho)."""
    torch.manual_seed(0)
    layer = BayesLinear(5, 4, posterior_sigma_init=0.05, parametrization=parametrization)
    layer.train()
    layer(torch.randn(3, 5))
    layer.weight_rho.data.fill_(0.5)
    sigma = F.softplus if parametrization == "softplus" else torch.exp
    expected = sum(
        kl_divergence(
            Normal(getattr(layer, f"{n}_mu"), sigma(getattr(layer, f"{n}_rho"))),
            Normal(getattr(layer, f"{n}_prior_mu"), getattr(layer, f"{n}_prior_sigma")),
        ).sum()
        for n in ("weight", "bias")
    )
    torch.testing.assert_close(layer.kl(), expected)
    torch.testing.assert_close(dnn2bnn.kl_divergence(nn.Sequential(layer)), expected)


@pytest.mark.parametrize(("start", "assigned"), [("exp", "softplus"), ("softplus", "exp")])
def test_assigning_the_parametrization_keeps_sigma_and_what_is_saved(tmp_path, start, assigned):
    # A bare `layer.parametrization = ...` changed the attribute (and what save_bnn/state_dict
    # record) but not the layer's _exp: sampling kept the old meaning of rho and a reload read
    # the exp rho values as softplus ones, silently other sigmas (R3).
    bnn = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Linear(4, 3)), parametrization=start,
                                         posterior_sigma_init=0.3)
    sigma = bnn[0].posterior_sigma().detach().clone()
    bnn[0].parametrization = assigned
    assert bnn[0].parametrization is dnn2bnn.Parametrization(assigned)
    torch.testing.assert_close(bnn[0].posterior_sigma().detach(), sigma)
    loaded = dnn2bnn.load_bnn(dnn2bnn.save_bnn(bnn, tmp_path / "bnn.safetensors"))
    torch.testing.assert_close(loaded[0].posterior_sigma().detach(), sigma)
    with pytest.raises(ValueError, match="BayesLinear.parametrization must be one of"):
        bnn[0].parametrization = "log"


def test_assigning_a_prior_changes_the_kl():
    # `layer.prior = NormalPrior(0, 0.1)` was recorded but the KL kept the old prior's buffers (R3).
    layer = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Linear(4, 3)), posterior_sigma_init=0.3)[0]
    layer.prior = dnn2bnn.NormalPrior(0.5, 0.1)
    expected = sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(getattr(layer, n + "_mu"), layer.posterior_sigma(n)),
            torch.distributions.Normal(0.5, 0.1),
        ).sum()
        for n in ("weight", "bias")
    )
    torch.testing.assert_close(layer.kl(), expected)
    with pytest.raises(TypeError, match="BayesLinear.prior must be a dnn2bnn prior"):
        layer.prior = 0.1


@pytest.mark.parametrize("estimator", ["reparam", "flipout", "lrt"])
def test_a_plain_string_estimator_runs_that_estimator(monkeypatch, estimator):
    # `layer.estimator = "reparam"` (a plain string; options accept strings everywhere else)
    # failed the forward's `is Estimator.REPARAM` test and silently ran local reparameterization (R3).
    from dnn2bnn.layers import _estimators

    layer = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Linear(4, 3)))[0]
    ran = []
    for name, key in (("flipout", "flipout"), ("local_reparam", "lrt")):
        original = getattr(_estimators, name)
        monkeypatch.setattr(_estimators, name, lambda *a, _o=original, _k=key: (ran.append(_k), _o(*a))[1])
    layer.estimator = estimator
    layer(torch.randn(2, 4))
    assert layer.estimator is dnn2bnn.Estimator(estimator)
    assert ran == ([] if estimator == "reparam" else [estimator])
    with pytest.raises(ValueError, match="BayesLinear.estimator must be one of"):
        layer.estimator = "mc"


def test_assigning_a_bayes_config_applies_its_prior_and_parametrization():
    # `layer.bayes_config = BayesConfig(...)` changed the record only (R3).
    layer = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Linear(4, 3)), posterior_sigma_init=0.3)[0]
    layer.bayes_config = dnn2bnn.BayesConfig(prior=dnn2bnn.NormalPrior(0.0, 0.1), parametrization="softplus")
    assert layer.prior == dnn2bnn.NormalPrior(0.0, 0.1) and float(layer.weight_prior_sigma) == pytest.approx(0.1)
    assert layer.parametrization is dnn2bnn.Parametrization.SOFTPLUS and not layer._exp
    torch.testing.assert_close(layer.posterior_sigma().detach(), torch.full((3, 4), 0.3))
    with pytest.raises(TypeError, match="BayesLinear.bayes_config must be a dnn2bnn.BayesConfig"):
        layer.bayes_config = {"prior": None}
