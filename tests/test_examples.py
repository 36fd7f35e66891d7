"""The examples run end to end (in a quick mode) in a subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bayesian_lenet_demo_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bayesian_lenet.py"), "--epochs", "1", "--samples", "2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(a) Bayesian LeNet-5 built by hand" in out and "converted (5)" in out
    assert out.count("epoch  1") == 3
    line = next(l for l in out.splitlines() if l.startswith("right after conversion"))
    dnn_acc = float(line.split("DNN val acc ")[1].split(",")[0])
    mean_acc = float(line.split("BNN mean-mode ")[1].split(",")[0])
    assert dnn_acc == mean_acc  # conversion keeps the trained weights


@pytest.mark.slow
def test_uncertainty_digits_quick_run_reports_metrics_and_saves_plots(tmp_path):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny run: threads only add contention
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "uncertainty_digits.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "method='vectorized'" in out
    for heading in ("accuracy", "NLL", "ECE", "OOD AUROC", "BNN mutual information"):
        assert heading in out
    row = next(line for line in out.splitlines() if line.startswith("BNN (MC predictive)"))
    accuracy, nll, ece = (float(v) for v in row.split()[3:6])
    assert 0 <= accuracy <= 1 and nll > 0 and 0 <= ece <= 1
    for name in ("reliability_diagram.png", "uncertainty_histogram.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
