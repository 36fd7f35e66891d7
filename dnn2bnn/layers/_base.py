"""The Bayesian layer protocol and the mixin every built-in Bayesian layer shares.

A Bayesian layer *is* the torch.nn layer it replaces (``BayesLinear`` subclasses
``nn.Linear``): it inherits the constructor, the argument checks and the ``forward`` of
its parent. What changes is where ``weight`` and ``bias`` come from. The trained
tensors become the posterior means ``weight_mu``/``bias_mu``, next to ``weight_rho``/
``bias_rho`` with ``sigma = softplus(rho)`` or ``exp(rho)`` (the layer's
:class:`~dnn2bnn.Parametrization`), and ``weight``/``bias`` turn into read-only properties
that return a reparameterized sample ``mu + sigma * eps`` (or ``mu`` in "mean" mode). Because the parent's ``forward`` and any functional use
(``F.linear(x, fc.weight, fc.bias)``) read those properties, the layer computes the same
function as its parent with Bayesian weights, and returns exactly what the parent returned.

One sample per call: the first read of ``weight`` within a call of the layer (or of the
converted model, for layers used several times) draws the sample, every further read of
that call returns the same tensor, and the sample is dropped when the call ends. A
recomputation by ``torch.utils.checkpoint`` (non-reentrant) sees the same sample. Outside
any call, each read draws afresh and returns a read-only ``PosteriorSample`` (see
``dnn2bnn/layers/_guard.py``: writes would be lost, so they raise).
"""

from __future__ import annotations

import collections
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

from dnn2bnn.config import OPTION_NAMES, BayesConfig, Estimator, Parametrization, enum_value
from dnn2bnn.errors import ConversionWarning
from dnn2bnn.layers import _estimators
from dnn2bnn.layers._guard import guard
from dnn2bnn.layers._kl import PosteriorKL
from dnn2bnn.layers._sampling import posterior_std, transforms_active
from dnn2bnn.layers._sampling import sample as _sample
from dnn2bnn.layers._state import check_parametrization, record_parametrization
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
#: RNG states remembered per parameter while checkpointing: the draws of one forward pass
#: whose recomputation is still to come (a layer called more often per pass than this, each
#: call in a checkpointed region, would not be recognised).
_REPLAY_STATES = 16


class FlatReads(collections.deque):  # type: ignore[type-arg]
    """``(RNG state, sample, its draw's FlatSpec)`` of each read of a flat draw's sample
    inside a checkpointed block (the recomputation reads at the same RNG state), or
    ``(RNG state, None, None)`` where a lazy draw was recorded (draw again). A strong
    reference: under non-reentrant checkpointing nothing else keeps the sample until the
    backward; entries whose draw was backpropagated (``spec.spent``) are dropped at the next
    draw. ``spec``: the FlatSpec of the layer's latest draw."""

    spec: Any = None
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
        "parametrization",
        "_exp",
        "_replay",
        "_task_samples",
        "_sample_cache",
        "_share_samples",
        "_kl_samples",
        "_pending_kl",
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
    parametrization: Parametrization

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give a user subclass's own ``forward`` one sample per parameter for the whole call.

        A subclass written outside dnn2bnn (``class Cosine(BayesLinear)`` whose ``forward``
        reads ``self.weight`` twice) would otherwise draw a new sample on every read; wrapped
        as the dynamic classes of :func:`bayesian_class` are, every read within one call sees
        the same sample, and only "reparam" applies (the forward sees only ``weight``).
        """
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if (
            forward is None
            or hasattr(forward, "__bnn_scoped__")
            or cls.__module__.split(".")[0] == __name__.split(".")[0]
        ):
            return
        cls.forward = scoped_forward(forward)  # type: ignore[method-assign]
        cls.supports_estimators = False

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
        self.parametrization = config.parametrization
        self._exp = config.parametrization is Parametrization.EXP
        self._sample_cache: dict[str, Tensor] | None = None
        self._share_samples = False
        self._kl_samples: dict[str, Tensor] = {}
        # name -> (KL computed with the last training sample, the versions it is valid for)
        self._pending_kl: dict[str, tuple[Tensor, tuple[int, ...]]] = {}
        # name -> (versions, sigma of the last training draw), for the KL of the same step
        self._scalar_cache: dict[str, tuple[tuple[int, int], float]] = {}
        # name -> (last sample, RNG states before the recent draws), kept while checkpointing
        self._replay: dict[str, tuple[Tensor, collections.deque[Tensor]]] = {}
        # (autograd graph task, name -> sample): a shared layer's draws in a reentrant
        # checkpoint recomputation, which runs outside the model call's scope
        self._task_samples: tuple[int, dict[str, Tensor]] | None = None
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
        """``sigma(rho)`` of the named Bayesian parameter (``None`` if absent), in float32+.

        ``softplus(rho)`` or ``exp(rho)`` following the layer's ``parametrization``;
        differentiable in ``rho``.
        """
        rho = self._parameters[name + "_rho"]
        return None if rho is None else posterior_std(rho, self._exp)

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
        if cache is not None:
            hit = cache.get(name)
            if hit is not None:
                if self._replay:  # a flat draw's sample read inside a checkpointed block?
                    self._note_flat_read(name, hit)
                return hit
        compiling = torch.compiler.is_compiling()
        backward = not compiling and _in_backward()
        shared = backward and self._share_samples and name not in self._replay
        if shared:
            held = self._shared_in_backward(name)
            if held is not None:
                if cache is not None:
                    cache[name] = held
                return held
        if backward:  # a checkpoint recomputation: the forward's sample, or the same RNG
            replayed = self._replayed(name)
            if replayed is not None:
                if cache is not None:
                    cache[name] = replayed
                return replayed
        sample = self._new_sample(name, mu, params[name + "_rho"])
        if shared:
            self._hold_in_backward(name, sample)
        if cache is not None:
            cache[name] = sample
            return sample
        if backward or compiling or transforms_active():
            return sample
        # Outside any call: a read-only sample, so a write to it cannot be lost silently.
        return guard(sample, f"{type(self).__name__}.{name}")

    def _new_sample(self, name: str, mu: Tensor, rho: Tensor) -> Tensor:
        """A fresh reparameterized sample (and, in training, the KL of the same node)."""
        record = (
            torch.is_grad_enabled() and not torch.compiler.is_compiling() and _checkpointing()
        )
        state = _rng_state(mu.device) if record else None
        sigma = self._sigma(name, rho)
        fused = self._sample_with_kl(name, mu, rho, sigma)
        if fused is not None:
            sample = fused
        else:
            sample = _sample(mu, rho, sigma, self._exp)
            if sample.dtype != mu.dtype:  # a float16/bfloat16 mean, sampled in float32
                sample = sample.to(mu.dtype)
        sample = self._fix_rows(name, mu, sample)
        self._keep_for_kl(name, sample)
        if state is not None:
            entry = self._replay.get(name)
            if entry is not None and isinstance(entry[1], FlatReads):
                # a flat draw's reads stay (its call's backward may be pending); this state
                # means "draw again" (held None), as in a lazy entry
                entry[1].append((state, None, None))
                self._replay[name] = (sample, entry[1])
            else:
                states = entry[1] if entry is not None else collections.deque(maxlen=_REPLAY_STATES)
                states.append(state)
                self._replay[name] = (sample, states)
        elif self._replay and not torch.compiler.is_compiling() and not _in_backward():
            entry = self._replay.get(name)
            if entry is not None and not isinstance(entry[1], FlatReads):
                # a flat draw's entry stays: a checkpointed block of a training call before
                # this one (validation under no_grad) takes its sample again in the backward
                del self._replay[name]
        return sample

    def _shared_in_backward(self, name: str) -> Tensor | None:
        """The sample this backward pass already drew for ``name`` (a shared layer).

        ``torch.utils.checkpoint(use_reentrant=True)`` recomputes its block in the backward
        pass, outside the model call that gave every use of a shared layer one sample; the
        first use draws again from the restored RNG state, the later uses must reuse it.
        """
        held = self._task_samples
        if held is None or held[0] != torch._C._current_graph_task_id():
            return None
        return held[1].get(name)

    def _hold_in_backward(self, name: str, sample: Tensor) -> None:
        task = torch._C._current_graph_task_id()
        held = self._task_samples
        if held is None or held[0] != task:
            held = self._task_samples = (task, {})
        held[1][name] = sample

    def _note_flat_read(self, name: str, sample: Tensor) -> None:
        """Remember the RNG state at which a block under ``torch.utils.checkpoint`` read a
        flat draw's ``sample`` (:func:`~dnn2bnn.layers.install_batched_sampling`): its
        recomputation reads at the same state and must get this sample, not a later call's."""
        entry = self._replay.get(name)
        if entry is None or not isinstance(entry[1], FlatReads):
            return
        if torch.is_grad_enabled() and not _checkpointing():
            return  # a plain training read (reentrant checkpoint runs its forward without grad)
        if torch.compiler.is_compiling() or _in_backward():
            return
        entry[1].append((_rng_state(sample.device), sample, entry[1].spec))

    def _replayed(self, name: str) -> Tensor | None:
        """In a checkpoint recomputation: None if the RNG state is one the forward drew this
        parameter at (drawing again gives the same sample and consumes the RNG as the forward
        did), else the forward's last sample (the forward took it from the call's cache)."""
        entry = self._replay.get(name)
        if entry is None:
            return None
        sample, states = entry
        if isinstance(states, FlatReads):
            return self._flat_replayed(name, sample, states)
        current = _rng_state(sample.device)
        if any(s.shape == current.shape and torch.equal(s, current) for s in states):
            return None
        return sample

    def _flat_replayed(self, name: str, last: Tensor, reads: FlatReads) -> Tensor | None:
        """The flat sample the checkpointed block read at the current RNG state (``last``,
        the latest draw's, if none; None where a lazy draw was made there). Under ``use_reentrant=True`` (which backpropagates the
        recomputed graph on its own) as a new differentiable function of ``mu`` and ``rho``
        equal to it: that graph must not reach the flat node, whose backward runs once."""
        sample = last
        current = _rng_state(last.device)
        for state, held, _ in reversed(reads):
            if state.shape == current.shape and torch.equal(state, current):
                if held is None:
                    return None
                sample = held
                break
        if _checkpointing():  # non-reentrant: the recomputation only refills saved tensors
            return sample
        mu, rho = self._parameters[name + "_mu"], self._parameters[name + "_rho"]
        value = sample.detach()
        if mu is None or rho is None:
            return value
        sigma = posterior_std(rho, self._exp)
        with torch.no_grad():
            eps = (value - mu) / sigma
        return value + (mu - mu.detach()) + (sigma - sigma.detach()) * eps

    def _sigma(self, name: str, rho: Tensor) -> Tensor:
        """``sigma(rho)``, detached and computed now; used by this draw only (the KL computes
        its own, so a write through ``rho.data`` after the forward is seen)."""
        if torch.compiler.is_compiling() or transforms_active():
            # detach, not no_grad: torch.export turns a no_grad block into a submodule call
            return posterior_std(rho, self._exp).detach()
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad() without its Python objects (1.5 us)
        try:
            return posterior_std(rho, self._exp)
        finally:
            torch._C._set_grad_enabled(enabled)

    def _step_sigma(self, name: str, rho: Tensor) -> Tensor:
        """``sigma(rho)`` for the closed-form KL, detached and computed now.

        Never the sigma of this step's draw: a write through ``rho.data`` between the forward
        and the KL does not bump ``rho``'s version, and a cached sigma then gave the old KL
        (softplus) or a negative one (exp, where the KL reads ``log sigma`` as ``rho``).
        """
        if torch.compiler.is_compiling() or transforms_active():
            return posterior_std(rho, self._exp).detach()
        with torch.no_grad():
            return posterior_std(rho, self._exp)

    def _fixed_row(self, name: str) -> int | None:
        """Index of a row of parameter ``name`` that is deterministic (a padding row), if any."""
        return None

    def _fix_rows(self, name: str, mu: Tensor, sample: Tensor) -> Tensor:
        row = self._fixed_row(name)
        if row is None:
            return sample
        index = torch.tensor([row], device=mu.device)
        return sample.index_copy(0, index, mu.index_select(0, index).to(sample.dtype))

    def __setattr__(self, name: str, value: Any) -> None:
        """``layer.parametrization``, ``layer.prior`` and ``layer.bayes_config`` assignments take
        effect (sigma kept; a new ``posterior_sigma_init`` is recorded, not applied); a plain-string
        ``layer.estimator`` becomes the :class:`~dnn2bnn.Estimator` the forward compares with.

        Sampling and the KL read ``_exp`` and the prior buffers, not these attributes, so a
        bare assignment changed what the layer reports and ``save_bnn`` records (a softplus
        record over exp ``rho`` values: other sigmas after loading) but not what it computes.
        After construction they go through the same re-configuration as converting the
        model again: ``rho`` is re-expressed with the same sigmas, the prior buffers rebuilt
        (kept when they already hold the new prior's numbers, as after a posterior fit).
        """
        if name in ("parametrization", "prior", "bayes_config") and "_exp" in self.__dict__:
            self._assign_option(name, value)
            return
        if name == "estimator" and not isinstance(value, Estimator):
            # the forward compares with the enum: a plain "reparam" ran "lrt"
            value = enum_value(Estimator, value, f"{type(self).__name__}.estimator")
        super().__setattr__(name, value)

    def _assign_option(self, name: str, value: Any) -> None:
        """Re-configure the layer for a new parametrization, prior or whole config (sigma kept)."""
        from dnn2bnn.conversion._apply import reconfigure_  # (conversion imports the layers)

        if name == "bayes_config":
            if not isinstance(value, BayesConfig):
                raise TypeError(
                    f"{type(self).__name__}.bayes_config must be a dnn2bnn.BayesConfig, "
                    f"got {type(value).__name__}"
                )
            config = value
        elif name == "parametrization":
            value = enum_value(Parametrization, value, f"{type(self).__name__}.parametrization")
            if value is self.parametrization:
                return
            config = dataclasses.replace(self.bayes_config, parametrization=value)
        else:
            if not isinstance(value, Prior):
                raise TypeError(
                    f"{type(self).__name__}.prior must be a dnn2bnn prior (NormalPrior, "
                    f"ScaleMixturePrior, EmpiricalPrior, ...), got {type(value).__name__}"
                )
            if self._holds_prior(value):  # the buffers already hold it: only the record changes
                self.__dict__["prior"] = value
                return
            config = dataclasses.replace(self.bayes_config, prior=value)
        reconfigure_(self, config, reset_sigma=False)

    def _holds_prior(self, prior: Prior) -> bool:
        """Whether every Bayesian parameter's prior buffers are ``prior``'s, same keys and values."""
        for name in self.bayes_params:
            mu = self._parameters.get(name + "_mu")
            if mu is None:
                continue
            held = self._prior_buffers(name)
            wanted = prior.make_buffers(mu.detach())
            if set(held) != set(wanted):
                return False
            for key, tensor in wanted.items():
                have = held[key]
                if have.is_meta or have.shape != tensor.shape or not torch.equal(have, tensor.to(have)):
                    return False
        return True

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        if name in type(self).bayes_params and name + "_mu" in self.__dict__.get("_parameters", {}):
            raise AttributeError(
                f"{type(self).__name__}.{name} is drawn from the posterior and cannot be set; "
                f"assign {name}_mu (the posterior mean) or {name}_rho instead"
            )
        super().register_parameter(name, param)

    def forward(self, input: Tensor) -> Tensor:
        """The torch.nn layer's forward, with weights drawn by the configured estimator."""
        state = self.__dict__  # not nn.Module.__setattr__: 3 us per call, twice per call
        if state["_sample_cache"] is not None:
            return self._estimated_forward(input)
        state["_sample_cache"] = {}  # one sample per parameter for this call
        try:
            return self._estimated_forward(input)
        finally:
            state["_sample_cache"] = None

    def _runs_reparam(self) -> bool:
        """Whether this call uses the torch.nn forward on sampled (or mean) weights.

        A shared layer (used more than once per call of the model) must give every use the
        same weight sample; flipout/lrt draw fresh noise per use, so it runs "reparam"
        whatever its estimator (conversion and :func:`~dnn2bnn.set_estimator` already set
        it, with a warning; this guards a direct assignment of ``layer.estimator``).
        """
        return (
            self.estimator is Estimator.REPARAM
            or self.bayes_mode == BayesMode.MEAN
            or self._share_samples
        )

    def _estimated_forward(self, input: Tensor) -> Tensor:
        if self._runs_reparam():
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
        state["_scalar_cache"] = {}
        state["_replay"] = {}
        state["_task_samples"] = None
        state["_sample_cache"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A layer pickled before the parametrization option existed: its rho is softplus's.
        state = dict(state)
        config = state.get("bayes_config")
        # (``hasattr`` would find the dataclass default, "exp" since issue 17, on the class)
        if config is not None and "parametrization" not in vars(config):
            object.__setattr__(config, "parametrization", Parametrization.SOFTPLUS)
        state.setdefault("parametrization", Parametrization.SOFTPLUS)
        state.setdefault("_exp", state["parametrization"] is Parametrization.EXP)
        state.setdefault("_replay", {})
        state.setdefault("_task_samples", None)
        super().__setstate__(state)

    # ------------------------------------------------------------------ state_dict
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        record_parametrization(destination, prefix, Parametrization(self.parametrization).value)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        check_parametrization(
            state_dict=state_dict,
            prefix=prefix,
            local_metadata=local_metadata,
            rho_names=[name + "_rho" for name in self.bayes_params],
            parametrization=Parametrization(self.parametrization).value,
            error_msgs=error_msgs,
        )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

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
        exp = config.parametrization is Parametrization.EXP
        if config.moped_delta is None:
            value = config.posterior_sigma_init
            return torch.full_like(mu, math.log(value) if exp else softplus_inverse(value))
        sigma = (config.moped_delta * mu.abs()).clamp_min(1e-8)
        return torch.log(sigma) if exp else sigma + torch.log(-torch.expm1(-sigma))


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
        reads = self.__dict__.get("_fx_reads")
        if reads is not None:  # predict's trace: a read outside the layer's own forward
            reads.append(name)
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
        namespace.update(forward=scoped_forward(dnn_cls.forward), supports_estimators=False)
    return type(f"Bayes{dnn_cls.__name__}", (base, dnn_cls), namespace)


def scoped_forward(forward: Any) -> Any:
    """``forward`` run with one sample per Bayesian parameter for the whole call."""

    @functools.wraps(forward)
    def wrapper(self: BayesianLayer, *args: Any, **kwargs: Any) -> Any:
        state = self.__dict__  # not nn.Module.__setattr__ (3 us per call)
        if state["_sample_cache"] is not None:  # a model-wide scope is open already
            return forward(self, *args, **kwargs)
        state["_sample_cache"] = {}
        try:
            return forward(self, *args, **kwargs)
        finally:
            state["_sample_cache"] = None

    wrapper.__bnn_scoped__ = forward  # type: ignore[attr-defined]
    return wrapper


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (a checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


def _checkpointing() -> bool:
    """Whether saved-tensor hooks are active (``torch.utils.checkpoint``, offloading)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _rng_state(device: torch.device) -> Tensor:
    """The state of the default generator of ``device`` (empty where there is none)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    module = getattr(torch, device.type, None)
    getter = getattr(module, "get_rng_state", None)
    return getter(device) if getter is not None else torch.empty(0, dtype=torch.uint8)


def _new_bayesian_instance(base: type[BayesianLayer], dnn_cls: type[nn.Module]) -> BayesianLayer:
    cls = bayesian_class(base, dnn_cls)
    return cls.__new__(cls)


def is_bayesian_layer(module: nn.Module) -> bool:
    """Whether ``module`` follows the Bayesian layer protocol (built-in or user-written)."""
    if isinstance(module, BayesianLayer):
        return True
    # the class attribute first: for a plain module it is one dict lookup per class in the MRO,
    # where ``getattr(module, "kl")`` goes through nn.Module.__getattr__ and an AttributeError
    return callable(getattr(type(module), "from_dnn", None)) and callable(getattr(module, "kl", None))
