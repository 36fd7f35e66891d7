"""Choosing lambda per layer (marginal likelihood, or validation NLL) and the temperature T.

The temperature rule (``temperature="auto"``) treats the parent network as the null
hypothesis: every candidate ``T`` is compared with the posterior means (the parent's
predictions) on the same held-out examples, and a candidate is taken only when its gain in
held-out NLL is significant (a one-sided paired z-test at family-wise level
:data:`SIGNIFICANCE`, Bonferroni over the candidates). Otherwise the held-out data gives no
evidence for spread, and the posterior keeps the parent's predictions: ``T`` is the largest
temperature whose expected NLL cost (second order) is at most :data:`NEGLIGIBLE_NLL` nats per
example.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

from torch import Tensor, nn

from dnn2bnn.posterior._targets import BayesTarget, at_means
from dnn2bnn.posterior._validation import predictive_nlls
from dnn2bnn.posterior.prior import marglik_precision

__all__ = ["NEGLIGIBLE_NLL", "SIGNIFICANCE", "Chooser", "VAL_PRECISIONS", "negligible_temperature", "sum_sq"]

#: Prior precisions tried when ``prior_precision="val"``.
VAL_PRECISIONS = tuple(10.0**e for e in range(-2, 7))

#: Family-wise one-sided level of the test "this temperature beats the parent on held-out NLL".
SIGNIFICANCE = 0.05

#: Expected NLL cost (nats per example) allowed for the posterior kept when no T is significant.
NEGLIGIBLE_NLL = 1e-7


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
        num_train_examples: int,
    ) -> None:
        self.model, self.groups, self.means, self.curv = model, groups, means, curv
        self.val_batches, self.settings = val_batches, settings
        self.num_train_examples = num_train_examples
        self.tried: dict[str, float] = {}
        self.choice = ""

    def sigmas(self, lambdas: dict[str, float], temperature: float | Mapping[str, float]) -> dict[str, Tensor]:
        """``sigma = sqrt(T / (H + lambda))``, with one ``T`` or one per layer."""
        per_layer = temperature if isinstance(temperature, Mapping) else dict.fromkeys(self.groups, temperature)
        return {
            t.key: (per_layer[name] / (self.curv[t.key] + lambdas[name])).sqrt()
            for name, group in self.groups.items()
            for t in group
        }

    def run(
        self, prior_precision: float | Mapping[str, float] | str
    ) -> tuple[dict[str, float], float | dict[str, float]]:
        fixed_t = self.settings.temperature
        if isinstance(fixed_t, Mapping):
            if prior_precision == "val":
                raise ValueError("fit_posterior: prior_precision='val' takes one temperature, not one per layer")
            lambdas = self._lambdas(prior_precision)
            per_layer = self._per_layer(fixed_t, "temperature")
            self.choice = "T per layer (given)"
            return lambdas, per_layer
        if prior_precision == "val":
            t = 1.0 if fixed_t == "auto" else float(fixed_t)
            scores = {lam: self._score({n: lam for n in self.groups}, t, f"lambda={lam:g}") for lam in VAL_PRECISIONS}
            best = min(scores, key=scores.__getitem__)
            self.choice = f"lambda={best:g} (lowest held-out NLL of {len(scores)}), T={t:g} (fixed)"
            return {n: best for n in self.groups}, t
        lambdas = self._lambdas(prior_precision)
        if fixed_t != "auto":
            self.choice = f"T={float(fixed_t):g} (given)"
            return lambdas, float(fixed_t)
        return lambdas, self._temperature(lambdas)

    def _temperature(self, lambdas: dict[str, float]) -> float:
        """The significance rule of the module docstring; records what it compared in ``choice``."""
        base = self._per_example(None)
        self.tried["means"] = float(base.mean())
        gains: dict[float, tuple[float, float]] = {}
        for t in self.settings.temperatures:
            per = self._per_example(self.sigmas(lambdas, t))
            self.tried[f"T={t:g}"] = float(per.mean())
            diff = base - per
            se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else math.inf
            gains[t] = (float(diff.mean()), se)
        needed = NormalDist().inv_cdf(1.0 - SIGNIFICANCE / len(gains))
        z = {t: _z(*g) for t, g in gains.items()}
        significant = [t for t in gains if gains[t][0] > 0 and z[t] > needed]
        # the largest gain among the significant candidates, else the largest gain (reported)
        best = max(significant or gains, key=lambda t: gains[t][0])
        gain, se = gains[best]
        found = f"best T={best:g}: held-out NLL gain over the means {gain:.3g} +- {se:.2g} (z={z[best]:.2f}"
        if significant:
            self.choice = f"{found} > {needed:.2f}): significant, T={best:g}"
            return best
        floor = min(negligible_temperature(self.curv, self.groups, lambdas, self.num_train_examples),
                    min(self.settings.temperatures))
        self.tried[f"T={floor:.3g}"] = float(self._per_example(self.sigmas(lambdas, floor)).mean())
        self.choice = (
            f"{found} <= {needed:.2f}): no evidence for spread on {base.numel()} held-out examples, "
            f"the parent's predictions kept, T={floor:.3g} (expected NLL cost <= {NEGLIGIBLE_NLL:g})"
        )
        return floor

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
            values = self._per_layer(prior_precision, "prior_precision")
        elif isinstance(prior_precision, (int, float)) and not isinstance(prior_precision, bool):
            values = {n: float(prior_precision) for n in self.groups}
        else:
            raise TypeError(f"fit_posterior: prior_precision must be a str, number or mapping, got {type(prior_precision).__name__}")
        bad = {n: v for n, v in values.items() if not (v > 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"fit_posterior: prior precisions must be finite and > 0, got {bad}")
        return values

    def _per_layer(self, values: Mapping[str, float], what: str) -> dict[str, float]:
        """A number for every Bayesian layer, from a mapping that must name each exactly once."""
        missing = sorted(set(self.groups) - set(values))
        extra = sorted(set(values) - set(self.groups))
        if missing or extra:
            raise ValueError(
                f"fit_posterior: {what} must name every Bayesian layer {sorted(self.groups)}; "
                f"missing {missing}, unknown {extra}"
            )
        out = {n: float(values[n]) for n in self.groups}
        bad = {n: v for n, v in out.items() if not (v > 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"fit_posterior: {what} values must be finite and > 0, got {bad}")
        return out

    def _score(self, lambdas: dict[str, float], temperature: float, label: str) -> float:
        self.tried[label] = float(self._per_example(self.sigmas(lambdas, temperature)).mean())
        return self.tried[label]

    def _per_example(self, sigmas: dict[str, Tensor] | None) -> Tensor:
        with at_means(self.model):
            return predictive_nlls(
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


def _z(gain: float, se: float) -> float:
    """``gain / se``; a gain without spread is infinitely significant (or not at all)."""
    if se > 0:
        return gain / se
    return math.inf if gain > 0 else 0.0


def negligible_temperature(
    curv: dict[str, Tensor], groups: dict[str, list[BayesTarget]], lambdas: dict[str, float], num_train_examples: int
) -> float:
    """The largest ``T`` whose expected NLL cost is at most :data:`NEGLIGIBLE_NLL` per example.

    To second order a sampled network costs ``1/2 sum_i h_i sigma_i^2`` nats per example over
    the means (``h_i = H_i / N``, the mean per-example curvature); with
    ``sigma_i^2 = T / (H_i + lambda)`` that is ``T * P_eff / (2 N)``, where
    ``P_eff = sum_i H_i / (H_i + lambda)`` is the effective number of parameters. The
    predictive (an average of sampled networks' probabilities) costs at most that.
    """
    p_eff = sum(
        float((curv[t.key].double() / (curv[t.key].double() + lambdas[name])).sum())
        for name, group in groups.items()
        for t in group
    )
    if p_eff <= 0:
        return 1.0
    return 2.0 * NEGLIGIBLE_NLL * num_train_examples / p_eff
