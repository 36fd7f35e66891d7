"""Plots of calibration and uncertainty, drawn with matplotlib's Agg canvas (no display).

matplotlib is an optional dependency (``pip install dnn2bnn[plot]``), imported when a
plot is drawn. The figures use matplotlib's object API and never touch pyplot's global
state or backend; pass ``path`` to save a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from dnn2bnn.metrics import calibration_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["reliability_diagram", "uncertainty_histogram"]


def _figure(figsize: tuple[float, float]) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "dnn2bnn.plots needs matplotlib, which is not installed; install it with "
            "`pip install 'dnn2bnn[plot]'` (or `pip install matplotlib`)"
        ) from exc
    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path | None) -> None:
    if path is not None:
        figure.savefig(Path(path), dpi=120)


def reliability_diagram(
    probs: Tensor,
    labels: Tensor,
    *,
    num_bins: int = 15,
    binning: str = "equal_width",
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration.

    Bars show each bin's accuracy at its mean confidence; the gap to the diagonal is the
    miscalibration, and the title carries the ECE.

    Args:
        probs: ``[N, C]`` predicted probabilities.
        labels: ``[N]`` class indices.
        num_bins: number of confidence bins.
        binning: ``"equal_width"`` or ``"adaptive"`` (see
            :func:`dnn2bnn.metrics.calibration_curve`).
        title: figure title (the ECE is appended).
        path: save the figure as PNG there.

    Returns:
        The matplotlib ``Figure``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
        >>> fig = dnn2bnn.plots.reliability_diagram(probs, torch.tensor([0, 1, 1]), num_bins=5)
        >>> fig.axes[1].get_xlabel()
        'confidence'
    """
    curve = calibration_curve(probs, labels, num_bins=num_bins, binning=binning)
    figure = _figure((4.4, 5.0))
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    edges = curve.edges.cpu().numpy()
    left = edges[curve.bins.cpu().numpy()]
    width = edges[curve.bins.cpu().numpy() + 1] - left
    conf = curve.confidence.cpu().numpy()
    acc = curve.accuracy.cpu().numpy()
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    top.bar(left, acc, width=width, align="edge", color="tab:blue", edgecolor="black",
            label="accuracy")
    top.bar(left, conf - acc, bottom=acc, width=width, align="edge", fill=False, hatch="//",
            edgecolor="tab:red", label="gap to confidence")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left")
    heading = f"ECE = {curve.ece:.4f} ({binning.replace('_', '-')}, {num_bins} bins)"
    top.set_title(heading if title is None else f"{title}\n{heading}")
    fraction = (curve.count.double() / curve.count.sum()).cpu().numpy()
    bottom.bar(left, fraction, width=width, align="edge", color="tab:grey", edgecolor="black")
    bottom.set_yscale("log")
    bottom.set_ylabel("fraction")
    bottom.set_xlabel("confidence")
    _save(figure, path)
    return figure


def uncertainty_histogram(
    in_scores: Tensor,
    out_scores: Tensor | dict[str, Tensor],
    *,
    bins: int = 30,
    xlabel: str = "uncertainty",
    in_label: str = "in-distribution",
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Overlaid density histograms of an uncertainty score in and out of distribution.

    Args:
        in_scores: ``[N]`` scores of in-distribution inputs.
        out_scores: ``[M]`` scores of out-of-distribution inputs, or ``{name: scores}`` for
            several OOD sets (each is drawn and labelled; the AUROC is in the legend).
        bins: number of histogram bins (shared by all sets).
        xlabel: what the score is (e.g. ``"predictive entropy (nats)"``).
        in_label: legend label of the in-distribution set.
        title: figure title.
        path: save the figure as PNG there.

    Returns:
        The matplotlib ``Figure``.

    Example:
        >>> fig = dnn2bnn.plots.uncertainty_histogram(torch.rand(50) * 0.5, torch.rand(50) + 0.5)
        >>> fig.axes[0].get_ylabel()
        'density'
    """
    from dnn2bnn.metrics import ood_auroc

    outs = out_scores if isinstance(out_scores, dict) else {"out-of-distribution": out_scores}
    sets: dict[str, Any] = {in_label: in_scores.detach().double().cpu()}
    labels = {in_label: in_label}
    for name, scores in outs.items():
        sets[name] = scores.detach().double().cpu()
        labels[name] = f"{name} (AUROC {ood_auroc(sets[in_label], sets[name]):.3f})"
    low = min(float(v.min()) for v in sets.values())
    high = max(float(v.max()) for v in sets.values())
    if high <= low:
        high = low + 1.0
    figure = _figure((5.5, 3.6))
    ax = figure.add_subplot()
    for index, (name, scores) in enumerate(sets.items()):
        values = scores.numpy()
        filled = {"histtype": "stepfilled", "alpha": 0.3}
        for style in (filled, {"histtype": "step", "linewidth": 1.5}):
            ax.hist(values, bins=bins, range=(low, high), density=True, color=f"C{index}",
                    label=labels[name] if style["histtype"] == "step" else None, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend()
    if title:
        ax.set_title(title)
    _save(figure, path)
    return figure
