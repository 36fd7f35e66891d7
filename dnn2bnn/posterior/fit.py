"""``fit_posterior``: a Laplace posterior for a converted network, from its curvature at the trained weights.

Find the Bayesian parameters -> one pass over the data for the diagonal curvature ->
choose the prior precision (marginal likelihood) -> choose the temperature (a significant
gain in held-out NLL of the sampled-network predictive over the parent, else the parent)
-> write sigma and the prior -> report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dnn2bnn.posterior._data import HoldOut, as_batches, count_batches
from dnn2bnn.posterior._independence import check_first_batch
from dnn2bnn.posterior._choose import Chooser, sum_sq
from dnn2bnn.posterior._targets import BayesTarget, at_means, find_targets, set_posterior_
from dnn2bnn.posterior.curvature import (
    DEFAULT_MEMORY_BUDGET,
    Curvature,
    Likelihood,
    diagonal_curvature,
    progress_bar,
)
from dnn2bnn.posterior.prior import evidence_term

__all__ = ["DEFAULT_TEMPERATURES", "PosteriorFit", "fit_posterior", "format_temperature"]

#: Temperatures tried when ``temperature="auto"`` (the smallest is almost the parent network).
DEFAULT_TEMPERATURES = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


@dataclass
class PosteriorFit:
    """What :func:`fit_posterior` chose and measured (``str()`` gives a summary).

    Attributes:
        prior_precision: lambda of each Bayesian layer (qualified name -> lambda); the prior
            of its weights is ``N(0, 1/lambda)``.
        temperature: ``T`` in ``sigma^2 = T / (N * curvature + lambda)`` (one number, or one
            per layer when ``temperature={layer: T}`` was given).
        log_evidence: Laplace estimate of the log marginal likelihood at the chosen lambdas
            (``T = 1``), up to a constant that does not depend on lambda.
        likelihood: ``"classification"`` or ``"regression"``.
        curvature: ``"ggn"`` (exact) or ``"fisher"`` (sampled targets).
        num_train_examples: ``N``.
        num_curvature_examples: examples the curvature was computed on.
        num_val_examples: examples the temperature / prior were chosen on (0: none).
        val_nll: validation NLL of each candidate tried (``"T=0.1"`` -> NLL), and of the
            posterior means alone (``"means"``).
        seconds: wall time of the fit.
        layers: per layer, statistics of the fitted sigma (``min``, ``median``, ``mean``,
            ``max``), the mean ``|mu|`` and ``prior_sigma``.
        choice: how ``T`` (and lambda) were chosen: the best candidate's held-out NLL gain
            over the means with its standard error and z-score, the threshold, and what won.
        per_example: per layer, how its per-example gradients were computed: ``"hooks"``
            (from one batched backward pass) or ``"vmap (reason)"`` (``torch.func`` per example).
    """

    prior_precision: dict[str, float]
    temperature: float | dict[str, float]
    log_evidence: float
    likelihood: str
    curvature: str
    num_train_examples: int
    num_curvature_examples: int
    num_val_examples: int = 0
    val_nll: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    choice: str = ""
    per_example: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (what :func:`dnn2bnn.save_bnn` stores)."""
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"Laplace posterior ({self.curvature}, {self.likelihood}) fitted on "
            f"{self.num_curvature_examples} examples (N={self.num_train_examples}) in {self.seconds:.1f} s",
            f"temperature {format_temperature(self.temperature)}, log evidence {self.log_evidence:.1f}"
            + (f", chosen on {self.num_val_examples} validation examples" if self.num_val_examples else ""),
        ]
        if self.choice:
            lines.append(f"choice: {self.choice}")
        slow = {n: m for n, m in self.per_example.items() if m != "hooks"}
        if slow:  # layers not on the batched hooks (slower, as exact): say which and why
            lines.append("per-example gradients by torch.func for " + ", ".join(
                f"{n or '<root>'} ({m.removeprefix('vmap (').removesuffix(')') or 'vmap'})" for n, m in slow.items()
            ))
        width = max(len(n) for n in self.layers) if self.layers else 6
        for name, stats in self.layers.items():
            lines.append(
                f"  {name or '<root>':<{width}}  lambda {self.prior_precision[name]:9.3g}  "
                f"sigma median {stats['median']:.3g} (max {stats['max']:.3g}), mean |mu| {stats['mean_abs_mu']:.3g}"
            )
        return "\n".join(lines)


def fit_posterior(
    model: nn.Module,
    data: Any,
    *,
    num_train_examples: int | None = None,
    val_data: Any = None,
    prior_precision: float | Mapping[str, float] | str = "auto",
    progress: bool = True,
    **options: Any,
) -> PosteriorFit:
    """Fit a diagonal Laplace posterior to a converted model, in place, without training.

    One pass over ``data`` computes the diagonal of the generalized Gauss-Newton matrix of
    the per-example negative log-likelihood at the posterior means (the trained weights),
    exactly per example, or its Fisher estimate with targets drawn from the model
    (``curvature="fisher"``, the default: one backward pass per batch). Linear and convolution
    layers get their per-example squares from hooks on one batched pass, other layers from
    ``torch.func`` (``PosteriorFit.per_example`` says which). Every
    Bayesian parameter then gets ``sigma^2 = T / (N * curvature + lambda)`` and its prior
    becomes ``N(0, 1/lambda)``, so that :meth:`dnn2bnn.WithBNNLoss.elbo` fine-tuning starts
    from a consistent posterior and prior.

    The prior precision ``lambda`` of each layer maximises the Laplace marginal likelihood.
    That alone makes sampled networks collapse (weights with little curvature get the
    prior's width), so the temperature ``T`` is chosen on held-out data by the NLL of the
    sampled-network predictive, with the parent as the null hypothesis: a candidate of
    :data:`DEFAULT_TEMPERATURES` is taken only when it beats the posterior means
    significantly (paired z-test, Bonferroni over the candidates); otherwise ``T`` is the
    largest temperature with a negligible expected NLL cost (1e-7 nats per example), and
    the predictions stay the parent's. Without ``val_data``, 10% of each batch of ``data``
    (at most 2000 examples in all) is held out for this and left out of the curvature.
    ``PosteriorFit.choice`` records the comparison. See ``docs/posterior.md``.

    Args:
        model: a converted model (any of dnn2bnn's Bayesian layers; last-layer-only too).
            Its layers must use a :class:`~dnn2bnn.NormalPrior`. Modified in place.
        data: the training data: a pair ``(inputs, targets)`` of tensors, or an iterable of
            ``(input, target)`` batches such as a DataLoader. Targets are class indices
            (classification, logits with the class on dim 1) or values shaped like the
            output (regression).
        num_train_examples: ``N``, the size of the training set (default: the number of
            examples in ``data``, validation included). Under torch.distributed, the global
            size; the curvature is summed across ranks.
        val_data: held-out data in the same form as ``data`` for choosing ``T`` (and lambda
            with ``prior_precision="val"``).
        prior_precision: ``"auto"`` (per-layer marginal likelihood), ``"marglik"`` (one
            lambda for all layers by marginal likelihood), ``"val"`` (one lambda chosen on
            validation NLL with ``T = 1``), a number, or a mapping from layer name to number.
        progress: show a tqdm progress bar.
        **options: ``temperature`` (``"auto"``, a number, or a mapping from every Bayesian
            layer's name to its own number; default ``"auto"``),
            ``likelihood`` (``"classification"``/``"regression"``), ``curvature``
            (``"fisher"``/``"ggn"``), ``mc_samples`` (Fisher targets per example, 1),
            ``noise_sigma`` (Gaussian likelihood, 1.0), ``batch_size`` (for tensor data,
            256), ``memory_budget`` (bytes of per-example gradients at once, 256 MiB),
            ``val_samples`` (sampled networks per candidate, 8), ``val_fraction`` (0.1),
            ``max_val_examples`` (2000), ``temperatures`` (the candidates), ``seed`` (0).

    Returns:
        A :class:`PosteriorFit`, also stored as ``model.conversion_report.posterior_fit``
        when the model has a conversion report.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> bnn = dnn2bnn.transform_to_bnn_model(net)
        >>> x, y = torch.randn(200, 4), torch.randint(0, 3, (200,))
        >>> fit = dnn2bnn.fit_posterior(bnn, (x, y), progress=False, temperature=1.0)
        >>> fit.num_train_examples, fit.temperature, sorted(fit.prior_precision)
        (200, 1.0, ['0', '2'])
        >>> bool(bnn[0].posterior_sigma().min() > 1e-3)  # no longer the converted 1e-3
        True
    """
    started = time.perf_counter()
    settings = _Settings.from_options(options)
    if num_train_examples is not None:
        from dnn2bnn.loss import check_num_train_examples

        try:
            num_train_examples = check_num_train_examples(num_train_examples)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"fit_posterior: {exc}") from exc
    module = _unwrap(model)
    groups = find_targets(module)
    targets = [t for group in groups.values() for t in group]
    means = {t.key: t.mu.detach() for t in targets}

    need_val = settings.temperature == "auto" or prior_precision == "val"
    holdout = HoldOut(settings.val_fraction, settings.max_val_examples) if need_val and val_data is None else None
    batches = as_batches(data, batch_size=settings.batch_size)
    if holdout is not None:
        batches = holdout(batches)
    batches = progress_bar(batches, total=count_batches(data), enabled=progress, desc="fit_posterior")
    batches = check_first_batch(module, batches)  # runs inside at_means below

    generator = torch.Generator(device=next(iter(means.values())).device).manual_seed(settings.seed)
    with at_means(module):
        result = diagonal_curvature(
            module,
            means,
            batches,
            likelihood=settings.likelihood,
            curvature=settings.curvature,
            mc_samples=settings.mc_samples,
            noise_sigma=settings.noise_sigma,
            memory_budget=settings.memory_budget,
            generator=generator,
        )
    held = holdout.count if holdout is not None else 0
    if result.num_examples == 0:
        raise ValueError("fit_posterior: data has no example (the curvature needs at least one)")
    n_train = num_train_examples if num_train_examples is not None else result.num_examples + held
    if n_train < 1:
        raise ValueError(f"fit_posterior: num_train_examples must be >= 1, got {n_train}")
    scale = n_train / result.num_examples
    curv = {k: v * scale for k, v in result.diag.items()}

    val_batches: list[tuple[Tensor, Tensor]] = []
    if need_val:
        val_batches = holdout.batches() if holdout is not None else list(as_batches(val_data, batch_size=settings.batch_size, what="val_data"))
        if not val_batches and val_data is not None:
            raise ValueError("fit_posterior: val_data has no example; pass held-out examples or omit val_data")
        if not val_batches:
            raise ValueError(
                "fit_posterior: choosing the temperature needs validation examples; pass val_data, "
                "larger batches, or a fixed temperature=..."
            )
    choice = Chooser(module, groups, means, curv, val_batches, settings, int(n_train))
    lambdas, temperature = choice.run(prior_precision)
    nll_scaled = result.nll * scale
    evidence = -nll_scaled + sum(
        evidence_term([curv[t.key] for t in group], sum_sq(group), lambdas[name]) for name, group in groups.items()
    )
    sigmas = choice.sigmas(lambdas, temperature)
    for t in targets:
        set_posterior_(t, sigmas[t.key], lambdas[t.layer_name])
    fit = PosteriorFit(
        prior_precision=lambdas,
        temperature=temperature,
        log_evidence=float(evidence),
        likelihood=settings.likelihood.value,
        curvature=settings.curvature.value,
        num_train_examples=int(n_train),
        num_curvature_examples=result.num_examples,
        num_val_examples=sum(int(x.shape[0]) for x, _ in val_batches),
        val_nll=choice.tried,
        choice=choice.choice,
        seconds=time.perf_counter() - started,
        layers=_layer_stats(groups, sigmas, lambdas),
        per_example=result.methods,
    )
    report = getattr(module, "conversion_report", None)
    if report is not None:
        report.posterior_fit = fit.to_dict()
    return fit


@dataclass(frozen=True)
class _Settings:
    temperature: float | str | dict[str, float] = "auto"
    likelihood: Likelihood = Likelihood.CLASSIFICATION
    curvature: Curvature = Curvature.FISHER
    mc_samples: int = 1
    noise_sigma: float = 1.0
    batch_size: int = 256
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    val_samples: int = 8
    val_fraction: float = 0.1
    max_val_examples: int = 2000
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    seed: int = 0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> _Settings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"fit_posterior: unknown option(s) {unknown}; expected some of {sorted(known)}")
        values = dict(options)
        for name, enum in (("likelihood", Likelihood), ("curvature", Curvature)):
            if name in values:
                try:
                    values[name] = enum(values[name])
                except ValueError as exc:
                    raise ValueError(
                        f"fit_posterior: {name} must be one of {[m.value for m in enum]}, got {values[name]!r}"
                    ) from exc
        t = values.get("temperature", "auto")
        if isinstance(t, Mapping):
            values["temperature"] = dict(t)  # checked against the layers by the chooser
        elif t != "auto":
            if isinstance(t, Tensor) and t.numel() == 1 and t.is_floating_point():
                t = values["temperature"] = float(t)
            if not (isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 and math.isfinite(t)):
                raise ValueError(
                    f"fit_posterior: temperature must be 'auto', a finite number > 0 or a mapping from layer "
                    f"name to number, got {t!r}"
                )
        for name in ("mc_samples", "batch_size", "memory_budget", "val_samples", "max_val_examples"):
            v = values.get(name, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"fit_posterior: {name} must be a positive int, got {v!r}")
        if not 0 < float(values.get("val_fraction", 0.1)) < 1:
            raise ValueError(f"fit_posterior: val_fraction must be in (0, 1), got {values['val_fraction']!r}")
        if float(values.get("noise_sigma", 1.0)) <= 0:
            raise ValueError(f"fit_posterior: noise_sigma must be > 0, got {values['noise_sigma']!r}")
        if "temperatures" in values:
            values["temperatures"] = tuple(float(v) for v in values["temperatures"])
            if not values["temperatures"] or not all(v > 0 and math.isfinite(v) for v in values["temperatures"]):
                raise ValueError(
                    f"fit_posterior: temperatures must be finite numbers > 0, got {options['temperatures']!r}"
                )
        return cls(**values)


def format_temperature(temperature: float | Mapping[str, float]) -> str:
    """``0.1``, or ``conv1=3, fc1=1e-05`` for one temperature per layer.

    Example:
        >>> format_temperature({"conv1": 3.0, "fc": 1e-5})
        'conv1=3, fc=1e-05'
    """
    if isinstance(temperature, Mapping):
        return ", ".join(f"{name or '<root>'}={t:.3g}" for name, t in temperature.items())
    return f"{temperature:.3g}"


def _layer_stats(
    groups: dict[str, list[BayesTarget]], sigmas: dict[str, Tensor], lambdas: dict[str, float]
) -> dict[str, dict[str, float]]:
    stats = {}
    for name, group in groups.items():
        s = torch.cat([sigmas[t.key].reshape(-1) for t in group]).float()
        mu = torch.cat([t.mu.detach().reshape(-1) for t in group]).float()
        stats[name] = {
            "min": float(s.min()),
            "median": float(s.median()),
            "mean": float(s.mean()),
            "max": float(s.max()),
            "mean_abs_mu": float(mu.abs().mean()),
            "prior_sigma": 1.0 / math.sqrt(lambdas[name]),
        }
    return stats


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if ddp is not None and isinstance(model, ddp):
        return model.module
    return model
