"""Mixed precision, dtype, device and memory-format changes behave like the torch.nn layer's.

Sigma and the KL are computed in float32 (or wider) whatever the parameter dtype, so they do
not underflow in float16 and are not computed in bfloat16 under autocast.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dnn2bnn import BayesConv2d, BayesLinear, kl_divergence, set_mode, transform_to_bnn_model
from tests.conftest import LeNet5

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYERS = {
    "linear": (lambda: BayesLinear(8, 4, posterior_sigma_init=0.05), (3, 8)),
    "conv2d": (lambda: BayesConv2d(2, 4, 3, padding=1, posterior_sigma_init=0.05), (3, 2, 6, 6)),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_autocast_bfloat16(kind, device):
    make, shape = LAYERS[kind]
    layer = make().to(device)
    x = torch.randn(shape, device=device)
    with set_mode(layer, "mean"):
        reference = layer(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = layer(x)
        sigma, kl = layer.posterior_sigma(), layer.kl()
        with set_mode(layer, "mean"):
            mean_out = layer(x)
    assert out.dtype == torch.bfloat16  # the layer autocasts like its parent
    assert sigma.dtype == torch.float32 and kl.dtype == torch.float32
    torch.testing.assert_close(mean_out.float(), reference, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kl, layer.kl())  # autocast does not change the KL
    (out.float().square().mean() + kl).backward()
    for name in ("weight_mu", "weight_rho", "bias_rho"):
        grad = getattr(layer, name).grad
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_sigma_does_not_underflow_in_half_precision(dtype):
    # softplus(rho) for sigma = 1e-8 is 0 in float16: the KL's log(sigma) would be -inf.
    layer = BayesLinear(8, 4, posterior_sigma_init=1e-8).to(dtype)
    assert torch.nn.functional.softplus(layer.weight_rho).min() == 0 or dtype == torch.bfloat16
    sigma = layer.posterior_sigma()
    assert sigma.dtype == torch.float32 and (sigma > 0).all()
    kl = layer.kl()
    assert kl.dtype == torch.float32 and torch.isfinite(kl)
    torch.testing.assert_close(kl, layer.float().kl(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_model_dtype_casts(dtype):
    bnn = transform_to_bnn_model(LeNet5(), posterior_sigma_init=0.05)
    cast = copy.deepcopy(bnn).to(dtype)
    x = torch.randn(2, 1, 28, 28)
    out = cast(x.to(dtype))
    layer = cast.features[0]
    assert out.dtype == dtype and layer.weight.dtype == dtype and layer.weight_mu.dtype == dtype
    assert kl_divergence(cast).dtype == torch.promote_types(dtype, torch.float32)
    with set_mode(cast, "mean"), set_mode(bnn, "mean"):
        tolerance = 1e-6 if dtype == torch.float64 else 5e-2
        out_mean = cast(x.to(dtype)).float()
        torch.testing.assert_close(out_mean, bnn(x), rtol=tolerance, atol=tolerance)
    out.float().sum().backward()
    assert layer.weight_rho.grad.dtype == dtype


def test_half_method_is_float16():
    bnn = transform_to_bnn_model(LeNet5()).half()
    assert {p.dtype for p in bnn.parameters()} == {torch.float16}
    assert bnn(torch.randn(2, 1, 28, 28).half()).dtype == torch.float16


def test_channels_last():
    bnn = transform_to_bnn_model(LeNet5(), posterior_sigma_init=0.05)
    cl = copy.deepcopy(bnn).to(memory_format=torch.channels_last)
    conv = cl.features[0]
    assert conv.weight_mu.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # samples keep it
    x = torch.randn(2, 1, 28, 28)
    with set_mode(cl, "mean"), set_mode(bnn, "mean"):
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), bnn(x))


@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=CUDA)])
def test_to_device_moves_posterior_and_prior(device):
    bnn = transform_to_bnn_model(LeNet5()).to(device)
    for tensor in [*bnn.parameters(), *bnn.buffers()]:
        assert tensor.device.type == device
    out = bnn(torch.randn(2, 1, 28, 28, device=device))
    assert out.device.type == device and kl_divergence(bnn).device.type == device
