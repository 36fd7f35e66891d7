"""``dnn2bnn.predict``: the Monte Carlo predictive of a Bayesian network, with its uncertainty."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from dnn2bnn.prediction._split import Chunk, SplitPlan, cached_plan
from dnn2bnn.prediction._vectorized import WeightDraws, is_stochastic
from dnn2bnn.prediction.results import ClassificationPrediction, RegressionPrediction

__all__ = ["PredictionWarning", "Task", "predict"]

#: A DataLoader with at least this many batches gets a progress bar when ``progress=None``.
AUTO_PROGRESS_MIN_BATCHES = 20

#: On CPU the folded batch is split into chunks of draws so that the largest activation of
#: the stochastic part stays within about this many bytes (cache-sized): a fully Bayesian
#: CNN folded at once thrashes the cache and loses to the plain loop. The first chunk (one
#: draw) measures the activation size; the deterministic part runs once for all chunks.
CPU_FOLD_BYTES = 16 * 2**20


class Task(str, Enum):
    """What the model's output means."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class Method(str, Enum):
    AUTO = "auto"
    VECTORIZED = "vectorized"
    LOOP = "loop"


class PredictionWarning(UserWarning):
    """Prediction went on, but slower than asked (the Monte Carlo samples ran in a loop)."""


Prediction = ClassificationPrediction | RegressionPrediction


def predict(
    model: nn.Module,
    inputs: Tensor | Iterable[Any],
    num_samples: int = 32,
    *,
    task: Task | str = "classification",
    batch_size: int | None = None,
    return_samples: bool = False,
    method: str = "auto",
    progress: bool | None = None,
) -> Prediction:
    """Monte Carlo predictive of ``model`` with its uncertainty decomposition.

    Each input is passed through ``num_samples`` networks drawn from the posterior. The
    model runs in eval mode (its train/eval flags are restored afterwards) without
    gradients. Classifiers must return logits over the last dimension (one logit: binary,
    for class 1); regression models return the mean, ``(mean, log_variance)`` or a
    ``torch.distributions.Normal`` (see :class:`RegressionPrediction`).

    Sampling is vectorized: torch.fx finds the part of the network upstream of the first
    Bayesian layer, which runs once; the rest runs on a batch of ``B * num_samples`` rows
    where each Bayesian linear/convolution layer applies all its weight draws in one batched
    call (softplus(rho) is computed once per call of ``predict``). The split is traced once
    per model and reused until a submodule, a layer's mode or a hook changes (after changing
    an attribute that ``forward``'s Python control flow reads, call
    :func:`dnn2bnn.prediction.clear_plan_cache`). This assumes dim 0 of
    every batched tensor is the batch and that the model, in eval mode, treats batch items
    independently. Where the graph cannot be split (tracing fails, a Bayesian weight is read
    outside its layer, the batch size is used as a number, ...), a
    :class:`PredictionWarning` is issued and the samples run as ``num_samples`` ordinary
    forward passes; ``result.method`` says which path ran.

    Args:
        model: a network with Bayesian layers (e.g. from
            :func:`dnn2bnn.transform_to_bnn_model`). Layers in "mean" mode stay deterministic.
        inputs: a tensor whose dim 0 is the batch, or an iterable of batches (a DataLoader);
            a batch that is a tuple or list contributes its first element (e.g. ``(x, y)``).
        num_samples: ``S``, the number of posterior samples per input.
        task: ``"classification"`` or ``"regression"``.
        batch_size: split a tensor input into batches of this size (``None``: one batch).
            The stochastic part runs on ``batch_size * num_samples`` rows at a time.
        return_samples: keep the per-sample outputs in ``result.samples``.
        method: ``"auto"`` (vectorized, else the loop with a warning), ``"vectorized"``
            (an error instead of the fallback) or ``"loop"`` (the plain reference loop).
        progress: a tqdm progress bar over batches; ``None`` shows one for iterables of at
            least 20 batches when stderr is a terminal.

    Returns:
        A :class:`ClassificationPrediction` or a :class:`RegressionPrediction`, on the
        model's output device.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> bnn = dnn2bnn.transform_to_bnn_model(net)
        >>> result = dnn2bnn.predict(bnn, torch.randn(5, 4), num_samples=16)
        >>> result.probs.shape, result.mutual_information.shape, result.method
        (torch.Size([5, 3]), torch.Size([5]), 'vectorized')
    """
    task = _enum(Task, task, "task")
    chosen = _enum(Method, method, "method")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if not any(is_stochastic(m) for m in model.modules()):
        warnings.warn(
            f"predict: {type(model).__name__} has no Bayesian layer in 'sample' mode; all "
            f"{num_samples} samples are identical",
            PredictionWarning,
            stacklevel=2,
        )
    batches = _batches(inputs, batch_size)
    parts: list[Prediction] = []
    with torch.no_grad(), _eval_mode(model):
        sampler = _Sampler(model, num_samples, chosen)
        for x in _progress(batches, inputs, progress):
            outputs = sampler(x)
            if task is Task.CLASSIFICATION:
                if not isinstance(outputs, Tensor):
                    raise TypeError(
                        "a classifier must return a logits tensor, got "
                        f"{type(outputs).__name__} from {type(model).__name__}"
                    )
                parts.append(
                    ClassificationPrediction.from_logits(outputs, keep_samples=return_samples)
                )
            else:
                parts.append(
                    RegressionPrediction.from_outputs(outputs, keep_samples=return_samples)
                )
    if not parts:
        raise ValueError("predict got no input batch")
    joined = type(parts[0]).concat(parts)  # type: ignore[arg-type]
    return dataclasses.replace(joined, method=sampler.method_used)


class _Sampler:
    """Returns ``S`` model outputs per batch (``[S, B, ...]``), vectorized when possible."""

    def __init__(self, model: nn.Module, num_samples: int, method: Method) -> None:
        self.model = model
        self.num_samples = num_samples
        self.method = method
        self.plan: SplitPlan | None = None
        #: softplus(rho) per layer, computed once per predict call, shared by every draw set
        self.sigmas: dict[int, dict[str, Tensor]] = {}
        self.used: set[str] = set()
        if method is not Method.LOOP:
            plan = cached_plan(model)
            if isinstance(plan, str):
                self._fall_back(plan)
            else:
                self.plan = plan

    @property
    def method_used(self) -> str:
        return "loop" if "loop" in self.used or not self.used else "vectorized"

    def _fall_back(self, reason: str) -> None:
        where = f"{type(self.model).__module__}.{type(self.model).__qualname__}"
        if self.method is Method.VECTORIZED:
            raise ValueError(f"predict(method='vectorized'): cannot vectorize {where}: {reason}")
        warnings.warn(
            f"predict: running {self.num_samples} samples as separate forward passes of {where}: "
            f"{reason}",
            PredictionWarning,
            stacklevel=4,
        )
        self.plan = None

    def __call__(self, x: Tensor) -> Any:
        if self.plan is not None:
            try:
                out = self._run_plan(self.plan, x)
            except Exception as exc:  # noqa: BLE001 - any failure: the reference loop decides
                self._fall_back(f"the folded batch failed ({type(exc).__name__}: {exc})")
            else:
                self.used.add("vectorized")
                return out
        self.used.add("loop")
        return _stack([self.model(x) for _ in range(self.num_samples)])

    def _run_plan(self, plan: SplitPlan, x: Tensor) -> Any:
        """All draws folded at once; on CPU in cache-sized chunks (see CPU_FOLD_BYTES)."""
        s = self.num_samples
        if x.device.type != "cpu" or s == 1:
            return plan.run(x, WeightDraws(s, self.sigmas))
        chunk = Chunk(frontier={})
        parts = [plan.run(x, WeightDraws(1, self.sigmas), chunk)]
        done = 1
        while done < s:
            rows = max(1, CPU_FOLD_BYTES // max(1, chunk.row_bytes))
            k = min(s - done, max(1, rows // max(1, x.shape[0])))
            parts.append(plan.run(x, WeightDraws(k, self.sigmas), chunk))
            done += k
        return _concat(parts)


def _concat(parts: list[Any]) -> Any:
    """Join ``[k, B, ...]`` outputs of several chunks of draws along the sample dimension."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, torch.distributions.Normal):
        return torch.distributions.Normal(
            torch.cat([p.loc for p in parts]), torch.cat([p.scale for p in parts])
        )
    raise TypeError(f"cannot collect model outputs of type {type(first).__name__}")


def _stack(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.stack(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, torch.distributions.Normal):
        return torch.distributions.Normal(
            torch.stack([o.loc for o in outputs]), torch.stack([o.scale for o in outputs])
        )
    raise TypeError(f"cannot collect model outputs of type {type(first).__name__}")


def _enum(cls: type[Enum], value: Any, name: str) -> Any:
    try:
        return cls(value)
    except ValueError as exc:
        raise ValueError(f"{name} must be one of {[m.value for m in cls]}, got {value!r}") from exc


def _batches(inputs: Any, batch_size: int | None) -> Iterable[Tensor]:
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0:
            raise ValueError("inputs must have a batch dimension, got a 0-d tensor")
        return inputs.split(batch_size) if batch_size else (inputs,)
    if batch_size is not None:
        raise ValueError("batch_size applies to a tensor input; a DataLoader has its own")
    if not isinstance(inputs, Iterable):
        raise TypeError(
            f"inputs must be a tensor or an iterable of batches, got {type(inputs).__name__}"
        )
    return (_first_tensor(batch) for batch in inputs)


def _first_tensor(batch: Any) -> Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(
            "each batch must be a tensor or a tuple/list starting with the input tensor, got "
            f"{type(batch).__name__}"
        )
    return batch


def _progress(batches: Iterable[Tensor], inputs: Any, progress: bool | None) -> Iterable[Tensor]:
    if progress is False:
        return batches
    total = len(inputs) if hasattr(inputs, "__len__") and not isinstance(inputs, Tensor) else None
    if progress is None and (total is None or total < AUTO_PROGRESS_MIN_BATCHES):
        return batches
    from tqdm.auto import tqdm

    disable = None if progress is None else False  # None: only on a terminal
    return tqdm(batches, total=total, desc="predict", unit="batch", disable=disable)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
