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
import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dnn2bnn.priors import NormalPrior, _check_positive, kl_normal

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


def _sigma(rho: Tensor) -> Tensor:
    """``softplus(rho)`` computed in float32 (or wider) whatever the dtype of ``rho``.

    Keeps sigma from underflowing to 0 (and the KL's ``log(sigma)`` from becoming -inf) in
    float16/bfloat16 models, and under autocast, where it must not be computed in half
    precision either. A no-op cast for the usual float32 parameters.
    """
    return F.softplus(rho.to(torch.promote_types(rho.dtype, torch.float32)))


def softplus_inverse(value: float) -> float:
    """``rho`` such that ``softplus(rho) == value`` (value > 0), stable for small values."""
    return value + math.log(-math.expm1(-value))


class BayesianLayer(nn.Module):
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
        "prior",
        "posterior_sigma_init",
        "_sample_cache",
        "_share_samples",
    )

    bayes_mode: BayesMode
    prior: NormalPrior
    posterior_sigma_init: float

    def __init__(
        self,
        *args: Any,
        prior_mean: float = DEFAULT_PRIOR_MEAN,
        prior_sigma: float = DEFAULT_PRIOR_SIGMA,
        posterior_sigma_init: float = DEFAULT_POSTERIOR_SIGMA_INIT,
        **kwargs: Any,
    ) -> None:
        # The torch.nn constructor builds, checks and initialises weight and bias as usual.
        super().__init__(*args, **kwargs)
        self._bayesianize_(
            prior=NormalPrior(prior_mean, prior_sigma), posterior_sigma_init=posterior_sigma_init
        )

    # ------------------------------------------------------------------ construction
    def _bayesianize_(self, *, prior: NormalPrior, posterior_sigma_init: float) -> None:
        """Turn this module's plain ``weight``/``bias`` into posterior parameters, in place."""
        _check_positive("posterior_sigma_init", posterior_sigma_init)
        self.bayes_mode = BayesMode.SAMPLE
        self.prior = prior
        self.posterior_sigma_init = float(posterior_sigma_init)
        self._sample_cache: dict[str, Tensor] | None = None
        self._share_samples = False
        rho0 = softplus_inverse(posterior_sigma_init)
        for name in self.bayes_params:
            value = self._parameters.pop(name)
            if value is None:
                for suffix in ("_mu", "_rho"):
                    self.register_parameter(name + suffix, None)
                for suffix in ("_prior_mu", "_prior_sigma"):
                    self.register_buffer(name + suffix, None)
                continue
            # A copy: the trained tensor may be tied to another module's parameter.
            data = value.detach().clone()
            self.register_parameter(name + "_mu", nn.Parameter(data, value.requires_grad))
            rho = torch.full_like(data, rho0)
            self.register_parameter(name + "_rho", nn.Parameter(rho, value.requires_grad))
            factory = {"device": data.device, "dtype": data.dtype}
            self.register_buffer(name + "_prior_mu", torch.tensor(prior.mean, **factory))
            self.register_buffer(name + "_prior_sigma", torch.tensor(prior.sigma, **factory))

    @classmethod
    def from_dnn(
        cls,
        module: nn.Module,
        *,
        prior_mean: float = DEFAULT_PRIOR_MEAN,
        prior_sigma: float = DEFAULT_PRIOR_SIGMA,
        posterior_sigma_init: float = DEFAULT_POSTERIOR_SIGMA_INIT,
    ) -> BayesianLayer:
        """Build the Bayesian counterpart of a trained layer.

        The posterior means are copies of the trained weight and bias; every constructor
        argument, the device, the dtype, the train/eval mode, hooks and user attributes are
        kept. ``module`` itself is not modified.

        Args:
            module: an instance of ``cls.dnn_type`` (or of a subclass of it).
            prior_mean: mean of the Normal prior.
            prior_sigma: standard deviation of the Normal prior.
            posterior_sigma_init: initial posterior standard deviation of every weight.

        Example:
            >>> from dnn2bnn import BayesLinear
            >>> bayes = BayesLinear.from_dnn(torch.nn.Linear(4, 2))
            >>> bayes.weight_mu.shape
            torch.Size([2, 4])
        """
        return cls._convert_(
            copy.deepcopy(module),
            prior_mean=prior_mean,
            prior_sigma=prior_sigma,
            posterior_sigma_init=posterior_sigma_init,
        )

    @classmethod
    def check_options(
        cls,
        *,
        prior_mean: float = DEFAULT_PRIOR_MEAN,
        prior_sigma: float = DEFAULT_PRIOR_SIGMA,
        posterior_sigma_init: float = DEFAULT_POSTERIOR_SIGMA_INIT,
    ) -> None:
        """Raise ``TypeError``/``ValueError`` naming the first invalid Bayesian option."""
        NormalPrior(prior_mean, prior_sigma)
        _check_positive("posterior_sigma_init", posterior_sigma_init)

    @classmethod
    def _convert_(
        cls,
        module: nn.Module,
        *,
        prior_mean: float = DEFAULT_PRIOR_MEAN,
        prior_sigma: float = DEFAULT_PRIOR_SIGMA,
        posterior_sigma_init: float = DEFAULT_POSTERIOR_SIGMA_INIT,
    ) -> BayesianLayer:
        """Like :meth:`from_dnn`, but turns ``module`` itself into the Bayesian layer."""
        base = cls._bnn_base or cls
        check_convertible(base, module)
        # Validate every option before touching the module.
        cls.check_options(
            prior_mean=prior_mean, prior_sigma=prior_sigma, posterior_sigma_init=posterior_sigma_init
        )
        prior = NormalPrior(prior_mean, prior_sigma)
        module.__class__ = bayesian_class(base, type(module))
        module._bayesianize_(prior=prior, posterior_sigma_init=posterior_sigma_init)
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
            del dnn._buffers[name + "_prior_mu"]
            del dnn._buffers[name + "_prior_sigma"]
            dnn._parameters[name] = None if mu is None else nn.Parameter(mu.data, mu.requires_grad)
        for attr in self._bayes_attrs:
            dnn.__dict__.pop(attr, None)
        dnn.__class__ = type(self).dnn_type
        return dnn

    # ------------------------------------------------------------------ the posterior
    def posterior_sigma(self, name: str = "weight") -> Tensor | None:
        """``softplus(rho)`` of the named Bayesian parameter (``None`` if absent), in float32+."""
        rho = self._parameters[name + "_rho"]
        return None if rho is None else _sigma(rho)

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
        # sigma * eps in float32+ (see _sigma), then back to the parameter dtype so the
        # parent's forward sees weights of the dtype it was built with (a no-op in float32).
        sigma = _sigma(rho)
        sample = (mu + sigma * torch.randn_like(sigma)).to(mu.dtype)
        if cache is not None:
            cache[name] = sample
        return sample

    def kl(self) -> Tensor:
        """``KL(q || p)`` of this layer's own Bayesian parameters, summed (not averaged).

        Computed in closed form for the Normal prior, in float32 or wider.
        """
        total = None
        for name in self.bayes_params:
            mu = self._parameters[name + "_mu"]
            if mu is None:
                continue
            term = kl_normal(
                mu,
                _sigma(self._parameters[name + "_rho"]),
                self._buffers[name + "_prior_mu"],
                self._buffers[name + "_prior_sigma"],
            )
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
                    rho.fill_(softplus_inverse(self.posterior_sigma_init))

    def extra_repr(self) -> str:
        with _peek_means(self):  # the parent's repr reads .bias: do not draw a sample for it
            base = super().extra_repr()
        return f"{base}, prior={self.prior}, posterior_sigma_init={self.posterior_sigma_init:g}"

    # ------------------------------------------------------------------ pickling
    def __reduce_ex__(self, protocol: Any) -> Any:
        if type(self).__dict__.get("_bnn_base") is None:
            return super().__reduce_ex__(protocol)
        # A class made by bayesian_class() cannot be found by name: rebuild it instead.
        return (_new_bayesian_instance, (self._bnn_base, type(self).dnn_type), self.__dict__.copy())


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
        value = module._parameters[name]
        if isinstance(value, nn.parameter.UninitializedParameter):
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
    return type(
        f"Bayes{dnn_cls.__name__}",
        (base, dnn_cls),
        {"dnn_type": dnn_cls, "_bnn_base": base, "__module__": base.__module__},
    )


def _new_bayesian_instance(base: type[BayesianLayer], dnn_cls: type[nn.Module]) -> BayesianLayer:
    cls = bayesian_class(base, dnn_cls)
    return cls.__new__(cls)


def is_bayesian_layer(module: nn.Module) -> bool:
    """Whether ``module`` follows the Bayesian layer protocol (built-in or user-written)."""
    if isinstance(module, BayesianLayer):
        return True
    return callable(getattr(module, "kl", None)) and callable(getattr(type(module), "from_dnn", None))
