"""predict(method="linearized"): the GLM predictive through dnn2bnn.predict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnn2bnn
from tests.conftest import mlp
from tests.test_posterior import _Attention


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


_ATTENTION_LAYERS = [nn.Linear, nn.MultiheadAttention, nn.LayerNorm]


@pytest.mark.parametrize(
    "build, shape, layer_types",
    [
        (lambda: mlp((6, 8, 3)), (6,), None),
        (_CNN, (1, 6, 6), None),
        # nn.MultiheadAttention's eval fast path has no forward-mode derivative: retried on the composite path
        (_Attention, (5, 4), _ATTENTION_LAYERS),
    ],
)
def test_collapsed_posterior_is_the_dnn(build, shape, layer_types):
    dnn = build().eval()
    options = {} if layer_types is None else {"layer_types": layer_types}
    bnn = dnn2bnn.transform_to_bnn_model(dnn, posterior_sigma_init=1e-8, **options)
    x = torch.randn(5, *shape)
    result = dnn2bnn.predict(bnn, x, num_samples=3, method="linearized", return_samples=True)
    assert result.method == "linearized"
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on after the attention model's retry
    with torch.no_grad():
        expected = dnn(x).softmax(1)
    torch.testing.assert_close(result.probs, expected, rtol=1e-5, atol=1e-6)
    assert float(result.mutual_information.max()) < 1e-6


def test_linearized_samples_spread_and_leave_modes_alone():
    bnn = dnn2bnn.transform_to_bnn_model(nn.Linear(3, 2), posterior_sigma_init=0.5)
    bnn.train()
    x = torch.randn(4, 3)
    torch.manual_seed(1)
    result = dnn2bnn.predict(bnn, x, num_samples=2000, task="regression", method="linearized")
    # the model is linear in its weights: the linearized predictive is exact, N(f(x; mu), sum sigma^2 x^2 + sigma_b^2)
    with torch.no_grad():
        mean = F.linear(x, bnn.weight_mu, bnn.bias_mu)
        var = x.square() @ bnn.posterior_sigma("weight").square().T + bnn.posterior_sigma("bias").square()
    torch.testing.assert_close(result.mean, mean, atol=0.06, rtol=0)
    torch.testing.assert_close(result.variance, var, rtol=0.15, atol=0)
    assert bnn.training and bnn.bayes_mode == "sample"  # restored


def test_layers_in_mean_mode_stay_fixed():
    bnn = dnn2bnn.transform_to_bnn_model(mlp((4, 6, 3)), posterior_sigma_init=0.3)
    dnn2bnn.set_mode(bnn, "mean")
    x = torch.randn(3, 4)
    with pytest.warns(dnn2bnn.PredictionWarning, match="all 5 samples are identical"):
        result = dnn2bnn.predict(bnn, x, num_samples=5, method="linearized")
    with torch.no_grad():
        expected = bnn(x).softmax(1)
    torch.testing.assert_close(result.probs, expected)


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fc(x)
        return out, out.clone()


def test_outputs_it_cannot_linearize_are_refused():
    bnn = dnn2bnn.transform_to_bnn_model(_TwoOutputs())
    with pytest.raises(TypeError, match=r"method='linearized'.*one floating-point tensor.*got tuple"):
        dnn2bnn.predict(bnn, torch.randn(2, 3), task="regression", method="linearized")


def test_an_input_the_model_rejects_raises_the_model_error():
    """A wrong input shape was reported as 'torch.func.jvp could not run ...; use method='auto'',
    where method='auto' fails the same way."""
    bnn = dnn2bnn.transform_to_bnn_model(mlp((10, 8, 3)))
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        dnn2bnn.predict(bnn, torch.randn(4, 7), num_samples=2, method="linearized")


def test_a_dict_output_is_refused_naming_output_fn():
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.fc(x)}

    bnn = dnn2bnn.transform_to_bnn_model(DictOut())
    with pytest.raises(TypeError, match="pass output_fn= to pick the logits"):
        dnn2bnn.predict(bnn, torch.randn(2, 4), num_samples=2, method="linearized")
    result = dnn2bnn.predict(bnn, torch.randn(2, 4), num_samples=2, method="linearized", output_fn=lambda o: o["logits"])
    assert result.probs.shape == (2, 3)


def test_a_model_jvp_cannot_run_still_names_method_auto():
    class Double(torch.autograd.Function):  # no setup_context: torch.func cannot transform it
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return Double.apply(self.fc(x))

    bnn = dnn2bnn.transform_to_bnn_model(Net())
    with pytest.raises(ValueError, match=r"torch.func.jvp could not run .*Net.*use method='auto'"):
        dnn2bnn.predict(bnn, torch.randn(2, 3), num_samples=2, method="linearized")
