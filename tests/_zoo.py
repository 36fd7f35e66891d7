"""The check every zoo model goes through (torchvision, timm, Hugging Face)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch
from torch import nn

import dnn2bnn
from dnn2bnn import BayesianLayer, BayesianParameters, ConversionWarning, set_mode
from dnn2bnn.conversion._mapping import lookup

#: The layer types whose parameters must all end up Bayesian (plain torch types, so the
#: check does not depend on the mapping under test).
MUST_CONVERT = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.MultiheadAttention,
)


def targeted(model: nn.Module) -> tuple[int, int]:
    """(number, total size) of the parameters the default conversion must make Bayesian."""
    mapping = dnn2bnn.default_mapping()
    tensors: dict[int, torch.Tensor] = {}
    for module in model.modules():
        bnn_cls = lookup(mapping, type(module))
        if bnn_cls is None:
            continue
        if issubclass(bnn_cls, BayesianParameters):
            names = bnn_cls.select_params(module)
        else:
            names = ("weight", "bias")
        for name in names:
            value = module._parameters.get(name)
            if value is not None:
                tensors[id(value)] = value
    return len(tensors), sum(t.numel() for t in tensors.values())


def tensors_of(output: object) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, dict, HF ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        return [t for v in output.values() for t in tensors_of(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in tensors_of(v)]
    return []


def bayesian_mus(model: nn.Module) -> list[torch.Tensor]:
    return [
        mu
        for m in model.modules()
        if isinstance(m, BayesianLayer)
        for n in m.bayes_params
        if (mu := m._parameters[n + "_mu"]) is not None
    ]


def convert_checked(dnn: nn.Module, *, traced: bool = True, warns: tuple[str, ...] = ()) -> nn.Module:
    """Convert ``dnn`` in place; check counts, that nothing is left deterministic, the method.

    ``warns``: the expected ConversionWarnings, one regex each; each must be issued once.
    """
    count, numel = targeted(dnn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnn = dnn2bnn.transform_to_bnn_model(dnn, inplace=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]
    assert len(messages) == len(warns), messages
    for pattern in warns:
        assert sum(bool(re.search(pattern, m)) for m in messages) == 1, (pattern, messages)
    report = bnn.conversion_report
    assert report.method == ("torch.fx" if traced else "module tree"), report.fallback_reason
    # functional weights (a module's own parameter passed to F.linear, matmul, ...) come on top,
    # each converted with the reason in the report
    for converted in report.converted:
        if converted.reason:
            module = bnn.get_submodule(converted.name)
            for name in converted.params:
                count, numel = count + 1, numel + module._parameters[name + "_mu"].numel()
    mus = bayesian_mus(bnn)
    assert (len(mus), sum(m.numel() for m in mus)) == (count, numel) and count > 0
    left = [n for n, m in bnn.named_modules() if isinstance(m, MUST_CONVERT) and not isinstance(m, BayesianLayer)]
    assert not left, f"left deterministic: {left[:5]}"
    return bnn


def check_conversion(
    dnn: nn.Module,
    inputs: tuple,
    *,
    traced: bool = True,
    warns: tuple[str, ...] = (),
    loss: Callable[[nn.Module], torch.Tensor] | None = None,
    rtol: float = 1e-5,
) -> nn.Module:
    """Convert ``dnn`` in place and check the zoo contract; returns the Bayesian model.

    Checks: every targeted parameter is Bayesian (counted), no Linear/Conv/attention layer
    is left deterministic, mean mode reproduces the DNN (tolerance relative to the output
    scale), sample mode is stochastic with unchanged shapes, the KL is finite, and one
    backward pass (sample mode) reaches every Bayesian layer the forward uses.
    """
    dnn.eval()
    with torch.no_grad():
        reference = tensors_of(dnn(*inputs))
    bnn = convert_checked(dnn, traced=traced, warns=warns)
    report = bnn.conversion_report

    with torch.no_grad(), set_mode(bnn, "mean"):
        means = tensors_of(bnn(*inputs))
    assert [t.shape for t in means] == [t.shape for t in reference]
    for got, want in zip(means, reference):
        scale = want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1.0))

    samples = loss(bnn) if loss is not None else None
    if samples is None:
        outputs = tensors_of(bnn(*inputs))
        assert [t.shape for t in outputs] == [t.shape for t in reference]
        assert all(torch.isfinite(t).all() for t in outputs)
        assert any(not torch.equal(s, m) for s, m in zip(outputs, means)), "sample mode is deterministic"
        samples = sum(t.float().mean() for t in outputs if t.numel())
    with torch.no_grad():
        kl = dnn2bnn.kl_divergence(bnn)
    assert torch.isfinite(kl) and kl > 0
    samples.backward()
    reached = {c.name for c in report.converted if c.traced_use is not False}
    for name, module in bnn.named_modules():
        if isinstance(module, BayesianLayer) and name in reached:
            rhos = [module._parameters[n + "_rho"] for n in module.bayes_params]
            assert any(r is not None and r.grad is not None for r in rhos), f"no gradient reached {name}"
    return bnn
