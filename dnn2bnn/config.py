"""Typed configuration of Bayesian layers: prior, posterior initialisation, estimator.

One frozen :class:`BayesConfig` describes a layer. A :class:`BayesConfigMapping` assigns
configurations globally, by module type and by qualified module name (glob), with the
priority **name > type > global**, like PyTorch's ``QConfigMapping``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from dnn2bnn.priors import PRIOR_TYPES, NormalPrior, Prior, _check_finite, _check_positive

__all__ = [
    "BayesConfig",
    "BayesConfigMapping",
    "Estimator",
    "OPTION_NAMES",
    "Parametrization",
    "enum_value",
]


def enum_value(cls: type[Enum], value: Any, name: str) -> Any:
    """``cls(value)``, or a ``ValueError`` naming ``name``, the allowed values and ``value``."""
    try:
        return cls(value)
    except ValueError as exc:
        raise ValueError(f"{name} must be one of {[m.value for m in cls]}, got {value!r}") from exc


class Estimator(str, Enum):
    """How a Bayesian layer turns its weight posterior into outputs during sampling.

    * ``"reparam"``: one weight sample per forward call, shared by the batch
      (Blundell et al. 2015). Works for every layer, including user subclasses with their
      own ``forward``.
    * ``"flipout"``: pseudo-independent perturbations per example by random sign flips
      (Wen et al. 2018); lower gradient variance, about twice the matrix products.
    * ``"lrt"``: local reparameterization (Kingma et al. 2015): pre-activations sampled
      from ``N(op(x, mu), op(x^2, sigma^2))``; lower gradient variance, no weight sample.

    All three share parameters, KL, state_dict layout and "mean" mode.
    """

    REPARAM = "reparam"
    FLIPOUT = "flipout"
    LRT = "lrt"


class Parametrization(str, Enum):
    """How a Bayesian layer's ``<param>_rho`` maps to the posterior standard deviation.

    * ``"exp"`` (the default since issue 17): ``sigma = exp(rho)`` (log-sigma): no
      softplus in the forward, no sigmoid in the backward and no log in the KL; the same
      family of posteriors.
    * ``"softplus"``: ``sigma = log(1 + exp(rho))``, the default before; the meaning of
      ``*_rho`` in every checkpoint and state_dict that records no parametrization (they
      still load as softplus).
    """

    SOFTPLUS = "softplus"
    EXP = "exp"


@dataclass(frozen=True)
class BayesConfig:
    """Configuration of one Bayesian layer.

    Args:
        prior: a :class:`~dnn2bnn.NormalPrior`, :class:`~dnn2bnn.ScaleMixturePrior` or
            :class:`~dnn2bnn.EmpiricalPrior`.
        posterior_sigma_init: initial posterior standard deviation of every weight (> 0).
        moped_delta: if set, MOPED initialisation ``sigma = moped_delta * |w|`` per weight
            (floored at 1e-8) instead of ``posterior_sigma_init``.
        estimator: ``"reparam"``, ``"flipout"`` or ``"lrt"`` (an :class:`Estimator`).
        parametrization: ``"exp"`` (default, ``sigma = exp(rho)``) or ``"softplus"``
            (``sigma = softplus(rho)``, the default before issue 17), a
            :class:`Parametrization`: how ``*_rho`` maps to sigma.

    Example:
        >>> cfg = BayesConfig(estimator="flipout", prior=dnn2bnn.NormalPrior(0.0, 0.1))
        >>> cfg.estimator
        <Estimator.FLIPOUT: 'flipout'>
    """

    prior: Prior = field(default_factory=NormalPrior)
    posterior_sigma_init: float = 1e-3
    moped_delta: float | None = None
    estimator: Estimator = Estimator.REPARAM
    parametrization: Parametrization = Parametrization.EXP

    def __post_init__(self) -> None:
        if not isinstance(self.prior, PRIOR_TYPES):
            raise TypeError(
                "prior must be one of "
                f"{[t.__name__ for t in PRIOR_TYPES]}, got {type(self.prior).__name__} {self.prior!r}"
            )
        sigma = _real("posterior_sigma_init", self.posterior_sigma_init)
        _check_positive("posterior_sigma_init", sigma)
        object.__setattr__(self, "posterior_sigma_init", sigma)
        if self.moped_delta is not None:
            delta = _real("moped_delta", self.moped_delta)
            _check_positive("moped_delta", delta)
            object.__setattr__(self, "moped_delta", delta)
        object.__setattr__(self, "estimator", enum_value(Estimator, self.estimator, "estimator"))
        object.__setattr__(
            self, "parametrization", enum_value(Parametrization, self.parametrization, "parametrization")
        )

    @classmethod
    def from_options(cls, base: BayesConfig | None = None, **options: Any) -> BayesConfig:
        """``base`` (default: the defaults) updated by keyword shortcuts.

        Shortcuts are the fields of :class:`BayesConfig` plus ``prior_mean``/``prior_sigma``,
        which build a :class:`~dnn2bnn.NormalPrior` (they cannot be combined with ``prior``).
        Unknown keys raise ``TypeError`` naming the key.
        """
        for key in options:
            if key not in OPTION_NAMES:
                raise TypeError(
                    f"unknown Bayesian option {key!r}; expected one of {list(OPTION_NAMES)}"
                )
        base = base if base is not None else cls()
        changes = {k: v for k, v in options.items() if k not in ("prior_mean", "prior_sigma")}
        if "prior_mean" in options or "prior_sigma" in options:
            if "prior" in options:
                raise TypeError("pass either prior= or prior_mean=/prior_sigma=, not both")
            old = base.prior if isinstance(base.prior, NormalPrior) else NormalPrior()
            mean = _real("prior_mean", options["prior_mean"]) if "prior_mean" in options else old.mean
            sigma = (
                _real("prior_sigma", options["prior_sigma"]) if "prior_sigma" in options else old.sigma
            )
            changes["prior"] = NormalPrior(mean, sigma)  # it checks sigma > 0
        return dataclasses.replace(base, **changes) if changes else base


#: Keyword shortcuts accepted by the layers, ``from_dnn`` and ``transform_to_bnn_model``.
OPTION_NAMES = (
    "prior",
    "prior_mean",
    "prior_sigma",
    "posterior_sigma_init",
    "moped_delta",
    "estimator",
    "parametrization",
)


class BayesConfigMapping:
    """Which :class:`BayesConfig` each layer of a model gets.

    Priority: a qualified-name pattern beats a module type, which beats the global
    configuration. Name patterns are ``fnmatch`` globs matched against the module's
    qualified name and its ancestors' (``"layer4"`` covers ``"layer4.0.conv1"``); when
    several match, the one naming the deepest module wins, then the one set last. Types
    match subclasses; the nearest class in the MRO wins. A configuration of ``None``
    leaves matching layers deterministic. Setters return the mapping, so calls chain.

    Example:
        >>> cfg = (BayesConfigMapping()
        ...        .set_global(BayesConfig(estimator="flipout"))
        ...        .set_module_type(torch.nn.Conv2d, BayesConfig(estimator="lrt"))
        ...        .set_module_name("fc", None))
        >>> cfg.config_for("layer1.conv", torch.nn.Conv2d).estimator.value
        'lrt'
        >>> cfg.config_for("fc", torch.nn.Linear) is None
        True
    """

    def __init__(self, global_config: BayesConfig | None = None) -> None:
        self.global_config: BayesConfig | None = global_config or BayesConfig()
        self.type_configs: dict[type[nn.Module], BayesConfig | None] = {}
        self.name_configs: dict[str, BayesConfig | None] = {}

    def set_global(self, config: BayesConfig | None) -> BayesConfigMapping:
        """Set the configuration of layers matched by no type and no name."""
        self.global_config = _check_config("set_global", config)
        return self

    def set_module_type(
        self, module_type: type[nn.Module], config: BayesConfig | None
    ) -> BayesConfigMapping:
        """Set the configuration of layers of ``module_type`` (or a subclass)."""
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(
                f"set_module_type: module_type must be an nn.Module subclass, got {module_type!r}"
            )
        self.type_configs[module_type] = _check_config("set_module_type", config)
        return self

    def set_module_name(self, pattern: str, config: BayesConfig | None) -> BayesConfigMapping:
        """Set the configuration of modules whose qualified name matches the glob ``pattern``."""
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"set_module_name: pattern must be a non-empty string, got {pattern!r}")
        self.name_configs.pop(pattern, None)  # re-setting a pattern makes it the latest
        self.name_configs[pattern] = _check_config("set_module_name", config)
        return self

    def config_for(self, name: str | list[str], module_type: type) -> BayesConfig | None:
        """The configuration of a module with qualified name(s) ``name`` and type ``module_type``."""
        names = [name] if isinstance(name, str) else list(name)
        best: tuple[int, int] | None = None
        chosen: BayesConfig | None = None
        for order, (pattern, config) in enumerate(self.name_configs.items()):
            depth = max((_match_depth(n, pattern) for n in names), default=-1)
            if depth >= 0 and (best is None or (depth, order) >= best):
                best, chosen = (depth, order), config
        if best is not None:
            return chosen
        for klass in module_type.__mro__:
            if klass in self.type_configs:
                return self.type_configs[klass]
        return self.global_config

    def unmatched_patterns(self, names: list[str]) -> list[str]:
        """The name patterns that match none of ``names``."""
        return [p for p in self.name_configs if not any(_match_depth(n, p) >= 0 for n in names)]

    def __repr__(self) -> str:
        return (
            f"BayesConfigMapping(global={self.global_config}, types={len(self.type_configs)}, "
            f"names={list(self.name_configs)})"
        )


def _real(name: str, value: Any) -> float:
    """``value`` as a Python float: a real number, a numpy scalar or a 0-d real tensor.

    Raises ``TypeError`` for anything else (bools and strings included) and ``ValueError``
    for NaN or infinity.
    """
    number: Any = value
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"{name} must be a real number or a 0-d real tensor, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        number = value.item()
    elif (
        isinstance(value, bool)
        or type(value).__name__ == "bool_"
        or not isinstance(value, numbers.Real)
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    result = float(number)
    _check_finite(name, result)
    return result


def _check_config(where: str, config: Any) -> BayesConfig | None:
    if config is not None and not isinstance(config, BayesConfig):
        raise TypeError(f"{where}: expected a BayesConfig or None, got {type(config).__name__}")
    return config


def _match_depth(name: str, pattern: str) -> int:
    """Depth of the deepest prefix of ``name`` matching ``pattern`` (-1 if none)."""
    parts = name.split(".") if name else [""]
    for depth in range(len(parts), 0, -1):
        if fnmatch.fnmatchcase(".".join(parts[:depth]), pattern):
            return depth
    return -1
