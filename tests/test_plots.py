"""dnn2bnn.plots draws PNG files without a display, and explains a missing matplotlib."""

import sys

import pytest
import torch

from dnn2bnn import plots

pytest.importorskip("matplotlib")


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("binning", ["equal_width", "adaptive"])
def test_reliability_diagram_saves_png(tmp_path, binning):
    probs = torch.softmax(torch.randn(200, 5), -1)
    labels = torch.randint(0, 5, (200,))
    path = tmp_path / "reliability.png"
    figure = plots.reliability_diagram(probs, labels, binning=binning, title="test", path=path)
    assert _is_png(path)
    assert "ECE" in figure.axes[0].get_title()


def test_uncertainty_histogram_saves_png_with_several_ood_sets(tmp_path):
    path = tmp_path / "hist.png"
    figure = plots.uncertainty_histogram(
        torch.rand(100), {"noise": torch.rand(50) + 1, "inverted": torch.rand(50) + 0.5}, path=path
    )
    assert _is_png(path)
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert legend[0] == "in-distribution" and "noise (AUROC 1.000)" in legend


def test_missing_matplotlib_is_explained(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'dnn2bnn\[plot\]'"):
        plots.uncertainty_histogram(torch.rand(5), torch.rand(5))
