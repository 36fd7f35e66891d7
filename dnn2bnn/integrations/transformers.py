"""Hugging Face ``transformers``: fine-tune a converted model with ``Trainer``, save and reload it.

Importing this module imports ``transformers`` (``pip install transformers``); importing
:mod:`dnn2bnn` does not.

- :class:`BayesTrainer` (and :class:`BayesSeq2SeqTrainer`, or :class:`BayesTrainerMixin`
  for any other ``Trainer`` subclass) optimises the per-example negative ELBO
  ``loss + KL / num_train_examples``, gives the posterior ``rho`` parameters their own
  learning rate (:func:`dnn2bnn.bayes_param_groups`), logs ``kl`` and ``data_loss`` next
  to ``loss``, and evaluates with Monte Carlo predictions (``eval_accuracy``, ``eval_nll``,
  ``eval_ece`` of the predictive mean over ``mc_samples`` forward passes).
- A converted model's ``save_pretrained`` also writes ``dnn2bnn_config.json`` (the
  conversion record); :func:`from_pretrained` rebuilds the converted model from such a
  directory (a ``save_pretrained`` output or a ``Trainer`` checkpoint). The model class's
  own ``from_pretrained`` cannot restore the posterior: it would re-initialise every
  converted weight (reporting them as MISSING/UNEXPECTED keys).

Example:
    >>> import transformers, warnings
    >>> from dnn2bnn.integrations.transformers import BayesTrainer
    >>> config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                                  num_attention_heads=2, intermediate_size=16)
    >>> with warnings.catch_warnings():  # BERT defeats torch.fx: converted by module tree
    ...     warnings.simplefilter("ignore", dnn2bnn.ConversionWarning)
    ...     bnn = dnn2bnn.transform_to_bnn_model(transformers.BertForSequenceClassification(config))
    >>> args = transformers.TrainingArguments("out", report_to=[], use_cpu=True)
    >>> trainer = BayesTrainer(model=bnn, args=args, num_train_examples=1000, mc_samples=4)
    >>> trainer.kl_weight
    0.001
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import Tensor, nn

from dnn2bnn import metrics
from dnn2bnn.checkpoint._arch import _import
from dnn2bnn.checkpoint._bnn import replay_calls
from dnn2bnn.checkpoint._rebuild import legacy_calls, restore_parametrizations_
from dnn2bnn.checkpoint._read import match_state
from dnn2bnn.errors import CheckpointError, ConversionWarning
from dnn2bnn.integrations._hf_model import RECORD_NAME, config_dtype
from dnn2bnn.layers._base import BayesianLayer
from dnn2bnn.loss import check_num_train_examples, kl_divergence
from dnn2bnn.modes import set_mode
from dnn2bnn.recipe import DEFAULT_RHO_LR_FACTOR, bayes_param_groups

__all__ = [
    "BayesSeq2SeqTrainer",
    "BayesTrainer",
    "BayesTrainerMixin",
    "from_pretrained",
    "mc_metrics",
]

_NOT_SINGLE_LABEL = ("regression", "multi_label_classification")

_CAUSAL_LM_NAMES = set(
    transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
)


class BayesTrainerMixin:
    """ELBO training, ``rho`` learning rate, KL logging and Monte Carlo evaluation for a ``Trainer``.

    Put it before the ``Trainer`` class in the bases
    (``class MyTrainer(BayesTrainerMixin, transformers.Trainer)``); it adds keyword-only
    options to the constructor and passes every other argument to the ``Trainer``.

    Args:
        num_train_examples: ``N`` in ``loss + KL / N``; default ``len(train_dataset)``.
            For a loss averaged over tokens (language models), the number of training
            tokens is the matching choice.
        rho_lr: learning rate of the ``*_rho`` parameters; default
            ``DEFAULT_RHO_LR_FACTOR * args.learning_rate``. They get no weight decay (it
            would pull ``rho`` to 0, i.e. ``sigma`` to 1; ``log 2`` under softplus).
        mc_samples: forward passes averaged per evaluation batch (``0``: the ``Trainer``'s
            own single-pass evaluation).
        **kwargs: the ``Trainer``'s arguments. Without ``compute_metrics``,
            :func:`mc_metrics` is used.

    Attributes:
        kl_weight: ``1 / num_train_examples``.
    """

    def __init__(
        self,
        *args: Any,
        num_train_examples: int | None = None,
        rho_lr: float | None = None,
        mc_samples: int = 8,
        **kwargs: Any,
    ) -> None:
        if num_train_examples is not None:
            num_train_examples = check_num_train_examples(num_train_examples)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 0:
            raise ValueError(f"mc_samples must be an int >= 0, got {mc_samples!r}")
        if rho_lr is not None and not (isinstance(rho_lr, (int, float)) and rho_lr > 0):
            raise ValueError(f"rho_lr must be a number > 0, got {rho_lr!r}")
        super().__init__(*args, **kwargs)
        if not any(isinstance(m, BayesianLayer) for m in self.model.modules()):  # type: ignore[attr-defined]
            raise TypeError(
                f"{type(self).__name__}: expected a model converted by "
                f"dnn2bnn.transform_to_bnn_model, got {type(self.model).__name__} "  # type: ignore[attr-defined]
                "without Bayesian layer"
            )
        self._num_train_examples = None if num_train_examples is None else int(num_train_examples)
        self.rho_lr = rho_lr
        self.mc_samples = mc_samples
        self._kl_sum: Tensor | float = 0.0
        self._kl_count = 0
        self._warned_generate = False
        self._default_metrics = False
        self._warned_not_mc = False
        if self.compute_metrics is None and mc_samples > 0:  # type: ignore[has-type]
            # only where prediction_step returns Monte Carlo log-probabilities: mc_metrics
            # of generated token ids or of (start, end) logits would be numbers without meaning
            if self._monte_carlo_evaluation():
                self.compute_metrics = mc_metrics
                self._default_metrics = True
            else:
                self._warned_not_mc = True
                warnings.warn(
                    f"{type(self).__name__}: {self._why_not_monte_carlo()}, so evaluation is the "
                    "Trainer's own (one posterior sample per forward pass, no accuracy/NLL/ECE); "
                    "pass compute_metrics= for metrics, or mc_samples=0 to silence this",
                    stacklevel=2,
                )
        self._check_user_optimizer(rho_lr)

    def _monte_carlo_evaluation(self) -> bool:
        return self._why_not_monte_carlo() == ""

    def _why_not_monte_carlo(self, labels: Tensor | None = None) -> str:
        label_names = self.label_names or ["labels"]  # type: ignore[attr-defined]
        problem = getattr(getattr(self.model, "config", None), "problem_type", None)  # type: ignore[attr-defined]
        if problem in _NOT_SINGLE_LABEL:
            return (
                f"the model's config.problem_type is {problem!r} (Monte Carlo evaluation "
                "averages a softmax over classes)"
            )
        if labels is not None and labels.is_floating_point():
            return (
                f"the labels are {labels.dtype} (regression or multi-label targets; Monte Carlo "
                "evaluation averages a softmax over integer classes)"
            )
        if getattr(self.args, "predict_with_generate", False):  # type: ignore[attr-defined]
            return "predict_with_generate=True evaluates by generation"
        if len(label_names) != 1:
            return (
                f"the model has several label names {list(label_names)} (Monte Carlo "
                "evaluation handles one class label)"
            )
        return ""

    def _check_user_optimizer(self, rho_lr: float | None) -> None:
        optimizer = self.optimizer  # type: ignore[has-type]
        if optimizer is None:
            return
        if rho_lr is not None:
            raise ValueError(
                f"{type(self).__name__}: rho_lr={rho_lr!r} sets the rho learning rate of the "
                "optimizer BayesTrainer builds, but optimizers=(optimizer, ...) was passed; build "
                "that optimizer with dnn2bnn.bayes_param_groups(model, lr=..., rho_lr=...) instead"
            )
        rho_ids = {id(p) for n, p in self.model.named_parameters() if n.endswith("_rho")}  # type: ignore[attr-defined]
        for group in optimizer.param_groups:
            ids = {id(p) for p in group["params"]}
            if ids & rho_ids and ids - rho_ids:
                warnings.warn(
                    f"{type(self).__name__}: the optimizer passed in optimizers=(...) has a "
                    "parameter group holding both rho and mean parameters, so the rho "
                    "parameters train at the means' learning rate (and weight decay); build it "
                    "with dnn2bnn.bayes_param_groups(model, lr=...) for the rho learning rate",
                    stacklevel=3,
                )
                return

    # ------------------------------------------------------------------ the ELBO
    @property
    def num_train_examples(self) -> int:
        """``N`` of the KL weight ``1 / N``: the given number, else ``len(train_dataset)``."""
        if self._num_train_examples is not None:
            return self._num_train_examples
        dataset = self.train_dataset
        try:
            return len(dataset)
        except TypeError:
            raise ValueError(
                f"{type(self).__name__}: cannot take num_train_examples from a train_dataset "
                f"without a length ({type(dataset).__name__}); pass num_train_examples="
            ) from None

    @property
    def kl_weight(self) -> float:
        """The weight ``1 / num_train_examples`` of the KL term."""
        return 1.0 / self.num_train_examples

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Any:
        """The ``Trainer``'s data loss plus, in training, ``KL / num_train_examples``."""
        result = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        kl = kl_divergence(self.accelerator.unwrap_model(model))  # type: ignore[attr-defined]
        scale = self.kl_weight
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            # the Trainer will not divide this micro-batch's loss by the accumulation steps
            scale /= getattr(  # transformers >= 4.48; older ones use the argument's value
                self, "current_gradient_accumulation_steps",
                self.args.gradient_accumulation_steps,  # type: ignore[attr-defined]
            )
        self._kl_sum = self._kl_sum + kl.detach().float()  # a tensor: no device sync per step
        self._kl_count += 1
        loss = loss + scale * kl.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        # the rule of Trainer.training_step
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)  # type: ignore[attr-defined]
            or self.compute_loss_func is not None  # type: ignore[attr-defined]
        )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``kl`` (mean KL since the last log) and ``data_loss`` (``loss - kl / N``) to training logs."""
        if "loss" in logs and self._kl_count:
            kl = float(self._kl_sum) / self._kl_count
            logs["kl"] = kl
            logs["data_loss"] = logs["loss"] - kl * self.kl_weight
            self._kl_sum, self._kl_count = 0.0, 0
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The ``Trainer``'s optimizer, with the ``rho`` parameters in their own groups.

        Means and deterministic parameters keep the ``Trainer``'s learning rate and weight
        decay rules; ``*_rho`` get ``rho_lr`` and no weight decay.
        """
        if self.optimizer is not None:  # type: ignore[has-type]
            return self.optimizer  # type: ignore[has-type]
        opt_model = self.model if model is None else model  # type: ignore[attr-defined]
        lr = self.args.learning_rate  # type: ignore[attr-defined]
        rho_lr = self.rho_lr if self.rho_lr is not None else DEFAULT_RHO_LR_FACTOR * lr
        means, rhos = bayes_param_groups(opt_model, lr=lr, rho_lr=rho_lr)
        decay = set(self.get_decay_parameter_names(opt_model))  # type: ignore[attr-defined]
        decayed = {id(p) for n, p in opt_model.named_parameters() if n in decay}
        weight_decay = self.args.weight_decay  # type: ignore[attr-defined]
        groups = [
            {"params": [p for p in means["params"] if id(p) in decayed], "lr": lr,
             "weight_decay": weight_decay, "name": "means"},
            {"params": [p for p in means["params"] if id(p) not in decayed], "lr": lr,
             "weight_decay": 0.0, "name": "means_no_decay"},
            {"params": rhos["params"], "lr": rho_lr, "weight_decay": 0.0, "name": "rho"},
        ]
        if self.optimizer_cls_and_kwargs is not None:  # type: ignore[attr-defined]
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs  # type: ignore[attr-defined]
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(  # type: ignore[attr-defined]
                self.args, opt_model  # type: ignore[attr-defined]
            )
        is_factory = getattr(transformers.trainer, "is_optimizer_factory", lambda cls: False)
        for key in ("params", "model", "optimizer_dict", "<factory>"):
            if key in optimizer_kwargs or (key == "<factory>" and is_factory(optimizer_cls)):
                raise ValueError(
                    f"{type(self).__name__}: optimizer {self.args.optim!r} builds its own parameter "  # type: ignore[attr-defined]
                    "groups, so the rho learning rate cannot be applied; use a torch optimizer "
                    "(e.g. optim='adamw_torch') or pass optimizers=(...) built with "
                    "dnn2bnn.bayes_param_groups"
                )
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # The Trainer loads a checkpoint with strict=False: a mismatch would only be logged.
        if model is None or model is self.model:  # type: ignore[attr-defined]
            match_state(
                self.model,  # type: ignore[attr-defined]
                _read_weights(Path(resume_from_checkpoint)),
                source=str(resume_from_checkpoint),
                target=f"the converted {type(self.model).__name__} being trained",  # type: ignore[attr-defined]
            )
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    # ------------------------------------------------------------------ evaluation
    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Monte Carlo prediction: log of the mean softmax over ``mc_samples`` passes.

        Returns ``(nll, log_probs, labels)`` (the predictive NLL as the loss; ``None`` for
        inputs without labels); for causal language models, positions and labels are
        shifted by one as the model's own loss does. ``mc_samples=0`` gives the
        ``Trainer``'s own step, so does ``predict_with_generate`` (with a warning: it
        draws new weights at every decoding step) and several label names.
        """
        label_names = self.label_names or ["labels"]  # type: ignore[attr-defined]
        generate = getattr(self.args, "predict_with_generate", False)  # type: ignore[attr-defined]
        if generate and self.mc_samples and not self._warned_generate:
            warnings.warn(
                f"{type(self).__name__}: predict_with_generate=True evaluates by generation, "
                "and every decoding step (one forward pass) draws new weights, so a generated "
                "sequence mixes posterior samples; it is not Monte Carlo averaging",
                stacklevel=2,
            )
            self._warned_generate = True
        if self.mc_samples == 0 or generate or len(label_names) != 1:
            return super().prediction_step(  # type: ignore[misc]
                model, inputs, prediction_loss_only, ignore_keys=ignore_keys
            )
        inputs = self._prepare_inputs(inputs)  # type: ignore[attr-defined]
        labels = inputs.get(label_names[0])
        why = self._why_not_monte_carlo(labels)
        if why:  # found only now: HF models set config.problem_type at their first forward
            if self._default_metrics:
                self.compute_metrics, self._default_metrics = None, False
            if not self._warned_not_mc:
                self._warned_not_mc = True
                warnings.warn(
                    f"{type(self).__name__}: {why}, so evaluation is the Trainer's own (one "
                    "posterior sample per forward pass) and mc_metrics is not applied; pass "
                    "mc_samples=0 to silence this",
                    stacklevel=2,
                )
            self.mc_samples = 0
            return super().prediction_step(  # type: ignore[misc]
                model, inputs, prediction_loss_only, ignore_keys=ignore_keys
            )
        # the labels stay in the forward, as in the Trainer's own step: encoder-decoder
        # models build their decoder inputs from them
        unwrapped = self.accelerator.unwrap_model(model)  # type: ignore[attr-defined]
        with torch.no_grad(), set_mode(unwrapped, "sample"):
            probs = None
            for _ in range(self.mc_samples):
                out = _logits_of(model(**inputs), with_loss=labels is not None)
                p = torch.softmax(out.float(), dim=-1)
                probs = p if probs is None else probs + p
        assert probs is not None
        probs = probs / self.mc_samples
        if labels is None:
            return None, (None if prediction_loss_only else probs.clamp_min(1e-12).log()), None
        if type(unwrapped).__name__ in _CAUSAL_LM_NAMES and labels.dim() == 2:
            probs, labels = probs[:, :-1], labels[:, 1:]
        log_probs = probs.clamp_min(1e-12).log()
        flat, flat_labels = log_probs.reshape(-1, log_probs.shape[-1]), labels.reshape(-1)
        keep = flat_labels != -100
        loss = -flat[keep].gather(1, flat_labels[keep, None]).mean()
        if prediction_loss_only:
            return loss, None, None
        return loss, log_probs, labels.contiguous()


def _logits_of(outputs: Any, *, with_loss: bool) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if "logits" not in outputs:
            raise TypeError(
                f"Monte Carlo evaluation needs the model's logits; its output has keys "
                f"{list(outputs.keys())}; pass mc_samples=0 for the Trainer's own evaluation"
            )
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)):  # (loss, logits, ...) when labels were passed
        return outputs[1] if with_loss and len(outputs) > 1 else outputs[0]
    raise TypeError(f"cannot take logits from a model output of type {type(outputs).__name__}")


def mc_metrics(eval_prediction: Any) -> dict[str, float]:
    """Accuracy, NLL and ECE (15 equal-width bins) of Monte Carlo log-probabilities.

    ``eval_prediction`` is the ``transformers.EvalPrediction`` of a :class:`BayesTrainer`
    evaluation: ``predictions`` are ``[..., C]`` log-probabilities, ``label_ids`` the
    matching ``[...]`` labels, ``-100`` marking positions to ignore.

    Example:
        >>> import numpy as np, transformers
        >>> log_probs = np.log(np.array([[0.9, 0.1], [0.2, 0.8]]))
        >>> m = mc_metrics(transformers.EvalPrediction(log_probs, np.array([0, 0])))
        >>> m["accuracy"], round(m["nll"], 4)
        (0.5, 0.8574)
    """
    log_probs = torch.as_tensor(np.asarray(eval_prediction.predictions), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(eval_prediction.label_ids)).long()
    log_probs = log_probs.reshape(-1, log_probs.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != -100
    probs, labels = log_probs[keep].exp(), labels[keep]
    return {
        "accuracy": metrics.accuracy(probs, labels),
        "nll": metrics.nll(probs, labels),
        "ece": metrics.ece(probs, labels),
    }


class BayesTrainer(BayesTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` for converted models (see :class:`BayesTrainerMixin`)."""


class BayesSeq2SeqTrainer(BayesTrainerMixin, transformers.Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` for converted models (see :class:`BayesTrainerMixin`).

    With ``predict_with_generate=True``, evaluation generates as the ``Seq2SeqTrainer``
    does instead of Monte Carlo averaging: every decoding step (one forward pass) draws new
    weights, so a generated sequence mixes posterior samples rather than following one.
    """


# ---------------------------------------------------------------------- save / load
def from_pretrained(directory: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a converted model from its ``save_pretrained`` directory or a ``Trainer`` checkpoint.

    The model class and its config are read from the directory (no download), the
    recorded conversion (``dnn2bnn_config.json``) is replayed, and the weights
    (``model.safetensors``, sharded or not) are loaded strictly. The model is returned in
    eval mode, as ``transformers`` does.

    Raises:
        CheckpointError: the directory has no conversion record or its weights do not fit.

    Example:
        >>> import tempfile, transformers, warnings
        >>> config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                                  num_attention_heads=2, intermediate_size=16)
        >>> with warnings.catch_warnings():  # BERT defeats torch.fx: converted by module tree
        ...     warnings.simplefilter("ignore", dnn2bnn.ConversionWarning)
        ...     bnn = dnn2bnn.transform_to_bnn_model(transformers.BertForSequenceClassification(config))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     bnn.save_pretrained(folder)
        ...     again = from_pretrained(folder)
        >>> torch.equal(again.classifier.weight_rho, bnn.classifier.weight_rho)
        True
    """
    directory = Path(directory)
    record_path = directory / RECORD_NAME
    if not record_path.is_file():
        raise CheckpointError(
            f"{directory} has no {RECORD_NAME}: it was not saved from a dnn2bnn-converted model "
            "(load a deterministic model with transformers' own from_pretrained)"
        )
    record = json.loads(record_path.read_text())
    if record.get("format") != "dnn2bnn-hf" or int(record.get("format_version", 0)) > 1:
        raise CheckpointError(
            f"{record_path}: expected format 'dnn2bnn-hf' version <= 1, got "
            f"{record.get('format')!r} version {record.get('format_version')!r}"
        )
    cls = _import(*record["model_class"].split(":", 1))
    config = cls.config_class.from_pretrained(directory)
    dtype = config_dtype(config)
    model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)  # shown when it was converted
        calls = record.get("calls", [])
        # a record without per-layer parametrizations: its calls meant softplus by default
        model = replay_calls(model, calls if "layers" in record else legacy_calls(calls))
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, BayesianLayer))
    if converted != sorted(record.get("converted", [])):
        raise CheckpointError(
            f"{directory}: replaying the recorded conversion gives Bayesian layers "
            f"{converted[:5]}..., the record lists {sorted(record.get('converted', []))[:5]}..."
        )
    if "layers" in record:
        restore_parametrizations_(model, record["layers"], where=str(record_path))
    state = match_state(
        model, _read_weights(directory), source=str(directory),
        target=f"the converted {cls.__name__}",
    )
    model.load_state_dict(state)
    return model.eval()


def _read_weights(directory: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(directory / shard))
        return state
    legacy = directory / "pytorch_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise CheckpointError(
        f"{directory} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )
