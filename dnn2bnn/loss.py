"""The KL term and the KL-aware training loss (the negative ELBO)."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dnn2bnn.distributed import _gather_kl
from dnn2bnn.layers._base import BayesianLayer, is_bayesian_layer
from dnn2bnn.layers import _kl
from dnn2bnn.layers._flat import FlatKL
from dnn2bnn.prediction._io import prediction_of

__all__ = ["WithBNNLoss", "elbo", "kl_divergence"]


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
    small: list[tuple[Any, ...]] = []  # (layer, name, mu, rho, prior_mu, prior_sigma)
    flat: dict[FlatKL, list[tuple[Any, str]]] = {}  # flat group -> its (layer, name) taken here
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
            if m._pending_kl:
                if _take_flat(m, name, flat):  # in the KL of its flat group (see below)
                    continue
                pending = m._take_pending_kl(name)  # computed with this step's sample
                if pending is not None:
                    terms.append(pending)
                    continue
            parts = None
            if mu.numel() <= _kl.SMALL_KL_NUMEL and mu.dtype == torch.float32:
                parts = m._normal_kl_parts(name)
            if parts is None or parts[1].dtype != torch.float32:
                terms.append(_gather_kl(m._kl_term(name)))
            else:
                small.append((m, name, *parts))
        if not found:
            m.kl()  # raises: a Bayesian layer without any Bayesian parameter
    for group, members in flat.items():
        if len(members) == group.members and not group.spec.spent:
            terms.append(group.kl if torch.is_grad_enabled() else group.kl.detach())
            continue
        for m, name in members:  # part of a group only (or spent): each KL computed afresh
            m._pending_kl.pop(name, None)
            terms.append(_gather_kl(m._kl_term(name)))
    if small:
        terms.extend(_kl.small_normal_kls(small))
    if not terms:
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        return torch.zeros((), device=device)
    if len(terms) == 1:  # (one multi-tensor node: the common case of a small model)
        return terms[0].reshape(())
    return torch.stack([t.reshape(()) for t in terms]).sum()


def _take_flat(layer: BayesianLayer, name: str, flat: dict[FlatKL, list[tuple[Any, str]]]) -> bool:
    """Collect ``name`` of ``layer`` into ``flat`` if its pending KL is a flat group's and the
    parameters and prior buffers are unchanged since the draw (else it is dropped: False)."""
    entry = layer._pending_kl.get(name)
    if entry is None or isinstance(entry[0], Tensor):
        return False
    entry = layer._unchanged_pending(name)
    if entry is None:
        return False
    group = entry[0]
    if torch.is_grad_enabled():  # handed out once; under no_grad (logging) it stays
        del layer._pending_kl[name]
    flat.setdefault(group, []).append((layer, name))
    return True


def _own_kl(module: nn.Module) -> bool:
    """Whether ``module`` computes its KL with the built-in per-parameter terms."""
    cls = type(module)
    return isinstance(module, BayesianLayer) and (
        cls.kl is BayesianLayer.kl and cls._kl_term is BayesianLayer._kl_term
    )


def _real(name: str, value: Any) -> float:
    """``value`` as a float: Python, numpy and 0-d tensor reals are accepted, bools are not."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_factor(name: str, value: Any) -> float:
    value = _real(name, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value


def check_num_train_examples(value: Any) -> int:
    """``value`` as a positive ``int``: Python, numpy and 0-d tensor integers are accepted.

    Raises:
        TypeError: a bool, a non-integer (``5.0`` included) or a tensor with more than one element.
        ValueError: ``value < 1``.

    Example:
        >>> import numpy as np
        >>> check_num_train_examples(np.int64(60_000)), check_num_train_examples(torch.tensor(10))
        (60000, 10)
    """
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(
                "num_train_examples must be an int (the number of training examples), got a "
                f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or type(value).__name__ == "bool_":
        raise TypeError(
            "num_train_examples must be an int (the number of training examples), got "
            f"{type(value).__name__} {value!r}"
        )
    if value < 1:
        raise ValueError(f"num_train_examples must be >= 1, got {value!r}")
    return int(value)


def elbo(loss: Tensor, model: nn.Module, *, num_train_examples: int) -> Tensor:
    """The per-example negative ELBO of a model that computes its own data loss.

    Returns ``loss + kl_divergence(model) / num_train_examples``: the same scaling as
    :meth:`WithBNNLoss.elbo`, for models such as Hugging Face's that return ``output.loss``
    (a mean over the batch) themselves.

    Args:
        loss: the data loss of one batch, averaged over its examples (a scalar tensor).
        model: the Bayesian network whose forward produced ``loss`` (the KL uses the sample
            of that forward where a layer's KL is estimated from it).
        num_train_examples: the size of the training set (of the whole training set under
            DDP/FSDP, not one rank's shard); numpy and 0-d tensor integers are accepted.

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Linear(3, 2))
        >>> data_loss = torch.nn.functional.cross_entropy(bnn(torch.randn(4, 3)), torch.tensor([0, 1, 1, 0]))
        >>> loss = dnn2bnn.elbo(data_loss, bnn, num_train_examples=1000)
        >>> torch.allclose(loss, data_loss + dnn2bnn.kl_divergence(bnn) / 1000)
        True
        >>> loss.backward()
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        found = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(
            f"elbo: loss must be the scalar data loss of a batch (e.g. output.loss), got {found}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"elbo: model must be an nn.Module, got {type(model).__qualname__}")
    n = check_num_train_examples(num_train_examples)
    kl = kl_divergence(model)
    return loss.reshape(()) + (kl / n).to(loss.dtype)


class WithBNNLoss(nn.Module):
    """Wraps a network and its data loss so that the loss includes the KL term.

    ``forward(data, label)`` returns
    ``dnn_factor * loss_fn(prediction, label) + bnn_factor * kl_divergence(backbone)``.

    How the inputs reach the model: a tensor ``data`` is its one positional argument,
    ``backbone(data)``; a mapping (``dict``, Hugging Face ``BatchEncoding``) is passed as
    keyword arguments, ``backbone(**data)``; keyword arguments of the call are passed on
    (``criterion(x, y, mask=m)`` calls ``backbone(x, mask=m)``). The prediction given to
    ``loss_fn`` is ``output_fn(output)`` if given, the ``logits`` of a Hugging Face
    ``ModelOutput``, else the output itself. With ``loss_fn=None`` the model computes its
    own loss (``output.loss``, e.g. an HF model called with ``labels``); then no ``label`` is
    passed to the call.

    For the standard per-example ELBO, use a mean-reduced ``loss_fn`` with ``dnn_factor=1``
    and ``bnn_factor = 1 / N`` with N the number of training examples (not batches), or
    build it with :meth:`WithBNNLoss.elbo`. ``bnn_factor=1`` with a mean-reduced data loss
    over-weights the KL term N times and pulls every weight to the prior.

    Args:
        backbone: the Bayesian network.
        loss_fn: data loss, called as ``loss_fn(prediction, label)``; ``None``: the model's
            own ``output.loss``.
        dnn_factor: weight of the data loss.
        bnn_factor: weight of the KL term.
        output_fn: picks the prediction from the model output (default: ``logits`` of a
            Hugging Face ``ModelOutput``, any other output as it is).

    Attributes:
        last_data_loss: the data-loss term of the last call (detached), for logging.
        last_kl: the KL term of the last call (detached, unscaled).

    Example:
        >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Linear(3, 2))
        >>> criterion = WithBNNLoss.elbo(bnn, torch.nn.CrossEntropyLoss(), num_train_examples=1000)
        >>> loss = criterion(torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> loss.backward()
        >>> loss = criterion({"input": torch.randn(8, 3)}, torch.randint(0, 2, (8,)))  # keywords
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss_fn: Callable[..., Tensor] | None,
        dnn_factor: float = 1.0,
        bnn_factor: float = 1.0,
        *,
        output_fn: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__qualname__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable (or None for the model's own output.loss), got "
                f"{type(loss_fn).__qualname__}"
            )
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__qualname__}")
        if not any(is_bayesian_layer(m) for m in backbone.modules()):
            warnings.warn(
                f"WithBNNLoss: {type(backbone).__name__} has no Bayesian layer, the KL term is 0; "
                "convert it with dnn2bnn.transform_to_bnn_model first",
                stacklevel=2,
            )
        self.backbone = backbone
        self.loss_fn = loss_fn
        self.output_fn = output_fn
        self.dnn_factor = _check_factor("dnn_factor", dnn_factor)
        self.bnn_factor = _check_factor("bnn_factor", bnn_factor)
        self.last_data_loss: Tensor | None = None
        self.last_kl: Tensor | None = None

    @classmethod
    def elbo(
        cls,
        backbone: nn.Module,
        loss_fn: Callable[..., Tensor] | None,
        *,
        num_train_examples: int,
        output_fn: Callable[[Any], Any] | None = None,
    ) -> WithBNNLoss:
        """The per-example negative ELBO: ``loss_fn(...) + KL / num_train_examples``.

        ``loss_fn`` should average over the batch (the default reduction of torch losses);
        ``None`` uses the model's own ``output.loss``. ``num_train_examples`` may be a Python,
        numpy or 0-d tensor integer. Under DDP/FSDP, it is the size of the whole training set,
        not of one rank's shard (see ``docs/distributed.md``).
        """
        num_train_examples = check_num_train_examples(num_train_examples)
        return cls(
            backbone, loss_fn, dnn_factor=1.0, bnn_factor=1.0 / num_train_examples,
            output_fn=output_fn,
        )

    def forward(self, data: Any, label: Any = None, **model_kwargs: Any) -> Tensor:
        if isinstance(data, Mapping):
            output = self.backbone(**data, **model_kwargs)
        else:
            output = self.backbone(data, **model_kwargs)
        if self.loss_fn is None:
            if label is not None:
                raise TypeError(
                    "WithBNNLoss(loss_fn=None) reads the model's own output.loss: pass the labels "
                    "in the model inputs (e.g. {'input_ids': ..., 'labels': y}), not as label"
                )
            data_loss = _own_loss(output, type(self.backbone).__name__)
        else:
            if label is None:
                raise TypeError(
                    "WithBNNLoss: label is missing (loss_fn is called as loss_fn(prediction, "
                    "label)); for a model that computes its own loss use loss_fn=None"
                )
            prediction = prediction_of(output, self.output_fn, where="WithBNNLoss")
            data_loss = self.loss_fn(prediction, label)
            if not isinstance(data_loss, Tensor) or data_loss.numel() != 1:
                found = (
                    f"shape {tuple(data_loss.shape)}" if isinstance(data_loss, Tensor)
                    else type(data_loss).__name__
                )
                # A per-example loss plus the KL, then summed, would count the KL B times.
                raise ValueError(
                    "WithBNNLoss: loss_fn must return the scalar data loss of the batch (a mean "
                    f"over its examples, as reduction='mean'), got {found} from "
                    f"{getattr(self.loss_fn, '__qualname__', type(self.loss_fn).__qualname__)}"
                )
            data_loss = data_loss.reshape(())
        kl = kl_divergence(self.backbone)
        self.last_data_loss, self.last_kl = data_loss.detach(), kl.detach()
        # Scaled in the KL's own (float32 or wider) precision, then cast: a float16 KL of a
        # large model overflows to inf before the 1/N factor could bring it into range.
        return self.dnn_factor * data_loss + (self.bnn_factor * kl).to(data_loss.dtype)

    def extra_repr(self) -> str:
        own = ", loss_fn=None (output.loss)" if self.loss_fn is None else ""
        return f"dnn_factor={self.dnn_factor:g}, bnn_factor={self.bnn_factor:g}{own}"


def _own_loss(output: Any, name: str) -> Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"WithBNNLoss(loss_fn=None): {name} returned {type(output).__name__} without a loss "
            "tensor (output.loss); pass the labels in the inputs so the model computes its loss, "
            "or give a loss_fn"
        )
    return loss
