"""Carrying out a :class:`~dnn2bnn.conversion._plan.ConversionPlan`: swap and re-configure."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
from torch import nn

from dnn2bnn.config import BayesConfig
from dnn2bnn.conversion._candidates import Action, Candidate, ConversionPlan
from dnn2bnn.errors import ConversionError
from dnn2bnn.layers._base import BayesianLayer, _initial_rho
from dnn2bnn.layers.params import BayesianParameters

__all__ = ["apply_plan", "reconfigure_"]


def apply_plan(model: nn.Module, plan: ConversionPlan, options: dict[str, object]) -> nn.Module:
    """Convert and re-configure the modules of ``plan`` where they stand in ``model``.

    Fills in each candidate's ``result`` (the new module) or ``changes`` (what a
    re-configuration changed). ``options`` are passed to user-written converters as they
    are. Returns the model's root, which is new when the root itself was converted.
    """
    parents = _parent_index(model)
    result = model
    for candidate in plan.candidates:
        if candidate.action is Action.CONVERT:
            new = _convert(candidate, options)
            candidate.result = new
            if new is not candidate.module:
                for parent, attr in parents[id(candidate.module)]:
                    setattr(parent, attr, new)
                if candidate.module is model:
                    result = new
            if _shared(candidate, plan) and isinstance(new, BayesianLayer):
                new._share_samples = True
        elif candidate.action is Action.RECONFIGURE:
            assert isinstance(candidate.module, BayesianLayer) and candidate.config is not None
            candidate.changes = reconfigure_(
                candidate.module, candidate.config, reset_sigma=candidate.reset_sigma
            )
    return result


def reconfigure_(layer: BayesianLayer, config: BayesConfig, *, reset_sigma: bool) -> tuple[str, ...]:
    """Apply ``config`` to an existing Bayesian layer, keeping its posterior means.

    The prior (its buffers rebuilt when the prior changes; an :class:`~dnn2bnn.EmpiricalPrior`
    is then centred on the current means) and the estimator are replaced; sigma is
    re-initialised from ``config`` only when ``reset_sigma``. Returns what changed.
    """
    old = layer.bayes_config
    changes: list[str] = []
    old_form = getattr(old, "parametrization", None)
    new_form = getattr(config, "parametrization", None)
    kept_sigmas: dict[str, torch.Tensor] = {}
    if new_form != old_form and not reset_sigma:  # the same sigma under the new meaning of rho
        with torch.no_grad():
            for name in layer.bayes_params:
                if layer._parameters.get(name + "_rho") is not None:
                    kept_sigmas[name] = layer.posterior_sigma(name).detach()  # type: ignore[union-attr]
    with torch.no_grad():
        for name in layer.bayes_params:
            mu = layer._parameters.get(name + "_mu")
            if mu is None:
                continue
            if config.prior != old.prior:
                for key in [k for k in layer._buffers if k.startswith(name + "_prior_")]:
                    del layer._buffers[key]
                for suffix, buffer in config.prior.make_buffers(mu.detach()).items():
                    layer.register_buffer(f"{name}_prior_{suffix}", buffer)
            if reset_sigma:
                rho = layer._parameters[name + "_rho"]
                assert rho is not None
                rho.copy_(_initial_rho(mu.detach(), config))
    if config.prior != old.prior:
        changes.append(f"prior {old.prior} -> {config.prior}")
    if reset_sigma:
        init = (
            f"moped_delta={config.moped_delta:g}"
            if config.moped_delta is not None
            else f"posterior_sigma_init={config.posterior_sigma_init:g}"
        )
        changes.append(f"sigma re-initialised ({init})")
    if config.estimator != old.estimator:
        changes.append(f"estimator {old.estimator.value!r} -> {config.estimator.value!r}")
    layer.__dict__["bayes_config"] = config  # (a layer routes a bare assignment here)
    for option in dataclasses.fields(config):  # prior, estimator, ... mirrored as attributes
        if option.name in layer.__dict__:
            layer.__dict__[option.name] = getattr(config, option.name)
    if new_form != old_form:
        exp = getattr(new_form, "value", new_form) == "exp"
        if "_exp" in layer.__dict__:
            layer.__dict__["_exp"] = exp
        with torch.no_grad():
            for name, sigma in kept_sigmas.items():
                rho = layer._parameters[name + "_rho"]
                assert rho is not None
                value = sigma.log() if exp else sigma + torch.log(-torch.expm1(-sigma))
                rho.copy_(value.to(rho.dtype))
        kept = " (sigma kept)" if kept_sigmas else ""
        changes.append(
            f"parametrization {getattr(old_form, 'value', old_form)!r} -> "
            f"{getattr(new_form, 'value', new_form)!r}{kept}"
        )
    for attr in ("_scalar_cache", "_pending_kl", "_kl_samples", "_replay"):
        if isinstance(layer.__dict__.get(attr), dict):
            layer.__dict__[attr] = {}  # computed from the old rho or prior
    return tuple(changes)


def _convert(candidate: Candidate, options: dict[str, object]) -> nn.Module:
    cls, module = candidate.bnn_cls, candidate.module
    assert cls is not None
    try:
        if issubclass(cls, BayesianParameters):
            return cls._convert_(module, params=candidate.params, config=candidate.config)
        if issubclass(cls, BayesianLayer):
            return cls._convert_(module, config=candidate.config)
        return cls.from_dnn(module, **options)  # type: ignore[attr-defined, no-any-return]
    except (TypeError, ValueError) as exc:
        raise ConversionError(
            f"converting {candidate.name or '<root>'} ({candidate.type_name}) to "
            f"{cls.__name__} failed: {exc}"
        ) from exc


def _shared(candidate: Candidate, plan: ConversionPlan) -> bool:
    """Used more than once per forward call (or reachable under several names)."""
    return plan.trace.uses.get(id(candidate.module), 0) > 1 or len(candidate.names) > 1


def _parent_index(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    index: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                index[id(child)].append((parent, attr))
    return index
