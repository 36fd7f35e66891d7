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

__all__ = ["predictive_nll"]


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
    draws = 1 if sigmas is None else num_samples
    total, count = 0.0, 0
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
    for per_draw in logs:
        stacked = torch.stack(per_draw)  # [S, B]
        total += float(-(torch.logsumexp(stacked, 0) - math.log(draws)).sum())
        count += stacked.shape[1]
    return total / max(count, 1)


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
