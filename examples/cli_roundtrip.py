"""Tutorial 3: convert a checkpoint from the command line and load the BNN back in Python.

    python examples/cli_roundtrip.py            # works in a temporary folder
    python examples/cli_roundtrip.py --keep DIR # leaves the files in DIR
    (--quick is accepted and changes nothing: the script always takes a few seconds)

Steps: (1) save a trained model's state_dict as most training scripts do; (2) run
``dnn2bnn convert`` on it, naming the architecture by import path; (3) ``dnn2bnn inspect``
the result; (4) ``dnn2bnn.load_bnn`` rebuilds the BNN with no option repeated, and in
"mean" mode it predicts exactly like the original network.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import dnn2bnn

HERE = Path(__file__).resolve().parent


class SmallCNN(nn.Module):
    """The architecture; ``--arch cli_roundtrip:SmallCNN`` imports it from this file."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def dnn2bnn_cli(*args: str) -> str:
    """Run ``python -m dnn2bnn ARGS`` (the ``dnn2bnn`` console script does the same)."""
    command = [sys.executable, "-m", "dnn2bnn", *args]
    print("$", " ".join(["dnn2bnn", *args]))
    # cwd=HERE puts this file's folder on the path, so the architecture can be imported.
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
    if result.returncode != 0:
        sys.exit(f"dnn2bnn failed ({result.returncode}): {result.stderr.strip()}")
    print(result.stdout)
    return result.stdout


def main(folder: Path) -> None:
    torch.manual_seed(0)
    # (1) A "trained" model and its checkpoint (a few SGD steps on random data keep it short).
    dnn = SmallCNN(num_classes=4)
    optimizer = torch.optim.SGD(dnn.parameters(), lr=0.1)
    x, y = torch.randn(64, 1, 12, 12), torch.randint(0, 4, (64,))
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(dnn(x), y).backward()
        optimizer.step()
    dnn.eval()
    checkpoint = folder / "small_cnn.pt"
    torch.save({"epoch": 5, "state_dict": dnn.state_dict()}, checkpoint)

    # (2) Convert it: the file holds only weights, so --arch says which class they fit.
    bnn_file = folder / "small_cnn_bnn.safetensors"
    dnn2bnn_cli(
        "convert",
        str(checkpoint),
        str(bnn_file),
        "--force",
        "--arch",
        "cli_roundtrip:SmallCNN",
        "--arch-kwargs",
        '{"num_classes": 4}',
        "--prior-sigma",
        "0.1",
    )
    # (3) What is in the file.
    dnn2bnn_cli("inspect", str(bnn_file))

    # (4) Load it back: the architecture, the conversion and its options come from the file.
    bnn = dnn2bnn.load_bnn(bnn_file).eval()
    with torch.no_grad():
        with dnn2bnn.set_mode(bnn, "mean"):
            difference = (bnn(x) - dnn(x)).abs().max().item()
        samples = torch.stack([bnn(x).softmax(-1) for _ in range(20)])
    print(f"mean-mode BNN vs. original DNN: max |difference| = {difference:.1e}")
    print(f"sampled predictions: mean std of class probabilities = {samples.std(0).mean():.1e}")
    if difference != 0.0:
        sys.exit("the loaded BNN does not reproduce the DNN in mean mode")
    print("OK: the BNN checkpoint rebuilt itself and reproduces the DNN in mean mode")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write the files to this folder and keep them")
    parser.add_argument("--quick", action="store_true", help="accepted for the test suite; the script is always quick")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        main(args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
