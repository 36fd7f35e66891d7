"""The KL term and the KL-aware training loss (the negative ELBO)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dnn2bnn.distributed import _gather_kl
from dnn2bnn.layers._base import BayesianLayer, is_bayesian_layer
from dnn2bnn.layers import _kl
from dnn2bnn.layers._sampling import MultiNormalKL

__all__ = ["WithBNNLoss", "kl_divergence"]


def kl_divergence(model: nn.Module) -> Tensor:
    """``KL(q || p)`` summed over every Bayesian layer of ``model``.

    Each layer's ``kl()`` covers its own parameters only, so nested layers are counted once.
    Returns a float32 (or wider) scalar; zero when the model has no Bayesian layer. Layers
    sharded by FSDP2 (``fully_shard``) give partial sums over their shards, which are added
    up across ranks here (a collective: every rank must call it, as in a training step).

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Linear(3, 2))
        >>> kl_divergence(bnn).item() > 0
        True
    """
    terms: list[Tensor] = []
    small: list[tuple[Any, ...]] = []  # NormalKL arguments of small float32 parameters
    for m in model.modules():
        if not is_bayesian_layer(m):
            continue
        if not _own_kl(m):
            terms.append(_gather_kl(m.kl()))
            continue
        found = False
        for name in m.bayes_params:
            mu = m._parameters[name + "_mu"]
            if mu is None:
                continue
            found = True
            pending = m._take_pending_kl(name)  # computed with this step's sample
            if pending is not None:
                terms.append(pending)
                continue
            args = None
            if mu.numel() <= _kl.SMALL_KL_NUMEL and mu.dtype == torch.float32:
                args = m._normal_kl_args(name)
            if args is None:
                terms.append(_gather_kl(m._kl_term(name)))
            else:
                prior_mean = args[3]
                if prior_mean.numel() == 1:
                    prior_mean = m._prior_scalar(name + "_prior_mu", prior_mean)
                small.append((*args[:3], prior_mean, *args[4:]))
        if not found:
            m.kl()  # raises: a Bayesian layer without any Bayesian parameter
    for exp in (False, True):  # one multi-tensor node per parametrization
        group = [args for args in small if args[6] is exp]
        if group:
            columns = list(zip(*group))
            terms.append(MultiNormalKL.apply(
                list(columns[3]), list(columns[4]), list(columns[5]), exp,
                *columns[0], *columns[1], *columns[2],
            ))
    if not terms:
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        return torch.zeros((), device=device)
    return torch.stack([t.reshape(()) for t in terms]).sum()


def _own_kl(module: nn.Module) -> bool:
    """Whether ``module`` computes its KL with the built-in per-parameter terms."""
    cls = type(module)
    return isinstance(module, BayesianLayer) and (
        cls.kl is BayesianLayer.kl and cls._kl_term is BayesianLayer._kl_term
    )


def _check_factor(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


class WithBNNLoss(nn.Module):
    """Wraps a network and its data loss so that the loss includes the KL term.

    ``forward(data, label)`` returns
    ``dnn_factor * loss_fn(backbone(data), label) + bnn_factor * kl_divergence(backbone)``.

    For the standard per-example ELBO, use a mean-reduced ``loss_fn`` with ``dnn_factor=1``
    and ``bnn_factor = 1 / N`` with N the number of training examples (not batches), or
    build it with :meth:`WithBNNLoss.elbo`. ``bnn_factor=1`` with a mean-reduced data loss
    over-weights the KL term N times and pulls every weight to the prior.

    Args:
        backbone: the Bayesian network.
        loss_fn: data loss, called as ``loss_fn(output, label)``.
        dnn_factor: weight of the data loss.
        bnn_factor: weight of the KL term.

    Attributes:
        last_data_loss: the data-loss term of the last call (detached), for logging.
        last_kl: the KL term of the last call (detached, unscaled).

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Linear(3, 2))
        >>> criterion = WithBNNLoss.elbo(bnn, torch.nn.CrossEntropyLoss(), num_train_examples=1000)
        >>> loss = criterion(torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> loss.backward()
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss_fn: Callable[..., Tensor],
        dnn_factor: float = 1.0,
        bnn_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__qualname__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__qualname__}")
        if not any(is_bayesian_layer(m) for m in backbone.modules()):
            warnings.warn(
                f"WithBNNLoss: {type(backbone).__name__} has no Bayesian layer, the KL term is 0; "
                "convert it with dnn2bnn.transform_to_bnn_model first",
                stacklevel=2,
            )
        self.backbone = backbone
        self.loss_fn = loss_fn
        self.dnn_factor = _check_factor("dnn_factor", dnn_factor)
        self.bnn_factor = _check_factor("bnn_factor", bnn_factor)
        self.last_data_loss: Tensor | None = None
        self.last_kl: Tensor | None = None

    @classmethod
    def elbo(
        cls, backbone: nn.Module, loss_fn: Callable[..., Tensor], *, num_train_examples: int
    ) -> WithBNNLoss:
        """The per-example negative ELBO: ``loss_fn(...) + KL / num_train_examples``.

        ``loss_fn`` should average over the batch (the default reduction of torch losses).
        Under DDP/FSDP, ``num_train_examples`` is the size of the whole training set, not of
        one rank's shard (see ``docs/distributed.md``).
        """
        if isinstance(num_train_examples, bool) or not isinstance(num_train_examples, int):
            raise TypeError(
                f"num_train_examples must be an int, got {type(num_train_examples).__name__}"
            )
        if num_train_examples < 1:
            raise ValueError(f"num_train_examples must be >= 1, got {num_train_examples}")
        return cls(backbone, loss_fn, dnn_factor=1.0, bnn_factor=1.0 / num_train_examples)

    def forward(self, data: Tensor, label: Tensor) -> Tensor:
        data_loss = self.loss_fn(self.backbone(data), label)
        kl = kl_divergence(self.backbone)
        self.last_data_loss, self.last_kl = data_loss.detach(), kl.detach()
        return self.dnn_factor * data_loss + self.bnn_factor * kl.to(data_loss.dtype)

    def extra_repr(self) -> str:
        return f"dnn_factor={self.dnn_factor:g}, bnn_factor={self.bnn_factor:g}"
