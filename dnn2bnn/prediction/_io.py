"""How a batch is passed to a model, and which part of its output is the prediction.

The conventions shared by :func:`dnn2bnn.predict` and :class:`dnn2bnn.WithBNNLoss`:

* a tensor is the model's one positional argument; a mapping (``dict``, Hugging Face
  ``BatchEncoding``) is passed as keyword arguments, ``model(**batch)``;
* a batch from a ``DataLoader`` that is a tuple or list is ``(inputs, labels, ...)``: its first
  element is the input (a tensor, a mapping, or a tuple of tensors: the positional
  arguments); a mapping batch loses its ``"labels"`` key (the prediction does not use the
  labels);
* a Hugging Face ``ModelOutput`` contributes its ``logits``; any other output structure is
  read by an ``output_fn`` the caller passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["LABEL_KEYS", "ModelInputs", "OutputSelector", "is_model_output", "prediction_of"]

#: Keys of a mapping batch that hold labels: left out of the forward of ``predict``.
LABEL_KEYS: tuple[str, ...] = ("labels",)


@dataclass(frozen=True)
class ModelInputs:
    """One batch as the model takes it: ``model(*args, **kwargs)``."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, batch: Any) -> ModelInputs:
        """A tensor is the one positional argument, a mapping the keyword arguments."""
        if isinstance(batch, Tensor):
            if batch.dim() == 0:
                raise ValueError("inputs must have a batch dimension, got a 0-d tensor")
            return cls(args=(batch,))
        if isinstance(batch, Mapping):
            bad = [k for k in batch if not isinstance(k, str)]
            if bad:
                raise TypeError(
                    f"a mapping batch is passed as keyword arguments: its keys must be str, got {bad!r}"
                )
            return cls(kwargs=dict(batch))
        raise TypeError(
            "a batch must be a tensor (the model's input) or a mapping of keyword arguments "
            f"(dict, BatchEncoding), got {type(batch).__name__}"
        )

    @classmethod
    def of_loader_batch(cls, batch: Any) -> ModelInputs:
        """A DataLoader batch: ``(inputs, labels, ...)`` gives ``inputs``; labels are dropped."""
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise TypeError("a DataLoader batch is an empty tuple/list")
            batch = batch[0]
            if isinstance(batch, (tuple, list)) and all(isinstance(b, Tensor) for b in batch):
                return cls(args=tuple(batch))  # ((x1, x2), y): several positional inputs
        if isinstance(batch, Mapping):
            batch = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        try:
            return cls.of(batch)
        except TypeError as exc:
            raise TypeError(
                "each batch must be a tensor, a mapping of keyword arguments, or a tuple/list "
                "whose first element is one of those or a tuple of tensors (e.g. (x, y) or "
                f"((x1, x2), y)); got {type(batch).__name__}"
            ) from exc

    def tensors(self) -> Iterator[Tensor]:
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, Tensor) and value.dim() > 0:
                yield value

    @property
    def batch_size(self) -> int:
        """Dim 0 of the inputs (every tensor input must share it)."""
        sizes = {t.shape[0] for t in self.tensors()}
        if not sizes:
            raise ValueError("the inputs hold no tensor with a batch dimension")
        if len(sizes) > 1:
            shapes = {name: tuple(v.shape) for name, v in self.named_tensors()}
            raise ValueError(
                f"the tensor inputs must share their batch size (dim 0), got shapes {shapes}"
            )
        return sizes.pop()

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        for i, value in enumerate(self.args):
            if isinstance(value, Tensor):
                yield f"args[{i}]", value
        for key, value in self.kwargs.items():
            if isinstance(value, Tensor):
                yield key, value

    def split(self, size: int) -> list[ModelInputs]:
        """Consecutive batches of ``size`` rows (every tensor split along dim 0)."""
        n = self.batch_size
        parts = []
        for start in range(0, n, size):
            def cut(v: Any, start: int = start) -> Any:
                return v[start:start + size] if isinstance(v, Tensor) and v.dim() > 0 else v

            parts.append(ModelInputs(
                tuple(cut(a) for a in self.args), {k: cut(v) for k, v in self.kwargs.items()}
            ))
        return parts

    def __call__(self, model: nn.Module | Callable[..., Any]) -> Any:
        return model(*self.args, **self.kwargs)


def is_model_output(value: Any) -> bool:
    """Whether ``value`` is a Hugging Face ``transformers`` ``ModelOutput`` (without importing it)."""
    return any(
        cls.__name__ == "ModelOutput" and cls.__module__.startswith("transformers")
        for cls in type(value).__mro__
    )


def prediction_of(output: Any, output_fn: Callable[[Any], Any] | None, *, where: str) -> Any:
    """The prediction in ``output``: ``output_fn(output)``, else a ModelOutput's ``logits``."""
    if output_fn is not None:
        return output_fn(output)
    if is_model_output(output):
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
        if logits is None:
            raise TypeError(
                f"{where}: the model returned a {type(output).__name__} without logits "
                f"(keys {list(output.keys()) if isinstance(output, Mapping) else '?'}); pass "
                "output_fn= to pick the prediction, e.g. output_fn=lambda out: out.last_hidden_state"
            )
        return logits
    return output


class OutputSelector:
    """Picks the prediction out of each output of ``model`` (the samplers of ``predict``).

    Records in :attr:`model_output` the class name of the Hugging Face ``ModelOutput`` whose
    logits were taken, for the result to report.
    """

    def __init__(self, model: nn.Module, output_fn: Callable[[Any], Any] | None) -> None:
        self.model = model
        self.output_fn = output_fn
        self.where = f"{type(model).__module__}.{type(model).__qualname__}"
        #: the class name of the Hugging Face ModelOutput whose logits are the prediction
        self.model_output: str | None = None

    def select(self, output: Any) -> Any:
        """The prediction in one model output (see :func:`prediction_of`)."""
        if self.output_fn is None and is_model_output(output):
            self.model_output = type(output).__name__
        return prediction_of(output, self.output_fn, where=f"predict ({self.where})")
