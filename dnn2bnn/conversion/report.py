"""The conversion report: what was converted, what was not and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConversionReport", "ConvertedModule", "SkippedModule"]


@dataclass(frozen=True)
class ConvertedModule:
    """One module that became Bayesian."""

    name: str
    old_type: str
    new_type: str
    #: True when the traced forward used it, False when it was converted from the module
    #: tree without being reached, None when tracing was not available.
    traced_use: bool | None = None
    #: For parameter-level conversions (:class:`dnn2bnn.BayesianParameters`): the names of
    #: the module's own parameters that became Bayesian; empty for layer-level ones.
    params: tuple[str, ...] = ()


@dataclass(frozen=True)
class SkippedModule:
    """One module (or parameter) that was left deterministic, with the reason."""

    name: str
    type: str
    reason: str


@dataclass
class ConversionReport:
    """What a conversion did. ``print(report)`` shows a table.

    Attributes:
        method: ``"torch.fx"`` when the forward was traced, ``"module tree"`` when tracing
            failed and layers were found by walking the module tree.
        fallback_reason: why tracing failed (``None`` when it worked).
        converted: the converted modules, in module-tree order.
        skipped: modules or parameters left deterministic, each with its reason.
        shared: Bayesian layers used more than once per forward call; they draw one
            weight sample per call of the whole model.
        notes: anything else the user should know (e.g. broken weight tying).
        params_before: number of parameter elements before conversion.
        params_after: number of parameter elements after conversion.
        calls: one record per conversion call that built this model (the function, the
            layer types, ``include``/``exclude``, ``config`` and the Bayesian options exactly
            as passed, and the modules it converted),
            in order; :func:`dnn2bnn.save_bnn` stores them so that
            :func:`dnn2bnn.load_bnn` can replay them.
    """

    method: str = "torch.fx"
    fallback_reason: str | None = None
    converted: list[ConvertedModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)
    #: What :func:`dnn2bnn.fit_posterior` chose (``PosteriorFit.to_dict()``); ``None`` before.
    posterior_fit: dict[str, Any] | None = None

    def merge(self, other: ConversionReport) -> ConversionReport:
        """A report covering this conversion followed by ``other``."""
        return ConversionReport(
            method=other.method if other.fallback_reason else self.method,
            fallback_reason=self.fallback_reason or other.fallback_reason,
            converted=self.converted + other.converted,
            skipped=other.skipped,
            shared=sorted(set(self.shared) | set(other.shared)),
            notes=self.notes + other.notes,
            params_before=self.params_before,
            params_after=other.params_after,
            calls=self.calls + other.calls,
            posterior_fit=other.posterior_fit or self.posterior_fit,
        )

    def __str__(self) -> str:
        how = self.method + (f" (tracing failed: {self.fallback_reason})" if self.fallback_reason else "")
        lines = [
            f"dnn2bnn conversion report — layers found by {how}",
            f"parameters: {self.params_before:,} -> {self.params_after:,}",
            f"converted ({len(self.converted)}):",
        ]
        width = max([len(c.name) for c in self.converted + self.skipped] + [6])
        for c in self.converted:
            flag = "" if c.traced_use is not False else "  (not reached by the traced forward)"
            which = f" [{', '.join(c.params)}]" if c.params else ""
            lines.append(
                f"  {c.name or '<root>':<{width}}  {c.old_type} -> {c.new_type}{which}{flag}"
            )
        lines.append(f"skipped ({len(self.skipped)}):")
        for s in self.skipped:
            lines.append(f"  {s.name or '<root>':<{width}}  {s.type}: {s.reason}")
        if self.shared:
            lines.append("shared (one weight sample per forward call): " + ", ".join(self.shared))
        lines.extend(f"note: {n}" for n in self.notes)
        if self.posterior_fit is not None:
            fit = self.posterior_fit
            lines.append(
                f"posterior fitted by fit_posterior: {fit['curvature']} curvature, "
                f"temperature {fit['temperature']:g}, {len(fit['prior_precision'])} layer prior(s)"
            )
        return "\n".join(lines)
