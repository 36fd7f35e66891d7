"""Every example script runs end to end, in its quick mode, in a subprocess.

The examples are the tutorials of the documentation (docs/tutorials/). Each row of
``EXAMPLES`` names a script under examples/, the arguments of its quick mode (a few seconds
of CPU) and, optionally, a launcher (e.g. torchrun) and a check of its output. A script
that is still being written is skipped until it exists: adding a tutorial only needs a row.
Scripts run with a temporary working directory, so whatever they write lands there.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import dnn2bnn

ROOT = Path(__file__).resolve().parents[1]


def _check_lenet(out: str, tmp_path: Path) -> None:
    assert "(a) Bayesian LeNet-5 built by hand" in out and "converted (5)" in out
    assert out.count("epoch  1") == 3
    line = next(l for l in out.splitlines() if l.startswith("right after conversion"))
    dnn_acc = float(line.split("DNN val acc ")[1].split(",")[0])
    mean_acc = float(line.split("BNN mean-mode ")[1].split(",")[0])
    assert dnn_acc == mean_acc  # conversion keeps the trained weights
    # the side-by-side table of the end: DNN, post-hoc BNN, fine-tuned BNN, and the plots
    rows = {n: l for l in out.splitlines() for n in ("DNN ", "post-hoc BNN", "fine-tuned BNN") if l.startswith(n)}
    assert len(rows) == 3, out
    dnn_row = [float(v) for v in rows["DNN "].split()[1:]]
    assert dnn_row[0] == dnn_acc and all(v == v for v in dnn_row)  # same accuracy, no NaN
    assert (tmp_path / "reliability_diagram.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "uncertainty_histogram_1.png").read_bytes()[:4] == b"\x89PNG"


def _check_torchvision(out: str, tmp_path: Path) -> None:
    # ResNet-18: 20 convolutions + fc in the full BNN; layer4 (2 blocks, 5 convolutions) + fc.
    assert re.search(r"full BNN: 21 Bayesian layers \(conv1 \.\.\. fc\)", out), out
    assert re.search(r"last block:  6 Bayesian layers \(layer4\.0\.conv1 \.\.\. fc\)", out), out
    rows = {l.split()[0]: l for l in out.splitlines() if re.match(r"\s*(DNN|full|last) ", l)}
    assert len(rows) == 3, out
    for line in rows.values():
        numbers = [float(v) for v in re.findall(r"-?\d+\.\d+", line)]
        assert numbers and all(v == v for v in numbers), line  # printed and not NaN
    mi_test = float(rows["DNN"].split()[4])
    assert mi_test == 0.0  # a deterministic network has no epistemic uncertainty


def _check_uncertainty(out: str, tmp_path: Path) -> None:
    assert "method='vectorized'" in out
    for heading in ("accuracy", "NLL", "ECE", "OOD AUROC", "BNN mutual information"):
        assert heading in out
    row = next(line for line in out.splitlines() if line.startswith("BNN (MC predictive)"))
    accuracy, nll, ece = (float(v) for v in row.split()[3:6])
    assert 0 <= accuracy <= 1 and nll > 0 and 0 <= ece <= 1
    for name in ("reliability_diagram.png", "uncertainty_histogram.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def _check_ddp(out: str, tmp_path: Path) -> None:
    assert "2 rank(s) on cpu" in out
    assert out.count("BNN epoch  1") == 1  # metrics come from rank 0 only
    path = ROOT / "examples" / "bayesian_lenet.py"
    spec = importlib.util.spec_from_file_location("bayesian_lenet", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    bnn = dnn2bnn.transform_to_bnn_model(example.LeNet5())
    bnn.load_state_dict(torch.load(tmp_path / "bnn.pt", weights_only=True))
    printed = float(out.split("BNN posterior-mean val acc ")[1].split(";")[0])
    _, val_set = example.load_data(None)
    x, y = (t[:256] for t in val_set.tensors)  # the --quick validation set of ddp_train.py
    with dnn2bnn.set_mode(bnn, "mean"), torch.no_grad():
        reloaded = (bnn(x).argmax(1) == y).float().mean().item()
    assert printed == pytest.approx(reloaded, abs=1e-4)  # the checkpoint is the trained BNN
    assert reloaded > 0.2  # and it learned something (10 classes)


def _check_cli(out: str, tmp_path: Path) -> None:
    assert "max |difference| = 0.0e+00" in out  # the reloaded BNN in mean mode is the DNN
    assert out.rstrip().endswith("reproduces the DNN in mean mode")


def _check_elbo_line(line: str) -> None:
    """``... loss A = data_loss B + kl C / N``: the logged parts add up to the loss."""
    numbers = [float(v) for v in re.findall(r"-?\d+\.?\d*(?:e[+-]?\d+)?", line.split("loss", 1)[1])]
    loss, data_loss, kl, n = numbers[:4]
    assert kl > 0 and loss == pytest.approx(data_loss + kl / n, rel=1e-3, abs=1e-3), line


def _check_hf(out: str, tmp_path: Path) -> None:
    assert re.search(r"converted: 14 Bayesian layers", out), out  # 2 x 6 encoder Linears + pooler + head
    _check_elbo_line(next(l for l in out.splitlines() if l.startswith("last training log")))
    line = next(l for l in out.splitlines() if l.startswith("MC evaluation"))
    accuracy, nll, ece = (float(v) for v in re.findall(r"\d+\.\d+", line))
    assert 0 <= accuracy <= 1 and nll > 0 and 0 <= ece <= 1
    assert out.count("mutual information") == 4
    assert "max |difference| in mean mode = 0.0e+00" in out  # from_pretrained restored the BNN
    assert (tmp_path / "bert-bnn" / "dnn2bnn_config.json").is_file()


def _check_lightning(out: str, tmp_path: Path) -> None:
    # DDP over 2 processes; N is the whole training set (256 in --quick), not one shard
    assert "trained on 2 process(es); KL weight 1/256" in out, out
    _check_elbo_line(next(l for l in out.splitlines() if l.startswith("last step")))
    line = next(l for l in out.splitlines() if l.startswith("test (MC"))
    accuracy, nll, ece = (float(v) for v in re.findall(r"\d+\.\d+", line))
    assert 0.2 < accuracy <= 1 and nll > 0 and 0 <= ece <= 1  # 10 classes: it learned something
    assert "reloaded bnn.ckpt: max |difference| in mean mode = 0.0e+00" in out


@dataclass(frozen=True)
class Example:
    """One tutorial script and how to run it quickly."""

    script: str
    quick_args: tuple[str, ...] = ("--quick",)  # "{tmp}" stands for the test's tmp_path
    launcher: tuple[str, ...] = ()  # arguments to ``python`` before the script (e.g. torchrun)
    check: Callable[[str, Path], None] | None = None  # (stdout, tmp_path)
    author: str = ""  # the issue that adds the script, for the skip message

    def __str__(self) -> str:
        return self.script


TORCHRUN_2 = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")

EXAMPLES = [
    Example("bayesian_lenet.py", quick_args=("--quick", "--out", "{tmp}"), check=_check_lenet),
    Example("convert_torchvision.py", check=_check_torchvision),
    Example("cli_roundtrip.py", check=_check_cli, author="issue 6 (command line)"),
    Example(
        "uncertainty_digits.py",
        quick_args=("--quick", "--out", "{tmp}"),
        check=_check_uncertainty,
        author="issue 5 (prediction)",
    ),
    Example(
        "ddp_train.py",
        quick_args=("--quick", "--checkpoint", "{tmp}/bnn.pt"),
        launcher=TORCHRUN_2,
        check=_check_ddp,
        author="issue 7 (distributed)",
    ),
    Example(
        "hf_trainer.py",
        quick_args=("--quick", "--out", "{tmp}"),
        check=_check_hf,
        author="issue 16 (integrations)",
    ),
    Example(
        "lightning_cnn.py",
        quick_args=("--quick", "--devices", "2", "--out", "{tmp}"),
        check=_check_lightning,
        author="issue 16 (integrations)",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_example_runs_in_quick_mode(example: Example, tmp_path: Path) -> None:
    script = ROOT / "examples" / example.script
    if not script.exists():
        pytest.skip(f"examples/{example.script} does not exist yet (written by {example.author})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("HF_HUB_OFFLINE", "1")  # examples build models from configs: never reach the Hub
    args = [a.replace("{tmp}", str(tmp_path)) for a in example.quick_args]
    result = subprocess.run(
        [sys.executable, *example.launcher, str(script), *args],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    if example.check is not None:
        example.check(result.stdout, tmp_path)


def test_every_example_script_has_a_row() -> None:
    listed = {e.script for e in EXAMPLES}
    scripts = {p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_")}
    assert scripts <= listed, f"add a row to EXAMPLES for {sorted(scripts - listed)}"


def test_every_example_has_a_tutorial_page() -> None:
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "tutorials").glob("*.md"))
    missing = [e.script for e in EXAMPLES if f"examples/{e.script}" not in pages]
    assert not missing, f"no page under docs/tutorials/ mentions {missing}"
