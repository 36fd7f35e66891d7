"""Typed results of :func:`dnn2bnn.predict` and the uncertainty decomposition behind them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClassificationPrediction", "RegressionPrediction"]


def _widen(t: Tensor) -> Tensor:
    """At least float32 (half, bfloat16 and integers widened), float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _variance(samples: Tensor) -> Tensor:
    """Unbiased variance over the sample axis 0 (zeros for a single sample)."""
    if samples.shape[0] < 2:
        return torch.zeros_like(samples[0])
    return samples.var(dim=0, correction=1)


@dataclass(frozen=True)
class ClassificationPrediction:
    """Monte Carlo predictive of a classifier; entropies are in nats.

    For ``N`` inputs, ``C`` classes and ``S`` posterior samples ``p_s = softmax(logits_s)``
    over the class dim. The shapes below are those of a ``[N, C]`` classifier; for an N-d
    output (segmentation ``[N, C, H, W]``, token logits ``[N, T, C]``) every field keeps the
    model's layout: ``probs`` and ``variance`` have the shape of the logits, the entropies
    and the mutual information that shape without the class dim (``[N, H, W]``), and
    :attr:`class_dim` says where the classes are. Binary logits (``task="binary"``) give
    two classes, ``(1 - p, p)``.

    Attributes:
        probs: ``[N, C]`` predictive probabilities ``mean_s p_s``.
        predictive_entropy: ``[N]`` total uncertainty ``H[mean_s p_s]``.
        expected_entropy: ``[N]`` aleatoric uncertainty ``mean_s H[p_s]``.
        mutual_information: ``[N]`` epistemic uncertainty, ``predictive_entropy -
            expected_entropy`` (the mutual information between label and weights; >= 0).
        variance: ``[N, C]`` variance of each class probability over the samples (unbiased).
        samples: ``[S, N, C]`` the per-sample probabilities ``p_s`` if asked for, else ``None``.
        num_samples: ``S``.
        method: how the samples were computed: ``"vectorized"``, ``"loop"`` or ``"linearized"``.
        class_dim: the class dim of :attr:`probs` and :attr:`variance` (``1`` for ``[N, C]``;
            in :attr:`samples` it is one further right).
    """

    probs: Tensor
    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    variance: Tensor
    samples: Tensor | None
    num_samples: int
    method: str
    class_dim: int = 1

    @property
    def mean(self) -> Tensor:
        """Alias of :attr:`probs`."""
        return self.probs

    @property
    def predictions(self) -> Tensor:
        """``[N]`` (``[N, ...]`` for N-d outputs) the most probable class."""
        return self.probs.argmax(self.class_dim)

    @property
    def confidence(self) -> Tensor:
        """``[N]`` (``[N, ...]``) the predictive probability of the most probable class."""
        return self.probs.max(self.class_dim).values

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
        cls,
        logits: Tensor,
        *,
        keep_samples: bool = False,
        method: str = "loop",
        class_dim: int | None = None,
        binary: bool = False,
    ) -> ClassificationPrediction:
        """Summarize ``[S, N, ...]`` logits.

        Args:
            logits: the per-sample model outputs, the samples on dim 0.
            keep_samples: keep the per-sample probabilities in ``samples``.
            method: recorded in ``method``.
            class_dim: the class dim *of one sample's output* (``[N, C, H, W]``: ``1``;
                ``[N, T, C]``: ``-1``; ``None``: ``-1``); dim 0 is the batch. With ``binary``,
                the dim of size 1 that holds the one logit; ``None``: dim 1 if it has size 1
                (``[N, 1]``, ``[N, 1, H, W]``), else there is none (``[N]``, ``[N, H, W]``) and
                the two classes are inserted at dim 1.
            binary: the logits are those of class 1 (``sigmoid``), as for
                ``BCEWithLogitsLoss``.

        Example:
            >>> logits = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])
            >>> pred = ClassificationPrediction.from_logits(logits)
            >>> pred.probs, round(pred.predictive_entropy.item(), 4), pred.mutual_information
            (tensor([[0.5000, 0.5000]]), 0.6931, tensor([0.]))
            >>> binary = ClassificationPrediction.from_logits(torch.zeros(4, 3), binary=True)
            >>> binary.probs.shape, binary.predictive_entropy.shape
            (torch.Size([3, 2]), torch.Size([3]))
        """
        logits = _widen(logits)
        if logits.dim() < 2:
            raise ValueError(
                f"logits must be [S, N, ...] (samples, batch, ...), got shape {tuple(logits.shape)}"
            )
        if binary:
            dim = _binary_dim(logits, class_dim)
            one = logits if dim is None else logits.squeeze(dim)
            dim = 2 if dim is None else dim
            log_p = torch.stack([F.logsigmoid(-one), F.logsigmoid(one)], dim=dim)
        else:
            dim = _sample_dim(logits, -1 if class_dim is None else class_dim)
            if logits.shape[dim] < 2:
                raise ValueError(
                    f"the class dim {dim - 1} of the logits (shape {tuple(logits.shape[1:])} per "
                    f"sample) has size {logits.shape[dim]}: one logit is a binary classifier, "
                    "use task='binary' (the logit of class 1, as for BCEWithLogitsLoss)"
                )
            log_p = logits.log_softmax(dim)
        p = log_p.exp()
        probs = p.mean(0)
        predictive = torch.special.entr(probs).sum(dim - 1)
        expected = -(p * log_p).nan_to_num(0.0).sum(dim).mean(0)  # 0 * log 0 = 0
        return cls(
            probs=probs,
            predictive_entropy=predictive,
            expected_entropy=expected,
            mutual_information=(predictive - expected).clamp_min(0.0),
            variance=_variance(p),
            samples=p if keep_samples else None,
            num_samples=logits.shape[0],
            method=method,
            class_dim=dim - 1,
        )

    @classmethod
    def concat(cls, parts: list[ClassificationPrediction]) -> ClassificationPrediction:
        """Join the predictions of consecutive batches."""
        return cls(**_concat_fields(parts))


def _sample_dim(logits: Tensor, class_dim: int) -> int:
    """``class_dim`` of one sample's output as a dim of ``[S, N, ...]`` logits (>= 2)."""
    per_sample = logits.dim() - 1
    if isinstance(class_dim, bool) or not isinstance(class_dim, int):
        raise TypeError(f"class_dim must be an int, got {type(class_dim).__name__}")
    if not -per_sample <= class_dim < per_sample:
        raise ValueError(
            f"class_dim={class_dim} is out of range for an output of shape "
            f"{tuple(logits.shape[1:])} (dims 1..{per_sample - 1}, or negative)"
        )
    dim = class_dim % per_sample
    if dim == 0:
        raise ValueError(
            f"class_dim={class_dim} is the batch dim of an output of shape "
            f"{tuple(logits.shape[1:])}; the classes are on another dim (1 as F.cross_entropy, "
            "-1 for [N, T, C])"
        )
    return dim + 1


def _binary_dim(logits: Tensor, class_dim: int | None) -> int | None:
    """The size-1 dim of ``[S, N, ...]`` binary logits that holds the logit, or ``None``."""
    if logits.dim() == 2:
        return None  # [S, N]: one logit per input
    if class_dim is None:
        return 2 if logits.shape[2] == 1 else None
    dim = _sample_dim(logits, class_dim)
    if logits.shape[dim] != 1:
        raise ValueError(
            f"task='binary' takes one logit per input (the logit of class 1); class_dim="
            f"{class_dim} of an output of shape {tuple(logits.shape[1:])} has size "
            f"{logits.shape[dim]} (for C >= 2 logits use task='classification')"
        )
    return dim


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
        method: ``"vectorized"``, ``"loop"`` or ``"linearized"``.
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
            means, aleatoric = outputs.loc, _widen(outputs.scale).pow(2).mean(0)
        elif isinstance(outputs, (tuple, list)) and len(outputs) == 2:
            means, aleatoric = outputs[0], _widen(outputs[1]).exp().mean(0)
        elif isinstance(outputs, Tensor):
            means = outputs
        else:
            raise TypeError(
                "a regression model must return a tensor (the mean), a (mean, log_variance) "
                f"pair or a torch.distributions.Normal; got {type(outputs).__name__} (predict's "
                "output_fn= picks the prediction from another output)"
            )
        means = _widen(means)
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
        elif name in ("num_samples", "method", "class_dim"):
            fields[name] = values[0] if len(set(values)) == 1 else values[-1]
        elif values[0] is None:
            fields[name] = None
        else:
            fields[name] = torch.cat(values, dim=0)
    return fields
