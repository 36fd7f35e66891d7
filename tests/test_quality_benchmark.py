"""Smoke test of benchmarks/quality_mnist.py on synthetic data (no MNIST needed)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_mnist.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_mnist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_mnist"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["quality_mnist"]


def test_end_to_end_on_synthetic_data(quality, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nkept\n")
    args = ["--synthetic", "--quick", "--mlp-hidden", "16", "--mlp-epochs", "1",
            "--samples", "3", "--threads", "1", "--out", str(tmp_path / "q.json"),
            "--readme", str(readme)]
    report = quality.main(args)
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["models"].keys() == report["models"].keys()
    names = list(saved["models"])
    assert names[0] == "LeNet-5 (deterministic parent)" and names[1].startswith("LeNet-5 converted")
    assert names[2].startswith("Blundell MLP")
    for row in saved["models"].values():
        for key in ("accuracy", "nll", "ece", "brier", "auroc_entropy_flip+inv", "auroc_mi_digits"):
            assert key in row and row[key] == row[key]  # present and not NaN
    converted = saved["models"][names[1]]
    # right after conversion the posterior mean is the parent: same accuracy in mean mode
    assert converted["accuracy_at_conversion_mean"] == saved["models"][names[0]]["accuracy"]
    assert saved["models"][names[0]]["mean_mi_test"] == 0.0 and converted["mean_mi_test"] > 0.0
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and text.count(quality.BEGIN) == 1
    quality.update_readme(readme, "| new |")  # re-running replaces the block, keeps the rest
    text = readme.read_text()
    assert "| new |" in text and "LeNet-5 converted" not in text and "kept" in text


def test_rejects_unknown_part(quality, tmp_path):
    with pytest.raises(SystemExit):
        quality.main(["--synthetic", "--parts", "resnet", "--out", str(tmp_path / "q.json")])
