"""``predict(method="linearized")``: the linearized (GLM) predictive ``f(x; mu) + J(x) delta``.

A sampler with the interface ``predict`` expects of :class:`~dnn2bnn.prediction._predict._Sampler`:
called on one batch, it returns ``[S, B, ...]`` predictions. The network runs at its posterior
means and each sample moves it along its first-order expansion in the weights of the layers
that sample (``torch.func.jvp``, one per sample; layers in "mean" mode stay fixed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dnn2bnn.posterior._targets import at_means
from dnn2bnn.posterior.linearized import linearized_draws, posterior_moments
from dnn2bnn.prediction._io import ModelInputs, OutputSelector
from dnn2bnn.prediction._vectorized import is_stochastic

__all__ = ["LinearizedSampler"]


class LinearizedSampler(OutputSelector):
    """``num_samples`` linearized predictions per batch (see the module docstring)."""

    method_used = "linearized"

    def __init__(self, model: nn.Module, num_samples: int, output_fn: Callable[[Any], Any] | None) -> None:
        super().__init__(model, output_fn)
        self.num_samples = num_samples
        self.means, self.sigmas = posterior_moments(model, only=is_stochastic)

    def select(self, output: Any) -> Any:
        """The prediction of one output, which must be one floating-point tensor."""
        prediction = super().select(output)
        if not isinstance(prediction, Tensor) or not prediction.is_floating_point():
            raise TypeError(
                f"predict(method='linearized'): {self.where} must give one floating-point tensor "
                f"(logits or a regression mean) to linearize, got {_describe(prediction)}; "
                "pass output_fn= to pick the logits from a dict or tuple output, or use "
                "method='auto' for (mean, log_variance) or distribution outputs"
            )
        return prediction

    def __call__(self, inputs: ModelInputs) -> Tensor:
        def forward(params: dict[str, Tensor]) -> Tensor:
            return self.select(functional_call(self.model, params, inputs.args, inputs.kwargs, strict=False))

        if not self.means:  # nothing samples (predict warned): S copies of the network's output
            with at_means(self.model):
                out = forward({})
            return out.unsqueeze(0).expand(self.num_samples, *out.shape).clone()
        try:
            return linearized_draws(
                self.model, forward, self.num_samples, means=self.means, sigmas=self.sigmas
            )
        except TypeError:
            raise
        except RuntimeError as exc:
            # An input the model itself rejects (wrong shape) is its own error, not jvp's:
            # method='auto' would fail the same way.
            with torch.no_grad(), at_means(self.model):
                forward({})
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ValueError(
                f"predict(method='linearized'): torch.func.jvp could not run {self.where} "
                f"({type(exc).__name__}: {first}); use method='auto' (sampled networks)"
            ) from exc


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor"
    return type(value).__name__
