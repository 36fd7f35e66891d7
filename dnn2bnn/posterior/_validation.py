"""Negative log-likelihood of the sampled-network predictive on held-out data, for a candidate posterior.

Candidates differ only in the scale of each weight's standard deviation, so every candidate
uses the same standard normal draws (common random numbers, regenerated from one seed): the
comparison between candidates is not blurred by Monte Carlo noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dnn2bnn.posterior.curvature import Likelihood, log_likelihood, require_finite_output

__all__ = ["predictive_nlls"]


def predictive_nlls(
    model: nn.Module,
    means: dict[str, Tensor],
    sigmas: dict[str, Tensor] | None,
    batches: list[tuple[Tensor, Tensor]],
    *,
    likelihood: Likelihood,
    num_samples: int,
    noise_sigma: float,
    seed: int,
) -> Tensor:
    """The NLL of each example ``[N]`` (float64) under the Monte Carlo predictive.

    Examples come in the order of ``batches``, so that two candidates can be compared
    example by example (paired differences).
    """
    draws = 1 if sigmas is None else num_samples
    generator = torch.Generator(device=next(iter(means.values())).device)
    logs: list[list[Tensor]] = [[] for _ in batches]
    with torch.no_grad():
        for s in range(draws):
            generator.manual_seed(seed + s)
            params = means
            if sigmas is not None:
                params = {
                    k: mu + (sigmas[k] * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=sigmas[k].dtype)).to(mu.dtype)
                    for k, mu in means.items()
                }
            for i, (x, y) in enumerate(batches):
                out = functional_call(model, params, (x,), strict=False).float()
                if sigmas is None:
                    _check_finite(out, x)
                logs[i].append(log_likelihood(out, y, likelihood, noise_sigma, what="validation"))
    per_batch = [
        -(torch.logsumexp(torch.stack(per_draw).double(), 0) - math.log(draws))  # [S, B] -> [B]
        for per_draw in logs
    ]
    return torch.cat(per_batch) if per_batch else torch.zeros(0, dtype=torch.float64)


def _check_finite(out: Tensor, x: Tensor) -> None:
    """Raise when the means' output on held-out examples is not finite (its NLL gain would be NaN)."""
    require_finite_output(
        out, x, "held-out (validation) inputs",
        "(check val_data, or data, for NaN/inf): a NaN NLL would make the temperature rule keep "
        "the parent silently",
    )
