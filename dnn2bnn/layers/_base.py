"""The Bayesian layer protocol and the mixin every built-in Bayesian layer shares.

A Bayesian layer *is* the torch.nn layer it replaces (``BayesLinear`` subclasses
``nn.Linear``): it inherits the constructor, the argument checks and the ``forward`` of
its parent. What changes is where ``weight`` and ``bias`` come from. The trained
tensors become the posterior means ``weight_mu``/``bias_mu``, next to ``weight_rho``/
``bias_rho`` with ``sigma = softplus(rho)``, and ``weight``/``bias`` turn into read-only
properties that return a fresh reparameterized sample ``mu + sigma * eps`` (or ``mu`` in
"mean" mode). Because the parent's ``forward`` and any functional use
(``F.linear(x, fc.weight, fc.bias)``) read those properties, the layer computes the same
function as its parent with Bayesian weights, and returns exactly what the parent returned.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dnn2bnn.config import OPTION_NAMES, BayesConfig, Estimator
from dnn2bnn.errors import ConversionWarning
from dnn2bnn.layers import _estimators
from dnn2bnn.layers._kl import PosteriorKL, _FSDPModule
from dnn2bnn.layers._sampling import cached_sigma, softplus32
from dnn2bnn.layers._sampling import sample as _sample
from dnn2bnn.priors import Prior

__all__ = [
    "DEFAULT_POSTERIOR_SIGMA_INIT",
    "DEFAULT_PRIOR_MEAN",
    "DEFAULT_PRIOR_SIGMA",
    "BayesMode",
    "BayesianLayer",
    "bayesian_class",
    "is_bayesian_layer",
]

#: Initial posterior standard deviation. Small against typical trained weights (which are
#: of order 1/sqrt(fan_in)), so a converted network predicts like its parent on the first
#: step; training then widens or narrows sigma where the data allow.
DEFAULT_POSTERIOR_SIGMA_INIT = 1e-3
DEFAULT_PRIOR_MEAN = 0.0
DEFAULT_PRIOR_SIGMA = 1.0


class BayesMode(str, Enum):
    """How a Bayesian layer produces its weights: a fresh sample, or the posterior mean."""

    SAMPLE = "sample"
    MEAN = "mean"


def softplus_inverse(value: float) -> float:
    """``rho`` such that ``softplus(rho) == value`` (value > 0), stable for small values."""
    return value + math.log(-math.expm1(-value))


class BayesianLayer(PosteriorKL, nn.Module):
    """Mixin that turns a torch.nn layer with ``weight``/``bias`` into a Bayesian one.

    It must come before the torch.nn class in the bases (``class BayesLinear(BayesianLayer,
    nn.Linear)``). Subclasses set ``dnn_type``, the torch.nn class they replace.

    The layer protocol that conversion relies on (and that a user-written Bayesian layer
    must follow to be passed to :func:`dnn2bnn.transform_to_bnn_layer`) is:
    ``from_dnn(module, **options)`` (classmethod), ``to_dnn()`` and ``kl()``.
    """

    dnn_type: ClassVar[type[nn.Module]]
    #: Names of the parameters that become Bayesian.
    bayes_params: ClassVar[tuple[str, ...]] = ("weight", "bias")
    #: The built-in class a dynamic subclass was derived from (see :func:`bayesian_class`).
    _bnn_base: ClassVar[type[BayesianLayer] | None] = None
    #: Attributes this mixin adds to an instance; removed again by :meth:`to_dnn`.
    _bayes_attrs: ClassVar[tuple[str, ...]] = (
        "bayes_mode",
        "bayes_config",
        "prior",
        "posterior_sigma_init",
        "estimator",
        "_sample_cache",
        "_share_samples",
        "_kl_samples",
        "_pending_kl",
        "_sigma_cache",
        "_scalar_cache",
    )
    #: Whether the flipout/lrt estimators can run this class (False for a user subclass
    #: with its own ``forward``, which only sees the sampled ``weight``).
    supports_estimators: ClassVar[bool] = True

    bayes_mode: BayesMode
    bayes_config: BayesConfig
    prior: Prior
    posterior_sigma_init: float
    estimator: Estimator

    def __init__(self, *args: Any, config: BayesConfig | None = None, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
        config = _resolve(config, options)
        # The torch.nn constructor builds, checks and initialises weight and bias as usual.
        super().__init__(*args, **kwargs)
        self._bayesianize_(config)

    # ------------------------------------------------------------------ construction
    def _bayesianize_(self, config: BayesConfig) -> None:
        """Turn this module's plain ``weight``/``bias`` into posterior parameters, in place."""
        self.bayes_mode = BayesMode.SAMPLE
        self.bayes_config = config
        self.prior = config.prior
        self.posterior_sigma_init = config.posterior_sigma_init
        self.estimator = config.estimator
        self._sample_cache: dict[str, Tensor] | None = None
        self._share_samples = False
        self._kl_samples: dict[str, Tensor] = {}
        # name -> (KL computed with the last training sample, the versions it is valid for)
        self._pending_kl: dict[str, tuple[Tensor, tuple[int, ...]]] = {}
        self._sigma_cache: dict[str, tuple[int, int, Tensor]] = {}
        self._scalar_cache: dict[str, tuple[tuple[int, int], float]] = {}
        for name in self.bayes_params:
            value = self._parameters.pop(name)
            if value is None:
                for suffix in ("_mu", "_rho"):
                    self.register_parameter(name + suffix, None)
                continue
            # A copy: the trained tensor may be tied to another module's parameter.
            data = value.detach().clone()
            self.register_parameter(name + "_mu", nn.Parameter(data, value.requires_grad))
            rho = _initial_rho(data, config)
            self.register_parameter(name + "_rho", nn.Parameter(rho, value.requires_grad))
            for suffix, buffer in config.prior.make_buffers(data).items():
                self.register_buffer(f"{name}_prior_{suffix}", buffer)

    @classmethod
    def from_dnn(
        cls, module: nn.Module, *, config: BayesConfig | None = None, **options: Any
    ) -> BayesianLayer:
        """Build the Bayesian counterpart of a trained layer.

        The posterior means are copies of the trained weight and bias; every constructor
        argument, the device, the dtype, the train/eval mode, hooks and user attributes are
        kept. ``module`` itself is not modified.

        Args:
            module: an instance of ``cls.dnn_type`` (or of a subclass of it).
            config: a :class:`~dnn2bnn.BayesConfig` (default: ``BayesConfig()``).
            **options: keyword shortcuts applied on top of ``config``: ``prior``,
                ``prior_mean``, ``prior_sigma``, ``posterior_sigma_init``, ``moped_delta``,
                ``estimator``.

        Example:
            >>> from dnn2bnn import BayesLinear
            >>> bayes = BayesLinear.from_dnn(torch.nn.Linear(4, 2), estimator="lrt")
            >>> bayes.weight_mu.shape, bayes.estimator.value
            (torch.Size([2, 4]), 'lrt')
        """
        return cls._convert_(copy.deepcopy(module), config=config, **options)

    @classmethod
    def check_options(cls, *, config: BayesConfig | None = None, **options: Any) -> BayesConfig:
        """The resolved configuration; raises ``TypeError``/``ValueError`` naming a bad option."""
        return _resolve(config, options)

    @classmethod
    def estimator_fallback(cls, dnn_cls: type[nn.Module], config: BayesConfig) -> str | None:
        """Why ``config.estimator`` cannot run on ``dnn_cls`` (``None`` when it can)."""
        if config.estimator is Estimator.REPARAM:
            return None
        if bayesian_class(cls._bnn_base or cls, dnn_cls).supports_estimators:
            return None
        return (
            f"{dnn_cls.__qualname__} has its own forward, so estimator "
            f"{config.estimator.value!r} cannot be applied; it uses 'reparam' instead"
        )

    @classmethod
    def _convert_(
        cls, module: nn.Module, *, config: BayesConfig | None = None, **options: Any
    ) -> BayesianLayer:
        """Like :meth:`from_dnn`, but turns ``module`` itself into the Bayesian layer."""
        base = cls._bnn_base or cls
        check_convertible(base, module)
        # Validate every option before touching the module.
        config = _resolve(config, options)
        reason = base.estimator_fallback(type(module), config)
        if reason is not None:
            warnings.warn(f"dnn2bnn: {reason}", ConversionWarning, stacklevel=3)
            config = dataclasses.replace(config, estimator=Estimator.REPARAM)
        module.__class__ = bayesian_class(base, type(module))
        module._bayesianize_(config)
        return module

    def to_dnn(self) -> nn.Module:
        """A plain deterministic copy of this layer holding the posterior means.

        Returns an instance of the class this layer replaced, with the same constructor
        arguments, device, dtype, mode, hooks and attributes.
        """
        dnn = copy.deepcopy(self)
        for name in self.bayes_params:
            mu = dnn._parameters.pop(name + "_mu")
            del dnn._parameters[name + "_rho"]
            for key in [k for k in dnn._buffers if k.startswith(name + "_prior_")]:
                del dnn._buffers[key]
            dnn._parameters[name] = None if mu is None else nn.Parameter(mu.data, mu.requires_grad)
        for attr in self._bayes_attrs:
            dnn.__dict__.pop(attr, None)
        dnn.__class__ = type(self).dnn_type
        return dnn

    # ------------------------------------------------------------------ the posterior
    def posterior_sigma(self, name: str = "weight") -> Tensor | None:
        """``softplus(rho)`` of the named Bayesian parameter (``None`` if absent), in float32+."""
        rho = self._parameters[name + "_rho"]
        return None if rho is None else softplus32(rho)

    def _draw(self, name: str) -> Tensor | None:
        params = self.__dict__["_parameters"]
        if name + "_mu" not in params:
            # Still inside the torch.nn constructor: behave like the plain layer.
            if name in params:
                return params[name]
            raise AttributeError(name)
        mu = params[name + "_mu"]
        if mu is None or self.bayes_mode == BayesMode.MEAN:
            return mu
        cache = self._sample_cache
        if cache is not None and name in cache:
            return cache[name]
        rho = params[name + "_rho"]
        # training recomputes sigma once per forward (the KL of the same step reuses it);
        # repeated passes without autograd (Monte Carlo prediction) reuse it while rho is unchanged
        # sigma is float32+ (see softplus32); the sample goes back to the parameter dtype so
        # the parent's forward sees weights of the dtype it was built with.
        sigma = self._sigma(name, rho, reuse=not torch.is_grad_enabled())
        fused = self._sample_with_kl(name, mu, rho, sigma)
        sample = fused if fused is not None else _sample(mu, rho, sigma).to(mu.dtype)
        if cache is not None:
            cache[name] = sample
        self._keep_for_kl(name, sample)
        return sample

    def _sigma(self, name: str, rho: Tensor, *, reuse: bool = True) -> Tensor:
        """``softplus(rho)`` detached, computed once per change of ``rho`` (see ``_sampling``).

        Not cached on FSDP2-sharded layers: FSDP2 refills the unsharded parameters in place
        without changing their version counter, so a cached sigma would go stale.
        """
        if _FSDPModule is not None and isinstance(self, _FSDPModule):
            with torch.no_grad():
                return softplus32(rho)
        return cached_sigma(self._sigma_cache, name, rho, reuse=reuse)

    def forward(self, input: Tensor) -> Tensor:
        """The torch.nn layer's forward, with weights drawn by the configured estimator."""
        if self.estimator is Estimator.REPARAM or self.bayes_mode == BayesMode.MEAN:
            return super().forward(input)  # type: ignore[misc]
        if self.estimator is Estimator.FLIPOUT:
            return _estimators.flipout(self, input)
        return _estimators.local_reparam(self, input)

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's linear operation with explicit weights (``F.linear``, ``conv``)."""
        raise NotImplementedError

    def _sign_shapes(self, input: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the flipout sign tensors for ``input`` and for the output."""
        raise NotImplementedError

    def kl(self) -> Tensor:
        """``KL(q || p)`` of this layer's own Bayesian parameters, summed (not averaged).

        Closed form for :class:`~dnn2bnn.NormalPrior` and :class:`~dnn2bnn.EmpiricalPrior`;
        for :class:`~dnn2bnn.ScaleMixturePrior`, the Monte Carlo estimate at the weight
        sample of the last forward pass (released here), or at a fresh sample if there is
        none. In float32 or wider.
        """
        total = None
        for name in self.bayes_params:
            if self._parameters[name + "_mu"] is None:
                continue
            term = self._kl_term(name)
            total = term if total is None else total + term
        if total is None:
            raise RuntimeError(f"{type(self).__name__} has no Bayesian parameter")
        return total

    def reset_parameters(self) -> None:
        """Re-initialise like the torch.nn layer (means) and reset sigma to its initial value."""
        if "_sample_cache" not in self.__dict__:  # called by the torch.nn constructor
            super().reset_parameters()  # type: ignore[misc]
            return
        with _peek_means(self):
            super().reset_parameters()  # type: ignore[misc]
        with torch.no_grad():
            for name in self.bayes_params:
                rho = self._parameters[name + "_rho"]
                if rho is not None:
                    rho.copy_(_initial_rho(self._parameters[name + "_mu"], self.bayes_config))

    def extra_repr(self) -> str:
        with _peek_means(self):  # the parent's repr reads .bias: do not draw a sample for it
            base = super().extra_repr()
        init = (
            f"moped_delta={self.bayes_config.moped_delta:g}"
            if self.bayes_config.moped_delta is not None
            else f"posterior_sigma_init={self.posterior_sigma_init:g}"
        )
        return f"{base}, prior={self.prior}, {init}, estimator={self.estimator.value!r}"

    def __getstate__(self) -> dict[str, Any]:
        # Weight samples kept for the KL are part of an autograd graph: never copied.
        state = super().__getstate__()
        state = dict(state)
        state["_kl_samples"] = {}
        state["_pending_kl"] = {}
        state["_sigma_cache"] = {}
        state["_scalar_cache"] = {}
        state["_sample_cache"] = None
        return state

    # ------------------------------------------------------------------ pickling
    def __reduce_ex__(self, protocol: Any) -> Any:
        if type(self).__dict__.get("_bnn_base") is None:
            return super().__reduce_ex__(protocol)
        # A class made by bayesian_class() cannot be found by name: rebuild it instead.
        return (_new_bayesian_instance, (self._bnn_base, type(self).dnn_type), self.__getstate__())


def _resolve(config: BayesConfig | None, options: dict[str, Any]) -> BayesConfig:
    if config is not None and not isinstance(config, BayesConfig):
        raise TypeError(f"config must be a dnn2bnn.BayesConfig, got {type(config).__name__}")
    return BayesConfig.from_options(config, **options)


def _initial_rho(mu: Tensor, config: BayesConfig) -> Tensor:
    """``rho`` giving the configured initial sigma (constant, or MOPED ``delta * |mu|``)."""
    with torch.no_grad():
        if config.moped_delta is None:
            return torch.full_like(mu, softplus_inverse(config.posterior_sigma_init))
        sigma = (config.moped_delta * mu.abs()).clamp_min(1e-8)
        return sigma + torch.log(-torch.expm1(-sigma))


def check_convertible(base: type[BayesianLayer], module: nn.Module) -> None:
    """Raise ``TypeError`` naming the reason when ``base`` cannot convert ``module``."""
    if not isinstance(module, base.dnn_type):
        raise TypeError(
            f"{base.__name__} converts {base.dnn_type.__module__}.{base.dnn_type.__qualname__}, "
            f"got {type(module).__qualname__}"
        )
    if isinstance(module, BayesianLayer):
        raise TypeError(f"{type(module).__qualname__} is already a Bayesian layer")
    for name in base.bayes_params:
        if name not in module._parameters:
            raise TypeError(
                f"{type(module).__qualname__}.{name} is not a plain parameter (is it "
                "parametrized, e.g. by weight_norm or spectral_norm?); remove the "
                "parametrization before converting"
            )
        check_initialized(module, name)


def check_initialized(module: nn.Module, name: str) -> None:
    """Raise ``TypeError`` when parameter ``name`` of ``module`` is a lazy, uninitialized one."""
    if isinstance(module._parameters.get(name), nn.parameter.UninitializedParameter):
        raise TypeError(
            f"{type(module).__qualname__}.{name} is uninitialized (a lazy module); run "
            "one forward pass before converting"
        )


def _bayes_property(name: str) -> property:
    def getter(self: BayesianLayer) -> Tensor | None:
        return self._draw(name)

    def setter(self: BayesianLayer, value: Any) -> None:
        raise AttributeError(
            f"{type(self).__name__}.{name} is drawn from the posterior and cannot be set; "
            f"assign {name}_mu (the posterior mean) or {name}_rho instead"
        )

    return property(getter, setter, doc=f"A sample of ``{name}`` (its mean in 'mean' mode).")


BayesianLayer.weight = _bayes_property("weight")  # type: ignore[attr-defined]
BayesianLayer.bias = _bayes_property("bias")  # type: ignore[attr-defined]


@contextmanager
def _peek_means(layer: BayesianLayer) -> Iterator[None]:
    previous = layer.__dict__.get("bayes_mode", BayesMode.SAMPLE)
    layer.__dict__["bayes_mode"] = BayesMode.MEAN
    try:
        yield
    finally:
        layer.__dict__["bayes_mode"] = previous


@functools.lru_cache(maxsize=None)
def bayesian_class(base: type[BayesianLayer], dnn_cls: type[nn.Module]) -> type[BayesianLayer]:
    """The Bayesian class for ``dnn_cls``, a subclass of ``base.dnn_type``.

    For the exact torch.nn type this is ``base`` itself. For a subclass (a user's
    ``class MyLinear(nn.Linear)``, torchvision's ``NonDynamicallyQuantizableLinear``) it is
    a class deriving from both ``base`` and ``dnn_cls``, so the subclass's own ``forward``
    and attributes keep working, now reading sampled weights.
    """
    if dnn_cls is base.dnn_type:
        return base
    if not issubclass(dnn_cls, base.dnn_type):
        raise TypeError(f"{dnn_cls.__qualname__} is not a subclass of {base.dnn_type.__qualname__}")
    namespace: dict[str, Any] = {"dnn_type": dnn_cls, "_bnn_base": base, "__module__": base.__module__}
    if dnn_cls.forward is not base.dnn_type.forward:
        # The subclass's own forward reads the sampled ``weight``: only "reparam" applies.
        namespace.update(forward=dnn_cls.forward, supports_estimators=False)
    return type(f"Bayes{dnn_cls.__name__}", (base, dnn_cls), namespace)


def _new_bayesian_instance(base: type[BayesianLayer], dnn_cls: type[nn.Module]) -> BayesianLayer:
    cls = bayesian_class(base, dnn_cls)
    return cls.__new__(cls)


def is_bayesian_layer(module: nn.Module) -> bool:
    """Whether ``module`` follows the Bayesian layer protocol (built-in or user-written)."""
    if isinstance(module, BayesianLayer):
        return True
    return callable(getattr(module, "kl", None)) and callable(getattr(type(module), "from_dnn", None))
