"""Uncertainty of a converted CNN: calibration and out-of-distribution detection.

Trains a small CNN on scikit-learn's digits (or MNIST), converts it with one call, fine-tunes
the Bayesian network with the ELBO, then asks ``dnn2bnn.predict`` for the Monte Carlo
predictive and its uncertainty. Reports accuracy, NLL, ECE and how well the uncertainty
separates the test digits from two out-of-distribution sets (uniform noise images and
inverted digits), and saves a reliability diagram and an uncertainty histogram.

    python examples/uncertainty_digits.py                  # sklearn digits, about a minute
    python examples/uncertainty_digits.py --mnist PATH     # the MNIST gzip pickle
    python examples/uncertainty_digits.py --quick          # a smoke run (CI)
    python examples/uncertainty_digits.py --out docs/images  # where the PNGs go (default: .)
"""

from __future__ import annotations

import argparse
import gzip
import pickle
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dnn2bnn
from dnn2bnn import metrics, plots


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16x14x14
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32x7x7
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


def load_data(mnist: str | None, quick: bool) -> tuple[TensorDataset, TensorDataset]:
    if mnist:
        with gzip.open(mnist, "rb") as f:
            (xtr, ytr), _, (xte, yte) = pickle.load(f, encoding="latin1")
        x, y = torch.as_tensor(xtr).view(-1, 1, 28, 28), torch.as_tensor(ytr)
        xt, yt = torch.as_tensor(xte).view(-1, 1, 28, 28), torch.as_tensor(yte)
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
        labels = torch.tensor(digits.target)
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        split = int(0.75 * len(labels))
        x, y = images[perm[:split]], labels[perm[:split]]
        xt, yt = images[perm[split:]], labels[perm[split:]]
    if quick:
        x, y, xt, yt = x[:256], y[:256], xt[:128], yt[:128]
    return TensorDataset(x, y), TensorDataset(xt, yt)


def fit(
    criterion: nn.Module, model: nn.Module, data: TensorDataset, epochs: int, lr: float
) -> None:
    optimizer = torch.optim.Adam(criterion.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            criterion(x, y).backward()
            optimizer.step()


class _CrossEntropy(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mnist", metavar="PATH", help="MNIST gzip pickle (default: digits)")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 8 samples, data subsets")
    parser.add_argument("--samples", type=int, default=32, help="Monte Carlo samples per input")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per stage")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the two PNG plots")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    samples = 8 if args.quick else args.samples
    epochs = args.epochs or (1 if args.quick else 3 if args.mnist else 8)
    train, test = load_data(args.mnist, args.quick)
    n = len(train)
    source = "MNIST" if args.mnist else "sklearn digits"
    print(f"data: {n} training / {len(test)} test images ({source})")

    dnn = small_cnn()
    fit(_CrossEntropy(dnn), dnn, train, epochs, 2e-3)
    bnn = dnn2bnn.transform_to_bnn_model(dnn, posterior_sigma_init=0.02)
    elbo = dnn2bnn.WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=n)
    fit(elbo, bnn, train, epochs, 1e-3)

    x, y = test.tensors
    oods = {
        "noise": torch.rand(len(x), *x.shape[1:], generator=torch.Generator().manual_seed(1)),
        "inverted": 1.0 - x,
    }
    with torch.no_grad():
        dnn.eval()
        dnn_probs = {name: dnn(data).softmax(-1) for name, data in [("test", x), *oods.items()]}
    pred = dnn2bnn.predict(bnn, x, samples, batch_size=256)
    ood = {name: dnn2bnn.predict(bnn, data, samples, batch_size=256) for name, data in oods.items()}
    print(f"{samples} posterior samples per input, computed with method={pred.method!r}\n")

    print(f"{'model':<22}{'accuracy':>9}{'NLL':>8}{'ECE':>8}{'ECE(adapt)':>11}")
    for name, probs in (("DNN (softmax)", dnn_probs["test"]), ("BNN (MC predictive)", pred.probs)):
        print(
            f"{name:<22}{metrics.accuracy(probs, y):9.4f}{metrics.nll(probs, y):8.4f}"
            f"{metrics.ece(probs, y):8.4f}{metrics.ece(probs, y, binning='adaptive'):11.4f}"
        )

    print(f"\nOOD AUROC (test digits vs. OOD set)  {'noise':>8}{'inverted':>10}")
    scores = {  # score per input, higher = more likely out of distribution
        "DNN max-softmax": {k: 1 - p.max(-1).values for k, p in dnn_probs.items()},
        "BNN predictive entropy": {
            "test": pred.predictive_entropy, **{k: r.predictive_entropy for k, r in ood.items()}
        },
        "BNN mutual information": {
            "test": pred.mutual_information, **{k: r.mutual_information for k, r in ood.items()}
        },
    }
    for label, score in scores.items():
        values = [metrics.ood_auroc(score["test"], score[k]) for k in oods]
        print(f"{label:<37}{values[0]:8.4f}{values[1]:10.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    reliability = args.out / "reliability_diagram.png"
    histogram = args.out / "uncertainty_histogram.png"
    plots.reliability_diagram(pred.probs, y, title="Bayesian CNN on test digits", path=reliability)
    plots.uncertainty_histogram(
        pred.predictive_entropy,
        {name: r.predictive_entropy for name, r in ood.items()},
        xlabel="predictive entropy (nats)",
        in_label="test digits",
        path=histogram,
    )
    print(f"\nsaved {reliability} and {histogram}")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
