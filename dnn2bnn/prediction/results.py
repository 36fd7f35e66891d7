"""Typed results of :func:`dnn2bnn.predict` and the uncertainty decomposition behind them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClassificationPrediction", "RegressionPrediction"]


def _variance(samples: Tensor) -> Tensor:
    """Unbiased variance over the sample axis 0 (zeros for a single sample)."""
    if samples.shape[0] < 2:
        return torch.zeros_like(samples[0])
    return samples.var(dim=0, correction=1)


@dataclass(frozen=True)
class ClassificationPrediction:
    """Monte Carlo predictive of a classifier; entropies are in nats.

    For ``N`` inputs, ``C`` classes and ``S`` posterior samples ``p_s = softmax(logits_s)``:

    Attributes:
        probs: ``[N, C]`` predictive probabilities ``mean_s p_s``.
        predictive_entropy: ``[N]`` total uncertainty ``H[mean_s p_s]``.
        expected_entropy: ``[N]`` aleatoric uncertainty ``mean_s H[p_s]``.
        mutual_information: ``[N]`` epistemic uncertainty, ``predictive_entropy -
            expected_entropy`` (the mutual information between label and weights; >= 0).
        variance: ``[N, C]`` variance of each class probability over the samples (unbiased).
        samples: ``[S, N, C]`` the per-sample probabilities ``p_s`` if asked for, else ``None``.
        num_samples: ``S``.
        method: how the samples were computed: ``"vectorized"`` or ``"loop"``.
    """

    probs: Tensor
    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    variance: Tensor
    samples: Tensor | None
    num_samples: int
    method: str

    @property
    def mean(self) -> Tensor:
        """Alias of :attr:`probs`."""
        return self.probs

    @property
    def predictions(self) -> Tensor:
        """``[N]`` the most probable class."""
        return self.probs.argmax(-1)

    @property
    def confidence(self) -> Tensor:
        """``[N]`` the predictive probability of the most probable class."""
        return self.probs.max(-1).values

    @property
    def aleatoric(self) -> Tensor:
        """Alias of :attr:`expected_entropy`."""
        return self.expected_entropy

    @property
    def epistemic(self) -> Tensor:
        """Alias of :attr:`mutual_information`."""
        return self.mutual_information

    @classmethod
    def from_logits(
        cls, logits: Tensor, *, keep_samples: bool = False, method: str = "loop"
    ) -> ClassificationPrediction:
        """Summarize ``[S, N, C]`` logits (``[S, N, 1]``: one binary logit, class 1).

        Example:
            >>> logits = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])
            >>> pred = ClassificationPrediction.from_logits(logits)
            >>> pred.probs, round(pred.predictive_entropy.item(), 4), pred.mutual_information
            (tensor([[0.5000, 0.5000]]), 0.6931, tensor([0.]))
        """
        logits = logits.float()
        if logits.shape[-1] == 1:
            log_p = torch.cat([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=-1)
        else:
            log_p = logits.log_softmax(-1)
        p = log_p.exp()
        probs = p.mean(0)
        predictive = torch.special.entr(probs).sum(-1)
        expected = -(p * log_p).nan_to_num(0.0).sum(-1).mean(0)  # 0 * log 0 = 0
        return cls(
            probs=probs,
            predictive_entropy=predictive,
            expected_entropy=expected,
            mutual_information=(predictive - expected).clamp_min(0.0),
            variance=_variance(p),
            samples=p if keep_samples else None,
            num_samples=logits.shape[0],
            method=method,
        )

    @classmethod
    def concat(cls, parts: list[ClassificationPrediction]) -> ClassificationPrediction:
        """Join the predictions of consecutive batches."""
        return cls(**_concat_fields(parts))


@dataclass(frozen=True)
class RegressionPrediction:
    """Monte Carlo predictive of a regression model.

    The model returns either the mean ``m`` (a tensor), or ``(m, log_var)`` with
    ``log_var`` the natural log of the aleatoric (noise) variance, or a
    ``torch.distributions.Normal(m, sd)``. Over ``S`` posterior samples:

    Attributes:
        mean: ``[N, ...]`` predictive mean ``mean_s m_s``.
        epistemic_variance: ``[N, ...]`` variance of ``m_s`` over the samples (unbiased).
        aleatoric_variance: ``[N, ...]`` ``mean_s exp(log_var_s)`` (or ``sd_s**2``), ``None``
            when the model returns only a mean.
        variance: ``[N, ...]`` total predictive variance, epistemic plus aleatoric.
        samples: ``[S, N, ...]`` the per-sample means ``m_s`` if asked for, else ``None``.
        num_samples: ``S``.
        method: ``"vectorized"`` or ``"loop"``.
    """

    mean: Tensor
    epistemic_variance: Tensor
    aleatoric_variance: Tensor | None
    variance: Tensor
    samples: Tensor | None
    num_samples: int
    method: str

    @classmethod
    def from_outputs(
        cls, outputs: Any, *, keep_samples: bool = False, method: str = "loop"
    ) -> RegressionPrediction:
        """Summarize model outputs whose tensors are shaped ``[S, N, ...]``.

        Example:
            >>> means = torch.tensor([[1.0], [3.0]])  # S=2 samples, N=1 input
            >>> pred = RegressionPrediction.from_outputs((means, torch.zeros(2, 1)))
            >>> pred.mean, pred.epistemic_variance, pred.aleatoric_variance, pred.variance
            (tensor([2.]), tensor([2.]), tensor([1.]), tensor([3.]))
        """
        aleatoric = None
        if isinstance(outputs, torch.distributions.Normal):
            means, aleatoric = outputs.loc, outputs.scale.float().pow(2).mean(0)
        elif isinstance(outputs, (tuple, list)) and len(outputs) == 2:
            means, aleatoric = outputs[0], outputs[1].float().exp().mean(0)
        elif isinstance(outputs, Tensor):
            means = outputs
        else:
            raise TypeError(
                "a regression model must return a tensor (the mean), a (mean, log_variance) "
                f"pair or a torch.distributions.Normal; got {type(outputs).__name__}"
            )
        means = means.float()
        epistemic = _variance(means)
        return cls(
            mean=means.mean(0),
            epistemic_variance=epistemic,
            aleatoric_variance=aleatoric,
            variance=epistemic if aleatoric is None else epistemic + aleatoric,
            samples=means if keep_samples else None,
            num_samples=means.shape[0],
            method=method,
        )

    @classmethod
    def concat(cls, parts: list[RegressionPrediction]) -> RegressionPrediction:
        """Join the predictions of consecutive batches."""
        return cls(**_concat_fields(parts))


def _concat_fields(parts: list[Any]) -> dict[str, Any]:
    first = parts[0]
    fields: dict[str, Any] = {}
    for name in first.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        if name == "samples":
            fields[name] = None if values[0] is None else torch.cat(values, dim=1)
        elif name in ("num_samples", "method"):
            fields[name] = values[0] if len(set(values)) == 1 else values[-1]
        elif values[0] is None:
            fields[name] = None
        else:
            fields[name] = torch.cat(values, dim=0)
    return fields
