"""Architecture specs: how to rebuild a model's Python object from a short string.

``torchvision:resnet18`` (built with ``weights=None``: nothing is downloaded),
``timm:resnet18`` (``pretrained=False``), ``transformers:GPT2LMHeadModel`` (built from the
``config`` keyword, a config dict, without weights), ``dnn2bnn:module_tree`` (a recorded
``nn.Sequential``/``ModuleList``/``ModuleDict`` tree, see :mod:`._tree`), or an import path
``package.module:callable`` (a class or a factory function). Keyword arguments come from a
JSON object.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import typing
from typing import Any

from torch import nn

from dnn2bnn.errors import CheckpointError

__all__ = [
    "build_arch",
    "guess_timm",
    "guess_torchvision",
    "module_class",
    "origin_class",
    "spec_of",
]

_FORMS = "torchvision:NAME, timm:NAME, transformers:NAME or package.module:callable"


def build_arch(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the (untrained) model named by ``spec`` with keyword arguments ``kwargs``.

    Raises:
        CheckpointError: the spec is malformed, names nothing, or the call fails.

    Example:
        >>> build_arch("torch.nn:Linear", {"in_features": 3, "out_features": 2})
        Linear(in_features=3, out_features=2, bias=True)
    """
    kwargs = dict(kwargs or {})
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise CheckpointError(f"architecture spec {spec!r} is malformed; expected {_FORMS}")
    if source == "torchvision":
        factory, label = _torchvision(name), f"torchvision model {name!r}"
        kwargs.setdefault("weights", None)
    elif source == "timm":
        factory, label = _timm(name), f"timm model {name!r}"
        kwargs.setdefault("pretrained", False)
    elif source == "transformers":
        factory, label = _module_factory("transformers", name), f"transformers model {name!r}"
    elif spec == "dnn2bnn:module_tree":
        from dnn2bnn.checkpoint._tree import build_tree

        factory, label = build_tree, "the recorded module tree"
    else:
        factory, label = _module_factory(source, name), spec
    config_class = getattr(factory, "config_class", None)
    if isinstance(kwargs.get("config"), dict) and isinstance(config_class, type):
        # a Hugging Face PreTrainedModel: its config was recorded as config.to_dict()
        try:
            kwargs["config"] = config_class.from_dict(kwargs["config"])
        except Exception as exc:
            raise CheckpointError(
                f"building the {config_class.__qualname__} of {label} failed: {exc}"
            ) from exc
    try:
        model = factory(**kwargs)
    except CheckpointError:
        raise
    except Exception as exc:
        shown = f"{kwargs}"[:300]
        raise CheckpointError(f"building {label} with {shown} failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"{spec} returned {type(model).__qualname__}; expected a torch.nn.Module"
        )
    return model


def origin_class(model: nn.Module) -> type[nn.Module]:
    """The class ``model`` had before conversion (a Bayesian layer's ``dnn_type``)."""
    from dnn2bnn.layers import BayesianLayer

    if isinstance(model, BayesianLayer):
        return type(model).dnn_type
    # a converted Hugging Face model's class is a same-named subclass of its own class
    hf_base = type(model).__dict__.get("_dnn2bnn_hf_base")
    return hf_base if isinstance(hf_base, type) else type(model)


def spec_of(model: nn.Module) -> str:
    """The import-path spec of ``model``'s class before conversion (``package.module:Class``).

    A Hugging Face model class exported by ``transformers`` is named ``transformers:Class``.
    """
    cls = origin_class(model)
    if cls.__module__.startswith("transformers."):
        import transformers

        if getattr(transformers, cls.__name__, None) is cls:
            return f"transformers:{cls.__name__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise CheckpointError(
            f"{cls.__qualname__} is defined in a script or a function, so it cannot be "
            "imported to rebuild the model; move it into an importable module or pass arch="
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def guess_torchvision(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """The ``torchvision:NAME`` spec and kwargs that build ``model``'s architecture, if any.

    The candidates are the torchvision builders annotated to return ``model``'s class; each
    is built on the meta device without arguments, then with ``num_classes`` read from the
    last 2-d weight, and the first whose state_dict keys and shapes equal ``model``'s wins.
    """
    cls = origin_class(model)
    if not cls.__module__.startswith("torchvision.models"):
        return None
    import inspect

    import torch
    import torchvision

    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    matrices = [shape for shape in state.values() if len(shape) == 2]
    attempts: list[dict[str, Any]] = [{}]
    if matrices:
        attempts.append({"num_classes": matrices[-1][0]})
    for name in torchvision.models.list_models():
        builder = torchvision.models.get_model_builder(name)
        if inspect.signature(builder).return_annotation is not cls:
            continue
        for kwargs in attempts:
            try:
                with torch.device("meta"):
                    candidate = builder(weights=None, **kwargs)
            except Exception:  # a builder that refuses these kwargs is not the one
                continue
            if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == state:
                return f"torchvision:{name}", kwargs
    return None


def guess_timm(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """``timm:NAME`` and kwargs from a timm model's ``pretrained_cfg``, if they rebuild it.

    timm models remember their registry name (``pretrained_cfg["architecture"]``); the
    candidate is built on the meta device without arguments, then with ``num_classes``, and
    accepted only when its state_dict keys and shapes equal ``model``'s.
    """
    if not origin_class(model).__module__.startswith("timm.") or importlib.util.find_spec(
        "timm"
    ) is None:
        return None
    import torch
    import timm

    config = getattr(model, "pretrained_cfg", None) or {}
    name = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(name, str) or not timm.is_model(name):
        return None
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    attempts: list[dict[str, Any]] = [{}]
    if isinstance(getattr(model, "num_classes", None), int):
        attempts.append({"num_classes": model.num_classes})
    for kwargs in attempts:
        try:
            with torch.device("meta"):
                candidate = timm.create_model(name, pretrained=False, **kwargs)
        except Exception:  # these kwargs do not build it
            continue
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == state:
            return f"timm:{name}", kwargs
    return None


def _torchvision(name: str) -> Any:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise CheckpointError(f"unknown torchvision model {name!r}{_close(name, known)}")
    return lambda **kw: torchvision.models.get_model(name, **kw)


def _timm(name: str) -> Any:
    if importlib.util.find_spec("timm") is None:
        raise CheckpointError(f"timm:{name} needs the timm package (pip install timm)")
    import timm

    if not timm.is_model(name):
        raise CheckpointError(f"unknown timm model {name!r}{_close(name, timm.list_models())}")
    return lambda **kw: timm.create_model(name, **kw)


def _import(module_name: str, qualname: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(
            f"cannot import {module_name!r} for architecture {module_name}:{qualname} ({exc}); "
            f"expected {_FORMS} with the module on the Python path"
        ) from exc
    target: Any = module
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CheckpointError(
                f"module {module_name!r} has no attribute {qualname!r}"
                f"{_close(part, [n for n in dir(target) if not n.startswith('_')])}"
            ) from None
    if not callable(target):
        raise CheckpointError(f"{module_name}:{qualname} is not callable")
    return target


def module_class(module_name: str, qualname: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass at ``module_name:qualname``; anything else is refused."""
    target = _import(module_name, qualname)
    if not (isinstance(target, type) and issubclass(target, nn.Module)):
        raise CheckpointError(
            f"{module_name}:{qualname} is {_kind(target)}, not a torch.nn.Module class"
        )
    return target


def _module_factory(module_name: str, qualname: str) -> Any:
    """A class or function that a checkpoint may name to build its architecture.

    Only ``nn.Module`` subclasses and functions annotated to return one are called: the
    name comes from a file, and a file must not make dnn2bnn call an arbitrary function
    (``subprocess:run``, ``os:system``).
    """
    target = _import(module_name, qualname)
    if isinstance(target, type) and issubclass(target, nn.Module):
        return target
    if inspect.isfunction(target):
        try:
            returns = typing.get_type_hints(target).get("return")
        except Exception:  # unresolvable annotations: treated as none
            returns = None
        if isinstance(returns, type) and issubclass(returns, nn.Module):
            return target
    raise CheckpointError(
        f"{module_name}:{qualname} is {_kind(target)}, not a torch.nn.Module class or a "
        "function annotated to return one (def build(...) -> nn.Module); an architecture "
        "named in a checkpoint is only called if it is one of these"
    )


def _kind(target: Any) -> str:
    if isinstance(target, type):
        return f"the class {target.__qualname__}"
    return f"a {type(target).__name__}"


def _close(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
