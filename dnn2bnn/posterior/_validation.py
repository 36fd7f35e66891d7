"""Negative log-likelihood of the sampled-network predictive on held-out data, for a candidate posterior.

Candidates differ only in the scale of each weight's standard deviation, so every candidate
uses the same standard normal draws (common random numbers, regenerated from one seed): the
comparison between candidates is not blurred by Monte Carlo noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dnn2bnn.posterior.curvature import Likelihood, check_class_targets

__all__ = ["predictive_nll", "predictive_nlls"]


def predictive_nll(
    model: nn.Module,
    means: dict[str, Tensor],
    sigmas: dict[str, Tensor] | None,
    batches: list[tuple[Tensor, Tensor]],
    *,
    likelihood: Likelihood,
    num_samples: int,
    noise_sigma: float,
    seed: int,
) -> float:
    """Mean NLL per example of the Monte Carlo predictive (``sigmas=None``: the means only).

    The model must be in eval mode with its Bayesian layers in "mean" mode.
    """
    per = predictive_nlls(
        model, means, sigmas, batches, likelihood=likelihood, num_samples=num_samples,
        noise_sigma=noise_sigma, seed=seed,
    )
    return float(per.mean()) if per.numel() else 0.0


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
                logs[i].append(_log_likelihood(out, y, likelihood, noise_sigma))
    per_batch = [
        -(torch.logsumexp(torch.stack(per_draw).double(), 0) - math.log(draws))  # [S, B] -> [B]
        for per_draw in logs
    ]
    return torch.cat(per_batch) if per_batch else torch.zeros(0, dtype=torch.float64)


def _log_likelihood(out: Tensor, target: Tensor, likelihood: Likelihood, noise_sigma: float) -> Tensor:
    """Per-example log-likelihood ``[B]`` of one network's outputs."""
    target = target.to(out.device)
    if likelihood is Likelihood.CLASSIFICATION:
        check_class_targets(out, target, what="validation")
        per = -F.cross_entropy(out, target, reduction="none")
        return per.reshape(out.shape[0], -1).sum(1)
    z = (target.to(out.dtype).reshape(out.shape) - out) / noise_sigma
    per = -0.5 * z.square() - math.log(noise_sigma) - 0.5 * math.log(2 * math.pi)
    return per.reshape(out.shape[0], -1).sum(1)
