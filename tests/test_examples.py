"""The examples run end to end (in a quick mode) in a subprocess."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dnn2bnn

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
def test_ddp_example_runs_under_torchrun(tmp_path):
    checkpoint = tmp_path / "bnn.pt"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "examples" / "ddp_train.py"), "--quick", "--checkpoint", str(checkpoint)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "2 rank(s) on cpu" in out
    assert out.count("BNN epoch  1") == 1  # metrics come from rank 0 only
    path = ROOT / "examples" / "bayesian_lenet.py"
    spec = importlib.util.spec_from_file_location("bayesian_lenet", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    bnn = dnn2bnn.transform_to_bnn_model(example.LeNet5())
    bnn.load_state_dict(torch.load(checkpoint, weights_only=True))
    printed = float(out.split("BNN posterior-mean val acc ")[1].split(";")[0])
    _, val_set = example.load_data(None)
    x, y = (t[:256] for t in val_set.tensors)  # the --quick validation set
    with dnn2bnn.set_mode(bnn, "mean"), torch.no_grad():
        reloaded = (bnn(x).argmax(1) == y).float().mean().item()
    assert printed == pytest.approx(reloaded, abs=1e-4)  # the checkpoint is the trained BNN
    assert reloaded > 0.2  # and it learned something (10 classes)


def test_cli_roundtrip_tutorial_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cli_roundtrip.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "max |difference| = 0.0e+00" in result.stdout and result.stdout.rstrip().endswith(
        "reproduces the DNN in mean mode"
    )
