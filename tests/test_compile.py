"""torch.compile of converted models: whole graphs, still stochastic, equal eager in mean mode.

Inductor (the default backend) compiles LeNet-5 here; ResNet-18 and the sample-sharing
model use ``aot_eager`` (Dynamo capture and AOT autograd without code generation), because
Inductor's C++ code generation for ResNet-18 takes minutes on a small CPU machine. The
benchmark (benchmarks/bench_compile.py) compiles both models with Inductor.
``fullgraph=True`` everywhere: any graph break raises.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import dnn2bnn
from dnn2bnn import set_mode, transform_to_bnn_model
from tests.conftest import LeNet5

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _check_compiled(bnn: nn.Module, x: torch.Tensor, **compile_options) -> nn.Module:
    compiled = torch.compile(bnn, fullgraph=True, **compile_options)
    first, second = compiled(x), compiled(x)
    assert not torch.allclose(first, second), "compiled sampling must draw fresh weights per call"
    with set_mode(bnn, "mean"):
        torch.testing.assert_close(compiled(x), bnn(x), rtol=1e-4, atol=1e-5)
    return compiled


def test_lenet_compiles_with_default_backend_without_graph_breaks():
    bnn = transform_to_bnn_model(LeNet5(), posterior_sigma_init=0.05)
    _check_compiled(bnn, torch.randn(4, 1, 28, 28))


def test_resnet18_compiles_as_one_graph_and_trains():
    resnet = torchvision.models.resnet18(num_classes=10)
    bnn = transform_to_bnn_model(resnet, posterior_sigma_init=0.05)
    bnn.eval()  # BatchNorm in inference mode: the only randomness is dnn2bnn's
    compiled = _check_compiled(bnn, torch.randn(2, 3, 32, 32), backend="aot_eager")
    out = compiled(torch.randn(2, 3, 32, 32))
    loss = out.logsumexp(1).mean() + dnn2bnn.kl_divergence(bnn) / 1000
    loss.backward()
    layers = [m for m in bnn.modules() if isinstance(m, dnn2bnn.BayesianLayer)]
    assert len(layers) == 21
    assert all(m.weight_rho.grad is not None and m.weight_rho.grad.abs().sum() > 0 for m in layers)


class _SharedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))


def test_sample_sharing_hooks_compile_into_the_graph():
    bnn = transform_to_bnn_model(_SharedLayer(), posterior_sigma_init=0.1)
    assert bnn.conversion_report.shared == ["fc"]
    compiled = _check_compiled(bnn, torch.randn(3, 4), backend="aot_eager")
    x = torch.randn(3, 4)
    torch.manual_seed(5)
    eager = bnn(x)
    torch.manual_seed(5)
    # Same seed, same draws: the compiled graph reuses one sample of fc for both calls.
    torch.testing.assert_close(compiled(x), eager)
    assert bnn.fc._sample_cache is None  # the scope was closed after the call
