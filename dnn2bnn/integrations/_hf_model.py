"""What a converted Hugging Face ``PreTrainedModel`` needs for its own methods to stay right.

Conversion calls :func:`adopt_pretrained_` on a converted ``PreTrainedModel``. It

- unties weights that the conversion untied (GPT-2's ``lm_head.weight`` and
  ``transformer.wte.weight``): the Bayesian head has its own posterior mean, so the
  config's ``tie_word_embeddings`` is set to ``False`` and ``tie_weights()`` is a no-op
  instead of ``KeyError: "attribute 'weight' already exists"``;
- swaps the model's class for a subclass (same name, same ``forward``) whose
  ``save_pretrained`` also writes the conversion record ``dnn2bnn_config.json`` that
  :func:`dnn2bnn.integrations.transformers.from_pretrained` replays, whose
  ``resize_token_embeddings`` resizes a Bayesian output head (posterior means, ``rho`` and
  prior together) instead of replacing it with a plain ``nn.Linear``, and whose
  ``tie_weights`` raises, naming the layer, when asked to tie a Bayesian parameter.

This module imports ``transformers`` lazily (only through the model it is given).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from dnn2bnn._version import __version__
from dnn2bnn.checkpoint._bnn import bnn_metadata
from dnn2bnn.checkpoint._rebuild import layer_states
from dnn2bnn.layers._base import BayesianLayer, is_bayesian_layer

__all__ = [
    "RECORD_NAME",
    "adopt_pretrained_",
    "bayesian_pretrained_class",
    "config_dtype",
    "write_record",
]

#: File that ``save_pretrained`` of a converted model writes next to ``config.json``.
RECORD_NAME = "dnn2bnn_config.json"


def config_dtype(config: Any) -> Any:
    """The ``torch.dtype`` a Hugging Face config records (a string or a dtype), else ``None``."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def adopt_pretrained_(model: nn.Module) -> None:
    """Untie what the conversion untied and swap in the Bayesian model class, in place."""
    _untie_bayesian_(model)
    cls = type(model)
    if "_dnn2bnn_hf_base" not in cls.__dict__:
        model.__class__ = bayesian_pretrained_class(cls)


def bayesian_tied_pairs(model: nn.Module) -> list[tuple[str, str, str]]:
    """``(target, source, bayesian_layer_name)`` for tied parameter pairs that touch a Bayesian layer."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is None:  # transformers < 5: tying goes through get_output_embeddings
        return _legacy_tied_pairs(model)
    found = []
    for target, source in expand(all_submodels=True).items():
        for name in (target, source):
            owner = _bayesian_owner(model, name)
            if owner is not None:
                found.append((target, source, owner))
                break
    return found


def _legacy_tied_pairs(model: nn.Module) -> list[tuple[str, str, str]]:
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not is_bayesian_layer(head):
        return []
    name = next(n for n, m in model.named_modules() if m is head)
    return [(f"{name}.weight", "<input embeddings>.weight", name)]


def _bayesian_owner(model: nn.Module, param_name: str) -> str | None:
    """The name of the Bayesian layer that holds ``param_name`` as a Bayesian parameter."""
    prefix, _, leaf = param_name.rpartition(".")
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        return None
    if not is_bayesian_layer(module):
        return None
    # the sampled parameter itself, or (when Transformers expands its tie patterns against
    # the parameter names) its weight_mu / weight_rho / weight_prior_* tensors
    for name in getattr(module, "bayes_params", ("weight", "bias")):
        if leaf == name or leaf.startswith(name + "_"):
            return prefix
    return None


def _untie_bayesian_(model: nn.Module) -> None:
    if not bayesian_tied_pairs(model):
        return
    import transformers

    for sub in model.modules():
        if isinstance(sub, transformers.PreTrainedModel) and getattr(
            sub.config, "tie_word_embeddings", False
        ):
            sub.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


class BayesianPreTrainedMixin:
    """Methods of a converted ``PreTrainedModel`` that must know about its Bayesian layers."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained``, plus the conversion record ``dnn2bnn_config.json``.

        Load the directory with :func:`dnn2bnn.integrations.transformers.from_pretrained`:
        the class's own ``from_pretrained`` would re-initialise every converted weight.
        """
        result = super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        is_main = kwargs.get("is_main_process", args[0] if args else True)
        if is_main:
            write_record(self, Path(save_directory))  # type: ignore[arg-type]
        return result

    def tie_weights(self, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.tie_weights``; raises ``ValueError`` if a Bayesian parameter would be tied."""
        pairs = bayesian_tied_pairs(self)  # type: ignore[arg-type]
        if pairs:
            target, source, owner = pairs[0]
            layer = self.get_submodule(owner)  # type: ignore[attr-defined]
            raise ValueError(
                f"{type(self).__name__}.tie_weights: {target} would be tied to {source}, but "
                f"{owner} ({type(layer).__name__}) is a Bayesian layer whose weight is drawn from "
                "its posterior (weight_mu, weight_rho); dnn2bnn untied them at conversion. Set "
                "config.tie_word_embeddings = False again, or tie the deterministic model "
                "(dnn2bnn.to_dnn) before converting"
            )
        return super().tie_weights(*args, **kwargs)  # type: ignore[misc]

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.resize_token_embeddings`` that keeps a Bayesian output head Bayesian.

        The head's posterior means are resized as Hugging Face resizes a plain head (new
        rows from ``mean_resizing``); the ``rho`` and prior rows of the kept tokens are
        kept, new tokens get the layer's initial ``rho`` and prior. Bayesian input
        embeddings are refused with ``TypeError``.
        """
        embeddings = self.get_input_embeddings()  # type: ignore[attr-defined]
        if embeddings is not None and is_bayesian_layer(embeddings):
            raise TypeError(
                f"{type(self).__name__}.resize_token_embeddings: the input embeddings "
                f"{_name_of(self, embeddings)} ({type(embeddings).__name__}) are a Bayesian layer; "
                "resizing them is not supported: resize the deterministic model before converting"
            )
        head = self.get_output_embeddings()  # type: ignore[attr-defined]
        if head is None or not is_bayesian_layer(head):
            return super().resize_token_embeddings(*args, **kwargs)  # type: ignore[misc]
        if not isinstance(head, BayesianLayer) or not isinstance(head, nn.Linear):
            raise TypeError(
                f"{type(self).__name__}.resize_token_embeddings: the output head "
                f"{_name_of(self, head)} ({type(head).__name__}) is a Bayesian layer that is not "
                "a BayesLinear; resizing it is not supported: resize the deterministic model "
                "before converting"
            )
        path = _name_of(self, head)  # type: ignore[arg-type]
        self.set_output_embeddings(head.to_dnn())  # type: ignore[attr-defined]
        try:
            result = super().resize_token_embeddings(*args, **kwargs)  # type: ignore[misc]
            resized = _resized_bayesian_head(head, self.get_output_embeddings())  # type: ignore[attr-defined]
        except BaseException:
            _replace(self, path, head)  # type: ignore[arg-type]
            raise
        # not set_output_embeddings: some models (BERT MLM) also assign the head's bias,
        # which on a Bayesian layer is a sample, to a parameter of theirs
        _replace(self, path, resized)  # type: ignore[arg-type]
        return result

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A class made by bayesian_pretrained_class() cannot be found by name: rebuild it.
        return (_new_instance, (type(self)._dnn2bnn_hf_base,), self.__getstate__())  # type: ignore[attr-defined]


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_name), name, module)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), "<unknown>")


def _resized_bayesian_head(old: BayesianLayer, plain: nn.Module) -> BayesianLayer:
    """``old`` rebuilt around the resized deterministic head ``plain`` (its posterior means)."""
    new = type(old).from_dnn(plain, config=old.bayes_config)
    new.bayes_mode = old.bayes_mode
    keep = min(old.weight_mu.shape[0], new.weight_mu.shape[0])
    for store_old, store_new in ((old._parameters, new._parameters), (old._buffers, new._buffers)):
        for key, value in store_old.items():
            if key.endswith("_mu") and store_old is old._parameters:
                continue  # the means come from the resized plain head
            target = store_new.get(key)
            if value is None or target is None:
                continue
            if value.dim() and target.dim() and value.shape[1:] == target.shape[1:]:
                target.data[:keep] = value.data[:keep]
            elif value.shape == target.shape:
                target.data.copy_(value.data)
    return new


@functools.lru_cache(maxsize=None)
def bayesian_pretrained_class(cls: type) -> type:
    """The class a converted ``cls`` instance gets: ``cls`` with :class:`BayesianPreTrainedMixin`.

    It keeps ``cls``'s name (Hugging Face reads class names, e.g. for ``architectures``).
    """
    namespace = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_dnn2bnn_hf_base": cls,
        "config_class": getattr(cls, "config_class", None),
    }
    return type(cls.__name__, (BayesianPreTrainedMixin, cls), namespace)


def _new_instance(base: type) -> nn.Module:
    cls = bayesian_pretrained_class(base)
    return cls.__new__(cls)


def write_record(model: nn.Module, directory: Path) -> None:
    """Write (or remove, for a model without Bayesian layers) ``directory/dnn2bnn_config.json``."""
    path = directory / RECORD_NAME
    if not any(isinstance(m, BayesianLayer) for m in model.modules()):
        path.unlink(missing_ok=True)
        return
    base = type(model).__dict__.get("_dnn2bnn_hf_base", type(model))
    record = {
        "format": "dnn2bnn-hf",
        "format_version": 1,
        "dnn2bnn_version": __version__,
        "model_class": f"{base.__module__}:{base.__qualname__}",
        **{k: v for k, v in bnn_metadata(model, arch=None, arch_kwargs=None).items()
           if k in ("calls", "converted")},
        # how each layer reads rho (the default changed in issue 17; none recorded: softplus)
        "layers": {
            name: {"parametrization": state["parametrization"]}
            for name, state in layer_states(model).items()
            if "parametrization" in state
        },
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
