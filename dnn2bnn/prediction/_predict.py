"""``dnn2bnn.predict``: the Monte Carlo predictive of a Bayesian network, with its uncertainty."""

from __future__ import annotations

import dataclasses
import numbers
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from dnn2bnn.config import enum_value
from dnn2bnn.prediction._collect import concat_draws, stack_draws
from dnn2bnn.prediction._hooks import untraced_hooks
from dnn2bnn.prediction._io import ModelInputs, OutputSelector
from dnn2bnn.prediction._linearized import LinearizedSampler
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
    BINARY = "binary"
    REGRESSION = "regression"


class Method(str, Enum):
    AUTO = "auto"
    VECTORIZED = "vectorized"
    LOOP = "loop"
    LINEARIZED = "linearized"


class PredictionWarning(UserWarning):
    """Prediction went on, but slower than asked (the Monte Carlo samples ran in a loop)."""


Prediction = ClassificationPrediction | RegressionPrediction


def predict(
    model: nn.Module,
    inputs: Tensor | Mapping[str, Any] | Iterable[Any],
    num_samples: int = 32,
    *,
    task: Task | str = "classification",
    class_dim: int | None = None,
    output_fn: Callable[[Any], Any] | None = None,
    batch_size: int | None = None,
    return_samples: bool = False,
    method: str = "auto",
    progress: bool | None = None,
) -> Prediction:
    """Monte Carlo predictive of ``model`` with its uncertainty decomposition.

    Each input is passed through ``num_samples`` networks drawn from the posterior. The
    model runs in eval mode (its train/eval flags are restored afterwards) without
    gradients.

    Inputs: a tensor is the model's one positional argument; a mapping (``dict``, Hugging
    Face ``BatchEncoding``) is passed as keyword arguments; a DataLoader (any iterable of
    batches) yields either of them, or tuples/lists ``(inputs, labels, ...)`` whose first
    element is the input, and a mapping batch loses its ``"labels"`` key.

    Outputs: the prediction is ``output_fn(output)`` if given, else the ``logits`` of a
    Hugging Face ``ModelOutput``, else the output itself. A classifier
    (``task="classification"``) returns logits with the classes on ``class_dim``: by default
    dim 1 (``[N, C]``, ``[N, C, H, W]``, as ``F.cross_entropy``), or the last dim for the
    N-d logits of Hugging Face token-classification and language-model outputs
    (``[N, T, C]``); other N-d ``ModelOutput`` logits need an explicit ``class_dim``. ``task="binary"`` takes the
    logit of class 1 (``[N]``, ``[N, 1]``, ``[N, H, W]``, as ``BCEWithLogitsLoss``);
    regression models (``task="regression"``) return the mean, ``(mean, log_variance)`` or a
    ``torch.distributions.Normal`` (see :class:`RegressionPrediction`).

    Sampling is vectorized: torch.fx finds the part of the network upstream of the first
    Bayesian layer, which runs once; the rest runs on a batch of ``B * num_samples`` rows
    where each Bayesian linear/convolution layer applies all its weight draws in one batched
    call (sigma(rho) is computed once per call of ``predict``). The split is traced once
    per model and input signature and reused until a submodule, a layer's mode or a hook
    changes (after changing an attribute that ``forward``'s Python control flow reads, call
    :func:`dnn2bnn.prediction.clear_plan_cache`). Folding the samples into the batch needs
    every value after the first Bayesian layer to have the batch on dim 0 and to compute
    each row from its own input: a probe run of the traced graph on 3 and 2 rows checks this
    (it finds sequence-first ``[T, B, D]`` layouts, pooling or attention over dim 0,
    ``view(-1)``). Where the model cannot be vectorized (the probe fails, tracing fails, a
    Bayesian weight is read outside its layer, the batch size is used as a number, forward
    hooks on the model itself or global module hooks, which a trace would skip, ...), a
    :class:`PredictionWarning` says why and the samples run as ``num_samples`` ordinary
    forward passes; ``result.method`` says which path ran.

    Args:
        model: a network with Bayesian layers (e.g. from
            :func:`dnn2bnn.transform_to_bnn_model`). Layers in "mean" mode stay deterministic.
        inputs: a tensor whose dim 0 is the batch, a mapping of keyword inputs (every tensor
            with the batch on dim 0), or an iterable of batches (a DataLoader).
        num_samples: ``S``, the number of posterior samples per input.
        task: ``"classification"``, ``"binary"`` or ``"regression"``.
        class_dim: the class dim of a classifier's output (dim 0 is the batch); ``None``:
            1, or -1 for the logits of a Hugging Face ``*LMOutput``/``TokenClassifierOutput``. With ``task="binary"``, the dim of
            size 1 holding the logit (``None``: dim 1 if it has size 1).
        output_fn: picks the prediction from the model output, e.g.
            ``lambda out: out["scores"]`` (it may see the folded batch of all samples: select,
            do not reduce over dim 0).
        batch_size: split a tensor (or mapping) input into batches of this size (``None``:
            one batch). The stochastic part runs on ``batch_size * num_samples`` rows at a time.
        return_samples: keep the per-sample outputs in ``result.samples``.
        method: ``"auto"`` (vectorized, else the loop with a warning), ``"vectorized"``
            (an error instead of the fallback), ``"loop"`` (the plain reference loop), or
            ``"linearized"``: not sampled networks but the linearized (GLM) predictive
            ``f(x; mu) + J(x) delta``, ``delta ~ N(0, sigma^2)``, one ``torch.func.jvp`` per
            sample (the network stays at its posterior means; it does not collapse under the
            wide posterior of ``fit_posterior(..., temperature=1.0)``). It needs a model whose
            prediction is one floating-point tensor (logits or a regression mean) and that
            ``torch.func`` can run (see ``docs/posterior.md``).
        progress: a tqdm progress bar over batches; ``None`` shows one for iterables of at
            least 20 batches when stderr is a terminal.

    Returns:
        A :class:`ClassificationPrediction` (classification, binary) or a
        :class:`RegressionPrediction`, on the model's output device.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> bnn = dnn2bnn.transform_to_bnn_model(net)
        >>> result = dnn2bnn.predict(bnn, torch.randn(5, 4), num_samples=16)
        >>> result.probs.shape, result.mutual_information.shape, result.method
        (torch.Size([5, 3]), torch.Size([5]), 'vectorized')
        >>> binary = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0))  # [N] logits
        >>> dnn2bnn.predict(dnn2bnn.transform_to_bnn_model(binary), torch.randn(5, 4), task="binary").probs.shape
        torch.Size([5, 2])
    """
    task = enum_value(Task, task, "task")
    chosen = enum_value(Method, method, "method")
    num_samples = _positive_int("num_samples", num_samples)
    if batch_size is not None:
        batch_size = _positive_int("batch_size", batch_size)
    if class_dim is not None and (isinstance(class_dim, bool) or not isinstance(class_dim, int)):
        raise TypeError(f"class_dim must be an int or None, got {type(class_dim).__name__}")
    if class_dim is not None and task is Task.REGRESSION:
        raise ValueError("class_dim applies to task='classification' or 'binary', not 'regression'")
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
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
        sampler: Any = (
            LinearizedSampler(model, num_samples, output_fn)
            if chosen is Method.LINEARIZED
            else _Sampler(model, num_samples, chosen, output_fn)
        )
        for batch in _progress(batches, inputs, progress):
            if any(t.shape[0] == 0 for t in batch.tensors()):
                raise ValueError(
                    "predict: a batch of the inputs has 0 rows (tensor shapes "
                    f"{ {k: tuple(v.shape) for k, v in batch.named_tensors()} }); pass at least one input"
                )
            outputs = sampler(batch)
            parts.append(_summarize(outputs, task, class_dim, sampler, return_samples, batch))
            _check_joinable(parts)
    if not parts:
        raise ValueError("predict got no input batch")
    joined = type(parts[0]).concat(parts)  # type: ignore[arg-type]
    return dataclasses.replace(joined, method=sampler.method_used)


def _check_joinable(parts: list[Prediction]) -> None:
    """The batches' results are joined along dim 0: the other dims must agree."""
    first, last = parts[0], parts[-1]
    a = first.probs if isinstance(first, ClassificationPrediction) else first.mean
    b = last.probs if isinstance(last, ClassificationPrediction) else last.mean
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"predict: batch {len(parts) - 1} gives results of shape {tuple(b.shape)} and batch 0 "
            f"{tuple(a.shape)}: they can only be joined along dim 0 (the batch). Per-token or "
            "per-pixel outputs of batches padded to their own length cannot be joined: pad every "
            "batch to one length (e.g. DataCollatorWithPadding(padding='max_length', "
            "max_length=...)) or call predict once per batch"
        )


def _summarize(
    outputs: Any, task: Task, class_dim: int | None, sampler: _Sampler, keep: bool,
    batch: ModelInputs,
) -> Prediction:
    """The result of one batch from its ``[S, B, ...]`` outputs."""
    where = sampler.where
    if isinstance(outputs, Tensor) and outputs.dim() == 2 and outputs.shape[1] != batch.batch_size:
        # [N] outputs whose N is not the number of inputs: an input without its batch dim
        raise ValueError(
            f"predict: {where} returned shape {tuple(outputs.shape[1:])} for a batch of "
            f"{batch.batch_size} inputs; dim 0 of the inputs and of the output must be the "
            "batch (a single example needs x.unsqueeze(0))"
        )
    if task is Task.REGRESSION:
        return RegressionPrediction.from_outputs(outputs, keep_samples=keep)
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"a classifier must return a logits tensor, got {type(outputs).__name__} from "
            f"{where} (pass output_fn= to pick the logits from the output)"
        )
    shape = tuple(outputs.shape[1:])
    if task is Task.BINARY:
        return ClassificationPrediction.from_logits(
            outputs, keep_samples=keep, class_dim=class_dim, binary=True
        )
    if outputs.dim() < 3:
        raise ValueError(
            f"a classifier's output must be [N, C, ...] logits with a class dim, got shape "
            f"{shape} from {where}: for one logit per input (BCEWithLogitsLoss) use "
            "task='binary'"
        )
    if class_dim is None:
        class_dim = _default_class_dim(sampler.model_output, shape)
    return ClassificationPrediction.from_logits(outputs, keep_samples=keep, class_dim=class_dim)


#: Hugging Face outputs whose N-d logits have the classes last (``[N, T, C]``).
_HF_CLASSES_LAST = re.compile(r"(LM|TokenClassifier)Output")
#: ... and those whose N-d logits have them on dim 1 (``[N, C, H, W]``).
_HF_CLASSES_FIRST = re.compile(r"SemanticSegmenterOutput|DepthEstimatorOutput")


def _default_class_dim(model_output: str | None, shape: tuple[int, ...]) -> int:
    """``class_dim=None``: dim 1 (PyTorch), the classes of HF token/LM logits last."""
    if model_output is None or len(shape) == 2 or _HF_CLASSES_FIRST.search(model_output):
        return 1
    if _HF_CLASSES_LAST.search(model_output):
        return -1
    raise ValueError(
        f"predict: where the classes are in the logits of {model_output} (shape {shape}) is not "
        "known: pass class_dim= (1 for [N, C, H, W], -1 for [N, T, C])"
    )


class _Sampler(OutputSelector):
    """Returns ``S`` predictions per batch (``[S, B, ...]``), vectorized when possible."""

    def __init__(
        self,
        model: nn.Module,
        num_samples: int,
        method: Method,
        output_fn: Callable[[Any], Any] | None,
    ) -> None:
        super().__init__(model, output_fn)
        #: what the vectorized path traces: the module inside torch.compile/DataParallel/DDP
        #: (the folded pass runs the traced graph in an fx interpreter; the loop calls ``model``)
        self.traced = _unwrapped(model)
        self.num_samples = num_samples
        self.method = method
        self.fell_back = method is Method.LOOP
        #: sigma(rho) per layer, computed once per predict call, shared by every draw set
        self.sigmas: dict[int, dict[str, Tensor]] = {}
        self.used: set[str] = set()

    @property
    def method_used(self) -> str:
        return "loop" if "loop" in self.used or not self.used else "vectorized"

    def _fall_back(self, reason: str) -> None:
        if self.method is Method.VECTORIZED:
            raise ValueError(f"predict(method='vectorized'): cannot vectorize {self.where}: {reason}")
        warnings.warn(
            f"predict: running {self.num_samples} samples as separate forward passes of "
            f"{self.where}: {reason}",
            PredictionWarning,
            stacklevel=4,
        )
        self.fell_back = True

    def __call__(self, inputs: ModelInputs) -> Any:
        reason = None
        if not self.fell_back:
            plan = untraced_hooks(self.model, self.traced) or cached_plan(self.traced, inputs)
            if isinstance(plan, str):
                reason = plan
            else:
                try:
                    out = self._run_plan(plan, inputs)
                except Exception as exc:  # noqa: BLE001 - any failure: the reference loop decides
                    first = (str(exc).strip().splitlines() or [""])[0]
                    reason = f"the folded batch failed ({type(exc).__name__}: {first})"
                else:
                    self.used.add("vectorized")
                    return out
        # The first pass runs before the warning (or the error of method="vectorized"):
        # inputs the model itself rejects (a wrong shape or dtype) raise the model's own
        # error, not a warning or an error about vectorizing.
        first = self.select(inputs(self.model))
        if reason is not None and self.method is Method.VECTORIZED:
            self._fall_back(reason)  # raises
        if reason is not None:
            self._fall_back(reason)
        self.used.add("loop")
        rest = [self.select(inputs(self.model)) for _ in range(self.num_samples - 1)]
        return stack_draws([first, *rest])

    def _run_plan(self, plan: SplitPlan, inputs: ModelInputs) -> Any:
        """All draws folded at once; on CPU in cache-sized chunks (see CPU_FOLD_BYTES)."""
        s = self.num_samples
        device = next(inputs.tensors()).device
        if device.type != "cpu" or s == 1:
            return plan.run(inputs, WeightDraws(s, self.sigmas), select=self.select)
        chunk = Chunk(frontier={})
        # local reparameterization's moments: shared by this batch's chunks, never by two
        # batches (a loader may refill the same input tensor with the next batch)
        moments: dict[int, Any] = {}
        parts = [plan.run(inputs, WeightDraws(1, self.sigmas, moments), chunk, select=self.select)]
        done = 1
        batch = inputs.batch_size
        while done < s:
            rows = max(1, CPU_FOLD_BYTES // max(1, chunk.row_bytes))
            k = min(s - done, max(1, rows // max(1, batch)))
            parts.append(
                plan.run(inputs, WeightDraws(k, self.sigmas, moments), chunk, select=self.select)
            )
            done += k
        return concat_draws(parts)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module that ``torch.compile`` (``OptimizedModule._orig_mod``), ``DataParallel`` or
    ``DistributedDataParallel`` (``.module``) wrapped, else ``model``: their ``forward(*args,
    **kwargs)`` cannot be traced, the module inside computes the same."""
    original = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(original, nn.Module):
        return _unwrapped(original)
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return _unwrapped(model.module)
    return model


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int >= 1``; numpy and 0-d tensor integers accepted, bools refused."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(
        value, numbers.Integral
    ):
        raise ValueError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _batches(inputs: Any, batch_size: int | None) -> Iterable[ModelInputs]:
    if isinstance(inputs, (Tensor, Mapping)):
        whole = ModelInputs.of(inputs)
        return whole.split(batch_size) if batch_size else (whole,)
    if type(inputs).__module__ == "numpy":  # iterable, but its rows are not batches
        raise TypeError(
            f"inputs must be a tensor, a mapping of keyword inputs or an iterable of batches, got "
            f"a numpy {type(inputs).__name__}: convert it with torch.from_numpy(...)"
        )
    if batch_size is not None:
        raise ValueError("batch_size applies to a tensor or mapping input; a DataLoader has its own")
    if not isinstance(inputs, Iterable):
        raise TypeError(
            "inputs must be a tensor, a mapping of keyword inputs or an iterable of batches, got "
            f"{type(inputs).__name__}"
        )
    return (ModelInputs.of_loader_batch(batch) for batch in inputs)


def _progress(
    batches: Iterable[ModelInputs], inputs: Any, progress: bool | None
) -> Iterable[ModelInputs]:
    if progress is False:
        return batches
    plain = isinstance(inputs, (Tensor, Mapping))
    total = len(inputs) if hasattr(inputs, "__len__") and not plain else None
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
