"""The linearized (GLM) predictive: ``f(x; mu) + J(x) delta`` with ``delta ~ N(0, sigma^2)``.

Sampled networks push every weight draw through the nonlinear network; the linearized
predictive keeps the network at its posterior means and moves only along its first-order
expansion in the weights, one ``torch.func.jvp`` per sample. For a model that is linear in
its Bayesian weights both are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from dnn2bnn.layers._base import BayesianLayer

__all__ = ["linearized_samples"]


def linearized_samples(
    model: nn.Module,
    inputs: Tensor | Iterable[Any],
    num_samples: int = 32,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``num_samples`` outputs of the linearized predictive, stacked on dim 0.

    The model runs in eval mode at its posterior means (modes restored afterwards); the
    weight perturbations ``delta`` are drawn from each Bayesian parameter's posterior sigma.

    Args:
        model: a model with Bayesian layers (e.g. after :func:`dnn2bnn.fit_posterior`).
        inputs: a tensor whose dim 0 is the batch, or an iterable of batches (a tuple or list
            batch contributes its first element).
        num_samples: the number of samples ``S``.
        generator: random generator for ``delta``.

    Returns:
        The outputs ``[S, N, ...]`` (logits for a classifier: apply ``softmax(-1)``).

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Linear(3, 2))
        >>> linearized_samples(bnn, torch.ones(4, 3), 5).shape
        torch.Size([5, 4, 2])
    """
    means, sigmas = posterior_moments(model)
    if not means:
        raise ValueError(
            f"linearized_samples: expected a model with Bayesian layers, found none in {type(model).__name__}"
        )
    batches = [inputs] if isinstance(inputs, Tensor) else [b[0] if isinstance(b, (tuple, list)) else b for b in inputs]
    outputs = []
    for x in batches:
        outputs.append(
            linearized_draws(
                model,
                lambda p, x=x: functional_call(model, p, (x,), strict=False),
                num_samples,
                means=means,
                sigmas=sigmas,
                generator=generator,
            )
        )
    return torch.cat(outputs, 1)


def posterior_moments(
    model: nn.Module, *, only: Callable[[nn.Module], bool] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Posterior means and sigmas of the Bayesian parameters, by qualified name of the mean.

    ``only(layer)`` keeps the layers it accepts (default: every Bayesian layer).
    """
    means, sigmas = {}, {}
    for layer_name, layer in model.named_modules():
        if isinstance(layer, BayesianLayer) and (only is None or only(layer)):
            for name in layer.bayes_params:
                mu = layer._parameters.get(name + "_mu")
                if mu is not None:
                    key = f"{layer_name}.{name}_mu" if layer_name else f"{name}_mu"
                    means[key] = mu.detach()
                    sigmas[key] = layer.posterior_sigma(name).detach()  # type: ignore[union-attr]
    return means, sigmas


def linearized_draws(
    model: nn.Module,
    forward: Callable[[dict[str, Tensor]], Any],
    num_samples: int,
    *,
    means: dict[str, Tensor],
    sigmas: dict[str, Tensor],
    generator: torch.Generator | None = None,
) -> Any:
    """``forward(means) + J delta`` for ``num_samples`` draws of ``delta``, stacked on dim 0.

    ``forward(params)`` runs the model with the given parameters (``functional_call``); it
    runs in eval and "mean" mode (restored afterwards), without gradients. The fused eval
    kernel of ``nn.MultiheadAttention`` has no forward-mode derivative: when it makes the
    first try fail, the draws are redone with its fast path switched off
    (``torch.backends.mha``, restored afterwards), which computes the same on the composite path.
    """
    from dnn2bnn.posterior._targets import at_means as _at_means

    state = generator.get_state() if generator is not None else None
    with _at_means(model), torch.no_grad():
        try:
            return _draws(forward, num_samples, means, sigmas, generator)
        except NotImplementedError as exc:
            if "forward AD" not in str(exc) or not torch.backends.mha.get_fastpath_enabled():
                raise
        if generator is not None and state is not None:
            generator.set_state(state)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return _draws(forward, num_samples, means, sigmas, generator)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)


def _draws(
    forward: Callable[[dict[str, Tensor]], Any],
    num_samples: int,
    means: dict[str, Tensor],
    sigmas: dict[str, Tensor],
    generator: torch.Generator | None,
) -> Tensor:
    per_sample = []
    for _ in range(num_samples):
        delta = {
            k: (sigmas[k] * torch.randn(mu.shape, generator=generator, device=mu.device)).to(mu.dtype)
            for k, mu in means.items()
        }
        out, tangent = jvp(forward, (means,), (delta,))
        per_sample.append((out + tangent).detach())
    return torch.stack(per_sample)
