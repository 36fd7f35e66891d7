"""PyTorch Lightning: train a converted network with the ELBO, evaluate it with Monte Carlo predictions.

Importing this module imports ``lightning`` (``pip install lightning``), or
``pytorch_lightning`` when only that is installed; importing :mod:`dnn2bnn` imports neither.

:class:`BayesLightningModule` wraps a converted network: its training step minimises the
per-example negative ELBO ``loss_fn(model(x), y) + KL / num_train_examples`` and logs
``train/loss``, ``train/data_loss`` and ``train/kl``; validation and test steps average the
softmax over ``mc_samples`` posterior samples and log ``val/accuracy``, ``val/nll`` and
``val/ece`` (``test/...``) over the whole epoch, gathered across processes; the optimizer
gives the ``rho`` parameters their own learning rate (:func:`dnn2bnn.bayes_param_groups`).
Lightning's own strategies (DDP included) apply unchanged: ``num_train_examples`` is the
size of the whole training set, not of one process's shard.

Users of the other package name (``pytorch_lightning`` next to ``lightning``) combine
:class:`BayesLightningMixin` with their ``LightningModule``:
``class Module(BayesLightningMixin, pytorch_lightning.LightningModule)``.

Example:
    >>> from dnn2bnn.integrations.lightning import BayesLightningModule
    >>> bnn = dnn2bnn.transform_to_bnn_model(torch.nn.Linear(4, 3))
    >>> module = BayesLightningModule(bnn, num_train_examples=1000, lr=1e-3)
    >>> [(g["name"], g["lr"]) for g in module.configure_optimizers().param_groups]
    [('means', 0.001), ('rho', 0.01)]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dnn2bnn import metrics
from dnn2bnn.layers._base import is_bayesian_layer
from dnn2bnn.loss import check_num_train_examples, kl_divergence
from dnn2bnn.modes import set_mode
from dnn2bnn.recipe import bayes_param_groups

try:
    import lightning.pytorch as pl
except ImportError:  # only the older package name is installed
    import pytorch_lightning as pl  # type: ignore[no-redef]

__all__ = ["BayesLightningMixin", "BayesLightningModule", "pl"]


class BayesLightningMixin:
    """The ELBO training, Monte Carlo evaluation and optimizer of :class:`BayesLightningModule`.

    Needs ``self.model`` (the converted network), ``self.loss_fn``, ``self.mc_samples``,
    ``self.lr``, ``self.rho_lr``, ``self.optimizer_cls`` and ``self._num_train_examples``
    (set by :meth:`setup_bayes`), and a ``LightningModule`` after it in the bases.
    """

    def setup_bayes(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
        *,
        num_train_examples: int | None = None,
        lr: float = 1e-3,
        rho_lr: float | None = None,
        mc_samples: int = 8,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    ) -> None:
        """Store the options (see :class:`BayesLightningModule` for their meaning)."""
        if not isinstance(model, nn.Module) or not any(is_bayesian_layer(m) for m in model.modules()):
            raise TypeError(
                f"{type(self).__name__}: expected a network converted by "
                f"dnn2bnn.transform_to_bnn_model, got {type(model).__name__} without Bayesian layer"
            )
        if num_train_examples is not None:
            num_train_examples = check_num_train_examples(num_train_examples)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples!r}")
        self.model = model
        self.loss_fn = _cross_entropy if loss_fn is None else loss_fn
        self._num_train_examples = num_train_examples
        self._found_num_train_examples: int | None = None  # from the first training batch on
        self.lr, self.rho_lr, self.mc_samples = lr, rho_lr, mc_samples
        self.optimizer_cls = optimizer_cls
        self._outputs: dict[str, list[tuple[Tensor, Tensor]]] = {"val": [], "test": []}

    # ------------------------------------------------------------------ the ELBO
    @property
    def num_train_examples(self) -> int:
        """``N`` of the KL weight: the given number, else the training dataset's length."""
        if self._num_train_examples is not None:
            return self._num_train_examples
        if self._found_num_train_examples is not None:
            return self._found_num_train_examples
        trainer = getattr(self, "_trainer", None)
        loader = getattr(trainer, "train_dataloader", None) if trainer is not None else None
        dataset = getattr(loader, "dataset", None)
        try:
            self._found_num_train_examples = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"{type(self).__name__}: cannot take num_train_examples from the training "
                f"data ({type(dataset).__name__} has no length); pass num_train_examples="
            ) from None
        return self._found_num_train_examples

    def on_fit_start(self) -> None:
        self._found_num_train_examples = None  # a new fit may train on other data

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def elbo_loss(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, data_loss, kl)`` of a batch: ``loss = data_loss + kl / num_train_examples``."""
        inputs, target = _split(batch)
        data_loss = self.loss_fn(_call(self.model, inputs), target)
        kl = kl_divergence(self.model)
        return data_loss + kl.to(data_loss.dtype) / self.num_train_examples, data_loss, kl

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The :meth:`elbo_loss`, logged as ``train/loss``, ``train/data_loss`` and ``train/kl``."""
        loss, data_loss, kl = self.elbo_loss(batch)
        batch_size = len(_split(batch)[1])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)  # type: ignore[attr-defined]
        self.log("train/data_loss", data_loss.detach(), batch_size=batch_size)  # type: ignore[attr-defined]
        self.log("train/kl", kl.detach(), batch_size=batch_size)  # type: ignore[attr-defined]
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """``optimizer_cls`` over :func:`dnn2bnn.bayes_param_groups` (``rho`` at ``rho_lr``)."""
        return self.optimizer_cls(bayes_param_groups(self.model, lr=self.lr, rho_lr=self.rho_lr))

    # ------------------------------------------------------------------ Monte Carlo evaluation
    def mc_probs(self, inputs: Any) -> Tensor:
        """Mean softmax over ``mc_samples`` forward passes with sampled weights."""
        with torch.no_grad(), set_mode(self.model, "sample"):
            total = None
            for _ in range(self.mc_samples):
                p = torch.softmax(_logits(_call(self.model, inputs)).float(), dim=-1)
                total = p if total is None else total + p
        assert total is not None
        return total / self.mc_samples

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, target = _split(batch)
        _check_class_target(self, target, "validation_step")
        self._outputs["val"].append((self.mc_probs(inputs), target))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        inputs, target = _split(batch)
        _check_class_target(self, target, "test_step")
        self._outputs["test"].append((self.mc_probs(inputs), target))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, _ = _split(batch) if _has_target(batch) else (batch, None)
        return self.mc_probs(inputs)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, stage: str) -> None:
        outputs, self._outputs[stage] = self._outputs[stage], []
        if not outputs:
            return
        probs = torch.cat([p for p, _ in outputs])
        labels = torch.cat([t for _, t in outputs])
        # every process's predictions (DistributedSampler pads the shards to one size)
        probs = self.all_gather(probs).reshape(-1, probs.shape[-1])  # type: ignore[attr-defined]
        labels = self.all_gather(labels).reshape(-1)  # type: ignore[attr-defined]
        for name, fn in (("accuracy", metrics.accuracy), ("nll", metrics.nll), ("ece", metrics.ece)):
            # the same value on every process (gathered above): syncing averages equal numbers
            self.log(f"{stage}/{name}", fn(probs, labels), sync_dist=True)  # type: ignore[attr-defined]


class BayesLightningModule(BayesLightningMixin, pl.LightningModule):
    """A ``LightningModule`` that trains a converted network with the ELBO.

    Batches are ``(inputs, target)`` pairs (``inputs`` a tensor, tuple or dict of keyword
    inputs) or dicts with a ``"labels"`` entry and the model's keyword inputs. The model's
    output is a tensor of logits, or has ``.logits`` / ``["logits"]`` (Hugging Face).

    Args:
        model: a network converted by :func:`dnn2bnn.transform_to_bnn_model`.
        loss_fn: mean-reduced data loss ``loss_fn(output, target)``; default cross-entropy
            of the output's logits.
        num_train_examples: ``N`` in ``KL / N``; default the length of the training
            dataset (all of it, also under DDP).
        lr: learning rate of the posterior means and deterministic parameters.
        rho_lr: learning rate of the ``rho`` parameters (default ``10 * lr``).
        mc_samples: posterior samples averaged by the validation, test and predict steps.
        optimizer_cls: a ``torch.optim`` optimizer class.

    A checkpoint holds ``model.*`` weights: reload it with
    ``BayesLightningModule.load_from_checkpoint(path, model=converted_net)`` where
    ``converted_net`` is the same network converted again (or from
    :func:`dnn2bnn.load_bnn`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
        *,
        num_train_examples: int | None = None,
        lr: float = 1e-3,
        rho_lr: float | None = None,
        mc_samples: int = 8,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    ) -> None:
        super().__init__()
        self.setup_bayes(
            model, loss_fn, num_train_examples=num_train_examples, lr=lr, rho_lr=rho_lr,
            mc_samples=mc_samples, optimizer_cls=optimizer_cls,
        )
        self.save_hyperparameters(ignore=["model", "loss_fn", "optimizer_cls"])


def _check_class_target(module: Any, target: Any, step: str) -> None:
    if isinstance(target, Tensor) and (target.is_floating_point() or target.is_complex()):
        raise TypeError(
            f"{type(module).__name__}.{step}: the Monte Carlo metrics (accuracy, NLL, ECE of the "
            f"mean softmax) need integer class targets, got {target.dtype}; for regression or "
            "multi-label targets override the step, e.g. with dnn2bnn.predict(self.model, x, "
            'task="regression")'
        )


def _cross_entropy(output: Any, target: Tensor) -> Tensor:
    return F.cross_entropy(_logits(output), target)


def _has_target(batch: Any) -> bool:
    if isinstance(batch, Mapping):
        return "labels" in batch
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def _split(batch: Any) -> tuple[Any, Tensor]:
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(f"a dict batch needs a 'labels' entry, got keys {list(batch.keys())}")
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        "expected a batch (inputs, target) or a dict with 'labels', got "
        f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"expected class logits from the model (a tensor, or an output with .logits), got "
        f"{type(output).__name__}; make the model return its logits (Hugging Face: "
        "return_dict=True), or wrap it in a module that picks them"
        + (f" (the output has {len(output)} elements)" if isinstance(output, (tuple, list)) else "")
    )
