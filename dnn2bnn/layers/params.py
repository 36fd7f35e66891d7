"""Parameter-level Bayesian layers: any named ``nn.Parameter`` of any module becomes Bayesian.

:class:`BayesLinear` and the convolutions make ``weight`` and ``bias`` Bayesian. Many
layers hold their trained tensors under other names (``nn.MultiheadAttention.in_proj_weight``,
``nn.LSTM.weight_ih_l0``, a model's own ``pos_embedding``) or are not torch.nn layers at all
(Hugging Face's GPT-2 ``Conv1D``). :class:`BayesianParameters` handles all of them the same
way: the module's class is swapped for a dynamic subclass of it in which each chosen
parameter ``name`` becomes ``name_mu``/``name_rho`` plus prior buffers, and ``name`` itself a
read-only property that draws a sample (the mean in "mean" mode). Everything else (KL,
``set_mode``, ``state_dict``, ``to_dnn``, pickling) is :class:`BayesianLayer`'s.

Within one call of such a module, each Bayesian parameter is sampled once, however often
its ``forward`` reads it.

Embeddings (``nn.Embedding``/``nn.EmbeddingBag``, opt-in): the ``padding_idx`` row is not
sampled (every sample holds the mean's row, zero for a trained embedding), has no KL term
and gets no gradient; ``max_norm`` renormalises the call's sample, as torch renormalises
the plain layer's weight.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
import weakref
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from dnn2bnn.config import BayesConfig, Estimator
from dnn2bnn.errors import ConversionWarning
from dnn2bnn.layers._base import (
    BayesianLayer,
    _bayes_property,
    check_initialized,
    _initial_rho,
    _peek_means,
    _resolve,
    is_bayesian_layer,
)
from dnn2bnn.layers.linear import BayesLinear

__all__ = ["BayesMultiheadAttention", "BayesianParameters", "parameter_converter"]


class BayesianParameters(BayesianLayer):
    """Makes chosen parameters of any module Bayesian, keeping the module's class and forward.

    ``BayesianParameters.from_dnn(module, params=["name", ...])`` returns a copy of
    ``module`` whose class is a dynamic subclass of ``type(module)`` (named
    ``"Bayes" + type(module).__name__``) where each named parameter is a posterior
    ``N(name_mu, sigma(name_rho)^2)`` under a Normal prior, exactly like the ``weight`` of
    :class:`BayesLinear`. Without ``params``, the parameters chosen by the class
    (``candidate_params``; ``None`` means every parameter the module itself holds) are used.

    Example:
        >>> norm = torch.nn.LayerNorm(4)
        >>> bayes = BayesianParameters.from_dnn(norm, params=["weight"])
        >>> type(bayes).__name__, sorted(n for n, _ in bayes.named_parameters())
        ('BayesLayerNorm', ['bias', 'weight_mu', 'weight_rho'])
        >>> isinstance(bayes, torch.nn.LayerNorm)
        True
    """

    dnn_type: ClassVar[type[nn.Module]] = nn.Module
    bayes_params: ClassVar[tuple[str, ...]] = ()
    #: Parameters made Bayesian when none are named; ``None``: all the module's own.
    candidate_params: ClassVar[tuple[str, ...] | None] = None
    #: Only "reparam": the module's own forward reads the sampled parameters.
    supports_estimators: ClassVar[bool] = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def select_params(cls, module: nn.Module) -> tuple[str, ...]:
        """The default parameter names for ``module``: the candidates it holds (not ``None``)."""
        own = [n for n, p in module._parameters.items() if p is not None]
        if cls.candidate_params is None:
            return tuple(own)
        return tuple(n for n in cls.candidate_params if n in own)

    @classmethod
    def check_module(
        cls, module: nn.Module, params: Iterable[str] | None = None
    ) -> tuple[str, ...]:
        """The parameter names to convert; raises ``TypeError`` saying why it cannot be done."""
        what = type(module).__qualname__
        if isinstance(module, BayesianLayer):
            raise TypeError(f"{what} is already a Bayesian layer")
        if not isinstance(module, cls.dnn_type):
            raise TypeError(f"{cls.__name__} converts {cls.dnn_type.__qualname__}, got {what}")
        if params is None:
            names = cls.select_params(module)
        elif isinstance(params, str):
            raise TypeError(f"params must be a list of parameter names, got the string {params!r}")
        else:
            names = tuple(dict.fromkeys(params))
        if not names:
            raise TypeError(f"{what} has no parameter to make Bayesian")
        for name in names:
            if not isinstance(name, str) or not name.isidentifier():
                raise TypeError(
                    f"{what}: expected the name of a parameter the module itself holds "
                    f"(no dots), got {name!r}"
                )
            value = module._parameters.get(name)
            if value is None:
                found = "None" if name in module._parameters else "not a parameter"
                raise TypeError(
                    f"{what}.{name} is {found} (parametrized or a buffer?); expected one of "
                    f"{[n for n, p in module._parameters.items() if p is not None]}"
                )
            check_initialized(module, name)
            taken = [a for a in (name + "_mu", name + "_rho") if hasattr(module, a)]
            stores = (module._parameters, module._buffers, module.__dict__)
            taken += [k for d in stores for k in d if k.startswith(name + "_prior_")]
            if taken:
                raise TypeError(
                    f"{what} already has an attribute {taken[0]!r}; cannot make {name!r} Bayesian"
                )
        return names

    @classmethod
    def from_dnn(  # type: ignore[override]
        cls,
        module: nn.Module,
        *,
        params: Iterable[str] | None = None,
        config: BayesConfig | None = None,
        **options: Any,
    ) -> BayesianLayer:
        """A copy of ``module`` with the parameters ``params`` (default: see class) Bayesian.

        Args:
            module: any module holding the named parameters itself.
            params: names of its own parameters (``["weight"]``, ``["in_proj_weight"]``).
            config: a :class:`~dnn2bnn.BayesConfig` (default: ``BayesConfig()``); only the
                "reparam" estimator applies.
            **options: keyword shortcuts applied on top of ``config`` (``prior_sigma``, ...).
        """
        cls.check_module(module, params)
        return cls._convert_(copy.deepcopy(module), params=params, config=config, **options)

    @classmethod
    def estimator_fallback(cls, dnn_cls: type[nn.Module], config: BayesConfig) -> str | None:
        """Why ``config.estimator`` cannot run here: only "reparam" reaches any forward."""
        if config.estimator is Estimator.REPARAM:
            return None
        return (
            f"{dnn_cls.__qualname__} has parameter-level Bayesian weights, so estimator "
            f"{config.estimator.value!r} cannot be applied; it uses 'reparam' instead"
        )

    @classmethod
    def _convert_(  # type: ignore[override]
        cls,
        module: nn.Module,
        *,
        params: Iterable[str] | None = None,
        config: BayesConfig | None = None,
        **options: Any,
    ) -> BayesianLayer:
        """Like :meth:`from_dnn`, but turns ``module`` itself Bayesian."""
        names = cls.check_module(module, params)
        config = _resolve(config, options)
        reason = cls.estimator_fallback(type(module), config)
        if reason is not None:
            warnings.warn(f"dnn2bnn: {reason}", ConversionWarning, stacklevel=3)
            config = _reparam_only(config)
        base = cls._bnn_base or cls
        module.__class__ = bayesian_parameters_class(base, type(module), names)
        module._bayesianize_(config)
        return module  # type: ignore[return-value]

    def _bayesianize_(self, config: BayesConfig) -> None:
        cls = type(self)
        if "_bnn_base" not in cls.__dict__:  # built by a constructor: pick the parameters now
            self.__class__ = bayesian_parameters_class(cls, cls.dnn_type, cls.select_params(self))
        super()._bayesianize_(_reparam_only(config))

    # ------------------------------------------------------------------ behaviour
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # The module's own forward, reading the sampled parameters; one sample per
        # Bayesian parameter per call, however often the forward reads it, for this module
        # and the Bayesian layers inside it (attention reads ``out_proj.weight`` itself).
        forward = type(self).dnn_type.forward
        opened = [
            m for m in self.modules() if isinstance(m, BayesianLayer) and m._sample_cache is None
        ]
        for module in opened:
            module._sample_cache = {}
        try:
            return forward(self, *args, **kwargs)
        finally:
            for module in opened:
                module._sample_cache = None

    def _fixed_row(self, name: str) -> int | None:
        """The padding row of an embedding's ``weight`` (``padding_idx``): never sampled."""
        if name == "weight" and isinstance(self, (nn.Embedding, nn.EmbeddingBag)):
            return self.padding_idx
        return None

    def reset_parameters(self) -> None:
        """The torch.nn re-initialisation where the class has one; sigma back to its start."""
        if callable(getattr(type(self).dnn_type, "reset_parameters", None)):
            super().reset_parameters()
            return
        with torch.no_grad():
            for name in self.bayes_params:
                rho, mu = self._parameters[name + "_rho"], self._parameters[name + "_mu"]
                rho.copy_(_initial_rho(mu, self.bayes_config))  # type: ignore[union-attr, arg-type]

    def to_dnn(self) -> nn.Module:
        """A plain deterministic copy holding the posterior means, submodules included.

        Unlike a Linear, such a module may contain Bayesian layers (attention's
        ``out_proj``, the layers of a model whose own parameter was chosen): they become
        plain too.
        """
        dnn = super().to_dnn()
        plain: dict[int, nn.Module] = {}
        for parent in list(dnn.modules()):
            for name, child in list(parent._modules.items()):
                if child is not None and is_bayesian_layer(child):
                    if id(child) not in plain:
                        plain[id(child)] = child.to_dnn()  # type: ignore[operator]
                    parent._modules[name] = plain[id(child)]
        return dnn

    def __reduce_ex__(self, protocol: Any) -> Any:
        cls = type(self)
        args = (cls._bnn_base, cls.dnn_type, cls.bayes_params)
        return (_new_parameters_instance, args, self.__getstate__())


class _RNNFlatWeights:
    """For ``nn.LSTM``/``GRU``/``RNN``: keep the ``_flat_weights`` cache in step with sampling.

    torch's RNNs hand a cached list of their parameters (``_flat_weights``) to the fused
    kernels. Here the list holds the posterior means between calls (so it can be copied
    and pickled) and one fresh sample per weight during a call.
    """

    _flat_weights_names: list[str]

    def _init_flat_weights(self) -> None:
        with _peek_means(self):  # type: ignore[arg-type]
            self._flat_weights = [getattr(self, n, None) for n in self._flat_weights_names]
        self._flat_weight_refs = [
            None if w is None else weakref.ref(w) for w in self._flat_weights
        ]

    def _update_flat_weights(self) -> None:  # called first thing in every forward
        self._flat_weights = [getattr(self, n, None) for n in self._flat_weights_names]

    def flatten_parameters(self) -> None:
        """Nothing to flatten: the weights are fresh samples in every call."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._init_flat_weights()

    def _bayesianize_(self, config: BayesConfig) -> None:
        super()._bayesianize_(config)  # type: ignore[misc]
        self._init_flat_weights()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # type: ignore[misc]
        self._init_flat_weights()  # the means, not the samples torch's __getstate__ drew
        state["_flat_weights"] = list(self._flat_weights)
        state.pop("_flat_weight_refs", None)
        return state

    def to_dnn(self) -> nn.Module:
        dnn = super().to_dnn()  # type: ignore[misc]
        dnn._init_flat_weights()
        return dnn


def _plain_attribute(name: str) -> property:
    """Undo :class:`BayesianLayer`'s ``weight``/``bias`` properties where they are not Bayesian."""

    def getter(self: nn.Module) -> Any:
        if name in self.__dict__:
            return self.__dict__[name]
        return nn.Module.__getattr__(self, name)

    def setter(self: nn.Module, value: Any) -> None:
        stored = name in self._parameters or name in self._buffers or name in self._modules
        if stored or isinstance(value, (nn.Parameter, nn.Module)):
            nn.Module.__setattr__(self, name, value)
        else:
            self.__dict__[name] = value

    def deleter(self: nn.Module) -> None:
        for store in (self._parameters, self._buffers, self._modules, self.__dict__):
            if name in store:
                del store[name]
                return
        raise AttributeError(name)

    return property(getter, setter, deleter)


@functools.lru_cache(maxsize=None)
def bayesian_parameters_class(
    base: type[BayesianParameters], dnn_cls: type[nn.Module], names: tuple[str, ...]
) -> type[BayesianParameters]:
    """The class of a ``dnn_cls`` instance whose parameters ``names`` are Bayesian."""
    if not issubclass(dnn_cls, base.dnn_type):
        raise TypeError(f"{dnn_cls.__qualname__} is not a subclass of {base.dnn_type.__qualname__}")
    bases: tuple[type, ...] = (base,) if issubclass(base, dnn_cls) else (base, dnn_cls)
    if issubclass(dnn_cls, nn.RNNBase):
        bases = (_RNNFlatWeights, *bases)
    namespace: dict[str, Any] = {
        "dnn_type": dnn_cls,
        "_bnn_base": base,
        "bayes_params": names,
        "__module__": base.__module__,
    }
    for attr in ("weight", "bias"):
        # Undo BayesianLayer's sampling properties, or restore dnn_cls's own descriptor.
        own = next((k.__dict__[attr] for k in dnn_cls.__mro__ if attr in k.__dict__), None)
        namespace[attr] = own if own is not None else _plain_attribute(attr)
    for name in names:
        namespace[name] = _bayes_property(name)
    return type(f"Bayes{dnn_cls.__name__}", bases, namespace)


def _new_parameters_instance(
    base: type[BayesianParameters], dnn_cls: type[nn.Module], names: tuple[str, ...]
) -> BayesianParameters:
    cls = bayesian_parameters_class(base, dnn_cls, names)
    return cls.__new__(cls)


@functools.lru_cache(maxsize=None)
def parameter_converter(
    dnn_type: type[nn.Module], candidates: tuple[str, ...] | None = None
) -> type[BayesianParameters]:
    """A mapping entry that makes ``candidates`` of ``dnn_type`` modules Bayesian.

    Args:
        dnn_type: the module type to convert (subclasses included).
        candidates: its parameters to make Bayesian where present; ``None``: all of its own.

    Example:
        >>> converter = parameter_converter(torch.nn.Embedding, ("weight",))
        >>> bayes = converter.from_dnn(torch.nn.Embedding(10, 3))
        >>> bayes(torch.tensor([1, 2])).shape, bayes.weight_mu.shape
        (torch.Size([2, 3]), torch.Size([10, 3]))
    """
    namespace = {
        "dnn_type": dnn_type,
        "candidate_params": candidates,
        "_bnn_base": BayesianParameters,
        "__module__": __name__,
        "__doc__": f"Converts {dnn_type.__qualname__} (parameters: {candidates or 'all'}).",
    }
    return type(f"Bayes{dnn_type.__name__}", (BayesianParameters,), namespace)


class BayesMultiheadAttention(BayesianParameters, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with Gaussian posteriors over its projections.

    Its own parameters (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
    ``bias_k``/``bias_v`` when present) become Bayesian, and ``out_proj`` (an ``nn.Linear``)
    becomes a :class:`BayesLinear`. torch's ``forward`` (fast path included) runs unchanged.
    Takes the arguments of :class:`torch.nn.MultiheadAttention` plus the Bayesian options.

    Example:
        >>> attn = BayesMultiheadAttention(8, 2, batch_first=True)
        >>> x = torch.randn(1, 5, 8)
        >>> attn(x, x, x)[0].shape, type(attn.out_proj).__name__
        (torch.Size([1, 5, 8]), 'BayesNonDynamicallyQuantizableLinear')
    """

    dnn_type = nn.MultiheadAttention
    candidate_params = (
        "in_proj_weight",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "in_proj_bias",
        "bias_k",
        "bias_v",
    )

    def __init__(self, *args: Any, config: BayesConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, config=config, **kwargs)
        BayesLinear._convert_(self.out_proj, config=self.bayes_config)

    @classmethod
    def from_dnn(  # type: ignore[override]
        cls,
        module: nn.Module,
        *,
        params: Iterable[str] | None = None,
        config: BayesConfig | None = None,
        **options: Any,
    ) -> BayesianLayer:
        """A Bayesian copy of a trained ``nn.MultiheadAttention``, ``out_proj`` included.

        (Model-wide conversion converts ``out_proj`` as the ``nn.Linear`` it is.)
        """
        bnn = super().from_dnn(module, params=params, config=config, **options)
        out_proj = bnn.out_proj
        if isinstance(out_proj, nn.Linear) and not isinstance(out_proj, BayesianLayer):
            BayesLinear._convert_(out_proj, config=bnn.bayes_config)
        return bnn


def _reparam_only(config: BayesConfig) -> BayesConfig:
    if config.estimator is Estimator.REPARAM:
        return config
    return dataclasses.replace(config, estimator=Estimator.REPARAM)
