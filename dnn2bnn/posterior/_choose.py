"""Choosing lambda per layer (marginal likelihood, or validation NLL) and the temperature T."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from dnn2bnn.posterior._targets import BayesTarget, at_means
from dnn2bnn.posterior._validation import predictive_nll
from dnn2bnn.posterior.prior import marglik_precision

__all__ = ["Chooser", "VAL_PRECISIONS", "sum_sq"]

#: Prior precisions tried when ``prior_precision="val"``.
VAL_PRECISIONS = tuple(10.0**e for e in range(-2, 7))


class Chooser:
    """Chooses lambda per layer and the temperature; builds sigma for a choice."""

    def __init__(
        self,
        model: nn.Module,
        groups: dict[str, list[BayesTarget]],
        means: dict[str, Tensor],
        curv: dict[str, Tensor],
        val_batches: list[tuple[Tensor, Tensor]],
        settings: Any,
    ) -> None:
        self.model, self.groups, self.means, self.curv = model, groups, means, curv
        self.val_batches, self.settings = val_batches, settings
        self.tried: dict[str, float] = {}

    def sigmas(self, lambdas: dict[str, float], temperature: float) -> dict[str, Tensor]:
        return {
            t.key: (temperature / (self.curv[t.key] + lambdas[name])).sqrt()
            for name, group in self.groups.items()
            for t in group
        }

    def run(self, prior_precision: float | Mapping[str, float] | str) -> tuple[dict[str, float], float]:
        fixed_t = self.settings.temperature
        if prior_precision == "val":
            t = 1.0 if fixed_t == "auto" else float(fixed_t)
            scores = {lam: self._score({n: lam for n in self.groups}, t, f"lambda={lam:g}") for lam in VAL_PRECISIONS}
            best = min(scores, key=scores.__getitem__)
            return {n: best for n in self.groups}, t
        lambdas = self._lambdas(prior_precision)
        if fixed_t != "auto":
            return lambdas, float(fixed_t)
        self.tried["means"] = self._nll(None)
        scores = {t: self._score(lambdas, t, f"T={t:g}") for t in self.settings.temperatures}
        return lambdas, min(scores, key=scores.__getitem__)

    def _lambdas(self, prior_precision: float | Mapping[str, float] | str) -> dict[str, float]:
        if isinstance(prior_precision, str):
            if prior_precision == "auto":
                return {n: marglik_precision([self.curv[t.key] for t in g], sum_sq(g)) for n, g in self.groups.items()}
            if prior_precision == "marglik":
                h = [self.curv[t.key] for g in self.groups.values() for t in g]
                lam = marglik_precision(h, sum(sum_sq(g) for g in self.groups.values()))
                return {n: lam for n in self.groups}
            raise ValueError(
                f"fit_posterior: prior_precision must be 'auto', 'marglik', 'val', a number or a "
                f"mapping from layer name to number, got {prior_precision!r}"
            )
        if isinstance(prior_precision, Mapping):
            missing = sorted(set(self.groups) - set(prior_precision))
            extra = sorted(set(prior_precision) - set(self.groups))
            if missing or extra:
                raise ValueError(
                    f"fit_posterior: prior_precision must name every Bayesian layer {sorted(self.groups)}; "
                    f"missing {missing}, unknown {extra}"
                )
            values = {n: float(prior_precision[n]) for n in self.groups}
        elif isinstance(prior_precision, (int, float)) and not isinstance(prior_precision, bool):
            values = {n: float(prior_precision) for n in self.groups}
        else:
            raise TypeError(f"fit_posterior: prior_precision must be a str, number or mapping, got {type(prior_precision).__name__}")
        bad = {n: v for n, v in values.items() if not (v > 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"fit_posterior: prior precisions must be finite and > 0, got {bad}")
        return values

    def _score(self, lambdas: dict[str, float], temperature: float, label: str) -> float:
        self.tried[label] = self._nll(self.sigmas(lambdas, temperature))
        return self.tried[label]

    def _nll(self, sigmas: dict[str, Tensor] | None) -> float:
        with at_means(self.model):
            return predictive_nll(
                self.model,
                self.means,
                sigmas,
                self.val_batches,
                likelihood=self.settings.likelihood,
                num_samples=self.settings.val_samples,
                noise_sigma=self.settings.noise_sigma,
                seed=self.settings.seed,
            )


def sum_sq(group: list[BayesTarget]) -> float:
    return float(sum(t.mu.detach().double().square().sum() for t in group))
