"""The conversion report: what was converted, what was not and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from dnn2bnn.conversion._candidates import ConversionPlan

__all__ = [
    "ConversionReport",
    "ConvertedModule",
    "ReconfiguredModule",
    "SkippedModule",
    "report_plan",
]


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
    #: Why it was converted when no layer type says so: how the forward uses its
    #: parameters (``"w: used as an operand of @()"``); empty for layer types.
    reason: str = ""


@dataclass(frozen=True)
class ReconfiguredModule:
    """A layer that was Bayesian already and got the options of a later conversion call."""

    name: str
    type: str
    #: What changed (prior, sigma re-initialisation, estimator); empty when nothing did.
    changes: tuple[str, ...] = ()


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
        reconfigured: layers that were Bayesian already and got this call's options.
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
    reconfigured: list[ReconfiguredModule] = field(default_factory=list)
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
            reconfigured=self.reconfigured + other.reconfigured,
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
        entries: list[Any] = [*self.converted, *self.reconfigured, *self.skipped]
        width = max([len(c.name) for c in entries] + [6])
        for c in self.converted:
            flag = "" if c.traced_use is not False else "  (not reached by the traced forward)"
            which = f" [{', '.join(c.params)}]" if c.params else ""
            lines.append(
                f"  {c.name or '<root>':<{width}}  {c.old_type} -> {c.new_type}{which}{flag}"
            )
        if self.reconfigured:
            lines.append(f"reconfigured ({len(self.reconfigured)}):")
        for r in self.reconfigured:
            what = "; ".join(r.changes) or "no change"
            lines.append(f"  {r.name or '<root>':<{width}}  {r.type}: {what}")
        lines.append(f"skipped ({len(self.skipped)}):")
        for s in self.skipped:
            lines.append(f"  {s.name or '<root>':<{width}}  {s.type}: {s.reason}")
        if self.shared:
            lines.append(
                "shared (one weight sample per forward call): "
                + ", ".join(n or "<root>" for n in self.shared)
            )
        lines.extend(f"note: {n}" for n in self.notes)
        if self.posterior_fit is not None:
            from dnn2bnn.posterior.fit import format_temperature  # the posterior package imports this one

            fit = self.posterior_fit
            lines.append(
                f"posterior fitted by fit_posterior: {fit['curvature']} curvature, "
                f"temperature {format_temperature(fit['temperature'])}, {len(fit['prior_precision'])} layer prior(s)"
            )
        return "\n".join(lines)


def report_plan(
    plan: ConversionPlan, *, params_before: int, result: nn.Module, call: dict[str, Any]
) -> ConversionReport:
    """The report of one conversion call, from its carried-out plan."""
    from dnn2bnn.conversion._candidates import Action
    from dnn2bnn.layers.params import BayesianParameters

    report = ConversionReport(
        method="torch.fx" if plan.trace.ok else "module tree",
        fallback_reason=plan.trace.failure,
        params_before=params_before,
        params_after=count_parameters(result),
        calls=[call],
    )
    for c in plan.candidates:
        if c.action is Action.CONVERT:
            new = c.result
            assert new is not None
            uses = plan.trace.uses.get(id(c.module), 0)
            report.converted.append(
                ConvertedModule(
                    c.name,
                    c.type_name,
                    type(new).__name__,
                    (uses > 0) if plan.trace.ok else None,
                    tuple(new.bayes_params) if isinstance(new, BayesianParameters) else (),
                    c.reason,
                )
            )
            if uses > 1 or len(c.names) > 1:
                report.shared.append(c.name)
        elif c.action is Action.RECONFIGURE:
            report.reconfigured.append(ReconfiguredModule(c.name, c.type_name, c.changes))
        elif c.action in (Action.SKIP, Action.REFUSE):
            report.skipped.append(SkippedModule(c.name, c.type_name, c.reason))
        report.notes.extend(c.notes)
    report.notes.extend(plan.notes)
    return report


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (uninitialized lazy parameters count 0)."""
    return sum(
        p.numel()
        for p in model.parameters()
        if not isinstance(p, nn.parameter.UninitializedParameter)
    )
