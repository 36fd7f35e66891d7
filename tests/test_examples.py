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


def test_cli_roundtrip_tutorial_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cli_roundtrip.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "max |difference| = 0.0e+00" in result.stdout and result.stdout.rstrip().endswith(
        "reproduces the DNN in mean mode"
    )
