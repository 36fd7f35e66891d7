"""How a Bayesian layer applies its S draws in ``predict``: the cost-based choice between local
reparameterization and per-draw weights, and inputs shared by every draw (issue 17)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dnn2bnn
from dnn2bnn.prediction import _predict, _vectorized
from dnn2bnn.prediction._io import ModelInputs
from dnn2bnn.prediction._split import cached_plan
from dnn2bnn.prediction._vectorized import WeightDraws, linear_plan


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_the_cost_model_prefers_local_reparameterization_for_small_batches():
    shape = {"samples": 16, "in_features": 1200, "out_features": 1200}
    assert linear_plan(rows=16 * 8, input_rows=16 * 8, **shape) == "local"
    assert linear_plan(rows=16 * 100_000, input_rows=16 * 100_000, **shape) == "weights"
    # An input shared by every draw makes the two matrix products S times cheaper.
    big = 16 * 400
    assert linear_plan(rows=big, input_rows=big, **shape) == "weights"
    assert linear_plan(rows=big, input_rows=400, **shape) == "local"


@pytest.mark.parametrize("plan", ["local", "weights", "cost model"])
@pytest.mark.parametrize("fold", ["at once", "in chunks"])
def test_predict_matches_the_loop_in_distribution_for_each_plan(plan, fold, monkeypatch):
    """Per-input output distribution of the vectorized path == the reference loop's, whichever
    way each Linear applies its draws (first layer fed by the input, the others by samples)."""
    torch.manual_seed(0)
    if plan != "cost model":
        monkeypatch.setattr(_vectorized, "linear_plan", lambda **kw: plan)
    if fold == "in chunks":  # CPU chunks of one draw: later chunks reuse the shared moments
        monkeypatch.setattr(_predict, "CPU_FOLD_BYTES", 1)
    bnn = dnn2bnn.transform_to_bnn_model(mlp((10, 16, 16, 3)), posterior_sigma_init=0.2)
    x = torch.randn(5, 10)
    s = 300
    fast = dnn2bnn.predict(bnn, x, s, task="regression", return_samples=True)
    slow = dnn2bnn.predict(bnn, x, s, task="regression", return_samples=True, method="loop")
    assert fast.method == "vectorized"
    a, b = fast.samples, slow.samples
    var_a, var_b = a.var(0), b.var(0)
    z = (a.mean(0) - b.mean(0)) / ((var_a + var_b) / s).sqrt()
    assert z.abs().max() < 5.0, z.abs().max()
    log_ratio = (var_a / var_b).log()
    assert log_ratio.abs().max() < 6 * 2 * math.sqrt(2 * 2 / (s - 1)), log_ratio.abs().max()
    # the draws of one input differ
    assert a[:, 0].std(0).min() > 0


@pytest.mark.parametrize("parametrization", ["exp", "softplus"])
def test_local_reparameterization_has_the_exact_moments_of_a_weight_draw(parametrization):
    """Closed form: out ~ N(x mu^T + b_mu, x^2 sigma^2^T + sigma_b^2) for each input row."""
    torch.manual_seed(0)
    layer = dnn2bnn.transform_to_bnn_model(
        nn.Sequential(nn.Linear(6, 4)), posterior_sigma_init=0.3, parametrization=parametrization
    )[0]
    with torch.no_grad():
        layer.weight_rho.add_(torch.linspace(-0.5, 1.5, 24).view(4, 6))  # sigmas where the two differ
    sigma_of = torch.exp if parametrization == "exp" else nn.functional.softplus
    x = torch.randn(3, 6)
    s = 4000
    draws = WeightDraws(s)
    draws.local = frozenset({id(layer)})
    with torch.no_grad():
        out = draws.apply(layer, x, repeated=True).reshape(3, s, 4)
        sigma = sigma_of(layer.weight_rho)
        sigma_b = sigma_of(layer.bias_rho)
        mean = x @ layer.weight_mu.T + layer.bias_mu
        std = (x.square() @ sigma.square().T + sigma_b.square()).sqrt()
    z = (out.mean(1) - mean) / (std / math.sqrt(s))
    assert z.abs().max() < 5.0
    ratio = out.std(1) / std
    assert (ratio - 1).abs().max() < 5 * math.sqrt(1 / (2 * s))


def test_a_layer_fed_by_the_deterministic_part_multiplies_b_rows_not_b_times_s(monkeypatch):
    """The first Linear of an MLP reads the same input for every draw: its two products of
    local reparameterization run on the B input rows (on B * S repeated rows before)."""
    bnn = dnn2bnn.transform_to_bnn_model(mlp((10, 16, 3)), posterior_sigma_init=0.1)
    rows: list[int] = []
    linear = nn.functional.linear

    def spy(x, *args, **kwargs):
        rows.append(x.shape[0])
        return linear(x, *args, **kwargs)

    monkeypatch.setattr(_vectorized, "linear_plan", lambda **kw: "local")
    x = torch.randn(6, 10)
    inputs = ModelInputs.of(x)
    plan = cached_plan(bnn, inputs)  # traced (and probed) before the spy
    monkeypatch.setattr(nn.functional, "linear", spy)
    with torch.no_grad():  # all 8 draws folded at once
        out = plan.run(inputs, WeightDraws(8))
    assert rows == [6, 6, 48, 48]  # first layer: mean and variance on the 6 input rows only
    assert out.shape == (8, 6, 3) and not torch.allclose(out[0], out[1])
    rows.clear()
    # predict on CPU: a chunk of one draw, then one of 7 that reuses the first layer's moments
    pred = dnn2bnn.predict(bnn, x, 8, return_samples=True)
    assert pred.method == "vectorized"
    assert rows == [6, 6, 6, 6, 42, 42]


@pytest.mark.parametrize("s", [1, 5])
@pytest.mark.parametrize("conv_path", [True, False], ids=["per-draw", "grouped"])
@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(6, 4), (3, 6)),
        (nn.Linear(6, 4, bias=False), (3, 5, 6)),
        (nn.Conv2d(2, 4, 3, padding=1), (3, 2, 6, 6)),
        (nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", bias=False), (3, 2, 6, 6)),
        (nn.Conv1d(4, 6, 3, stride=2, groups=2), (3, 4, 9)),
    ],
    ids=["linear", "linear-3d", "conv2d", "conv2d-reflect", "conv1d-groups"],
)
def test_a_shared_input_gives_what_its_repeated_copy_gives(layer, shape, conv_path, s, monkeypatch):
    """Per-draw weights: ``apply(x, repeated=True)`` (for a convolution: one convolution with
    the draws stacked as output channels) == ``apply(x repeated S times)`` with the same draws."""
    monkeypatch.setattr(_vectorized, "CPU_PER_DRAW_CONV", conv_path)
    bnn = dnn2bnn.transform_to_bnn_layer(nn.Sequential(layer), type(layer), posterior_sigma_init=0.3)[0]
    draws = WeightDraws(s)
    x = torch.randn(*shape)
    with torch.no_grad():
        shared = draws.apply(bnn, x, repeated=True)
        folded = x.unsqueeze(1).expand(shape[0], s, *shape[1:]).reshape(-1, *shape[1:])
        torch.testing.assert_close(shared, draws.apply(bnn, folded), rtol=1e-5, atol=1e-5)
        # and draw i on rows b * S + i is the plain layer with weight draw i
        plain = bnn.to_dnn()
        sampled = draws.draws(bnn)
        for i in range(s):
            plain.weight.copy_(sampled["weight"][i])
            if plain.bias is not None:
                plain.bias.copy_(sampled["bias"][i])
            torch.testing.assert_close(shared[i::s], plain(x), rtol=1e-5, atol=1e-5)
    assert shared.shape[0] == shape[0] * s


@pytest.mark.parametrize("plan", ["local", "weights"])
@pytest.mark.parametrize("parametrization", ["softplus", "exp"])
def test_draws_follow_the_layers_parametrization(plan, parametrization, monkeypatch):
    """sigma = exp(rho) or softplus(rho), as the layer says: a Linear(1, 1) on x = 1 outputs its
    weight, so the sample std is sigma (softplus(0) = 0.69 would pass for exp(0) = 1 otherwise)."""
    torch.manual_seed(0)
    monkeypatch.setattr(_vectorized, "linear_plan", lambda **kw: plan)
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    bnn = dnn2bnn.transform_to_bnn_model(
        net, posterior_sigma_init=1.0, parametrization=parametrization, include=["0"]
    )
    with torch.no_grad():
        bnn[0].weight_mu.zero_()
        bnn[1].weight.fill_(1.0)
    s = 4000
    pred = dnn2bnn.predict(bnn, torch.ones(1, 1), s, task="regression", return_samples=True)
    assert pred.method == "vectorized"
    assert abs(pred.samples.std().item() - bnn[0].posterior_sigma().item()) < 0.05
    assert abs(bnn[0].posterior_sigma().item() - 1.0) < 1e-6


@pytest.mark.parametrize("fold", ["at once", "in chunks"])
def test_large_weight_draws_written_into_reused_buffers_have_the_closed_form_moments(fold, monkeypatch):
    """A convolution of at least ``SLICED_DRAW_NUMEL`` weights draws one draw at a time into
    buffers that every chunk of draws reuses (no fresh allocation per chunk): each output is
    N(conv(x, mu) + b_mu, sum x^2 sigma^2 + sigma_b^2), and no two draws repeat a chunk's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 256, 8)
    assert conv.weight.numel() >= _vectorized.SLICED_DRAW_NUMEL
    bnn = dnn2bnn.transform_to_bnn_model(nn.Sequential(conv, nn.Flatten()), posterior_sigma_init=0.05)
    if fold == "in chunks":  # chunks of one draw: every chunk reuses the same buffers
        monkeypatch.setattr(_predict, "CPU_FOLD_BYTES", 1)
    x = torch.randn(2, 4, 8, 8)
    s = 400
    pred = dnn2bnn.predict(bnn, x, s, task="regression", return_samples=True)
    assert pred.method == "vectorized"
    out = pred.samples  # [S, 2, 256]
    layer = bnn[0]
    with torch.no_grad():
        mean = nn.functional.conv2d(x, layer.weight_mu, layer.bias_mu).flatten(1)
        var = nn.functional.conv2d(x.square(), layer.posterior_sigma("weight").square(),
                                   layer.posterior_sigma("bias").square()).flatten(1)
    z = (out.mean(0) - mean) / (var / s).sqrt()
    assert z.abs().max() < 5.0, z.abs().max()
    ratio = out.std(0) / var.sqrt()
    assert (ratio - 1).abs().max() < 6 * math.sqrt(1 / (2 * s)), (ratio - 1).abs().max()
    # consecutive draws are not copies of each other (a buffer read after it was overwritten)
    assert (out[1:] - out[:-1]).abs().amax(dim=(1, 2)).min() > 0


@pytest.mark.parametrize(
    "conv, size",
    [
        (nn.Conv2d(3, 5, 4), 4),  # valid: 4x4 -> 1x1
        (nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3), 2),  # 2x2 -> 1x1, grouped
        (nn.Conv2d(3, 5, 3, padding=1, padding_mode="replicate"), 1),  # 1x1 -> 1x1
        (nn.Conv1d(3, 5, 3, padding="same"), 1),
    ],
)
def test_a_convolution_with_one_output_position_samples_the_exact_moments(conv, size, monkeypatch):
    """Closed form: each output channel ~ N(conv(x, mu) + b_mu, conv(x^2, sigma^2) + sigma_b^2),
    exact when every output channel reads each of its own weights once (one position)."""
    torch.manual_seed(0)
    monkeypatch.setattr(_vectorized, "linear_plan", lambda **kw: "local")
    layer = dnn2bnn.transform_to_bnn_model(nn.Sequential(conv), posterior_sigma_init=0.2)[0]
    with torch.no_grad():
        layer.weight_rho.add_(torch.linspace(-0.5, 1.0, layer.weight_rho.numel()).view_as(layer.weight_rho))
    x = torch.randn(3, 3, *([size] * (conv.weight.dim() - 2)))
    assert _vectorized._one_position(layer, x)
    s = 4000
    draws = WeightDraws(s)
    draws.local = frozenset({id(layer)})
    called = []
    monkeypatch.setattr(WeightDraws, "draws", lambda self, layer: called.append(layer))  # no weight draws
    with torch.no_grad():
        out = draws.apply(layer, x, repeated=True)
        out = out.reshape(3, s, *out.shape[1:])
        plain = layer.to_dnn()
        mean = plain(x)
        plain.weight.copy_(layer.posterior_sigma("weight").square())
        plain.bias.copy_(layer.posterior_sigma("bias").square())
        std = plain(x.square()).sqrt()
    assert called == [] and mean.shape == out.shape[:1] + out.shape[2:]
    z = (out.mean(1) - mean) / (std / math.sqrt(s))
    assert z.abs().max() < 5.0, z.abs().max()
    ratio = out.std(1) / std
    assert (ratio - 1).abs().max() < 5 * math.sqrt(1 / (2 * s)), (ratio - 1).abs().max()


def test_a_convolution_with_several_output_positions_draws_weights(monkeypatch):
    """Outputs at two positions share weights: sampling them independently would change their
    joint distribution, so such a convolution draws whole weights whatever the cost model says."""
    monkeypatch.setattr(_vectorized, "linear_plan", lambda **kw: "local")
    layer = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Conv2d(2, 3, 3)), posterior_sigma_init=0.2)[0]
    x = torch.randn(2, 2, 4, 4)  # 2x2 output positions
    assert not _vectorized._one_position(layer, x)
    draws = WeightDraws(5)
    draws.local = frozenset({id(layer)})
    monkeypatch.setattr(WeightDraws, "_local", lambda *a, **k: pytest.fail("local reparameterization"))
    with torch.no_grad():
        out = draws.apply(layer, x, repeated=True)
    assert out.shape == (10, 3, 2, 2)


@pytest.mark.parametrize(
    "net, shape",
    [(lambda: nn.Linear(64, 8), (3, 64)), (lambda: nn.Conv2d(4, 8, 4), (3, 4, 4, 4))],
    ids=["linear", "conv-one-position"],
)
def test_local_reparameterization_of_a_float16_layer_keeps_a_small_sigma(net, shape, monkeypatch):
    """sigma^2 was cast to the input's dtype: 1e-4 squared is 0 in float16, so every sample
    of a float16 model came out equal to the mean (no uncertainty at all), silently. The
    variance is now computed in float32, as the layer's own sampling does."""
    torch.manual_seed(0)
    monkeypatch.setattr(_vectorized, "linear_plan", lambda **kw: "local")
    bnn = dnn2bnn.transform_to_bnn_model(nn.Sequential(net(), nn.Flatten()), posterior_sigma_init=1e-4)
    with torch.no_grad():  # outputs near 0, where float16 resolves a spread of 1e-3
        bnn[0].weight_mu.zero_()
        bnn[0].bias_mu.zero_()
    bnn = bnn.to(torch.float16)
    x = torch.randn(shape).to(torch.float16)
    s = 2000
    pred = dnn2bnn.predict(bnn, x, s, task="regression", method="vectorized", return_samples=True)
    layer = bnn[0]
    with torch.no_grad():
        plain = layer.to_dnn().float()
        plain.weight.copy_(layer.posterior_sigma("weight").float().square())
        plain.bias.copy_(layer.posterior_sigma("bias").float().square())
        exact = plain(x.float().square()).flatten(1).sqrt()
    ratio = pred.samples.float().std(0) / exact
    assert (ratio - 1).abs().max() < 0.1, ratio


def test_local_reparameterization_under_float16_autocast_keeps_a_small_sigma(monkeypatch):
    """Under ``torch.autocast(dtype=float16)`` the variance product ran in float16 and sigma^2
    = 1e-8 became 0: no spread at all, where the loop and the weight draws give the right one."""
    torch.manual_seed(0)
    monkeypatch.setattr(_vectorized, "linear_plan", lambda **kw: "local")
    bnn = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Linear(64, 8)), posterior_sigma_init=1e-4)
    with torch.no_grad():
        bnn[0].weight_mu.zero_()
        bnn[0].bias_mu.zero_()
        x = torch.randn(3, 64)
        exact = (x.square() @ bnn[0].posterior_sigma().square().T + bnn[0].posterior_sigma("bias").square()).sqrt()
    with torch.autocast("cpu", dtype=torch.float16):
        pred = dnn2bnn.predict(bnn, x, 2000, task="regression", method="vectorized", return_samples=True)
    ratio = pred.samples.float().std(0) / exact
    assert (ratio - 1).abs().max() < 0.1, ratio
