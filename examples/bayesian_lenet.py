"""The reference flow in PyTorch: a Bayesian LeNet-5 built by hand, and a trained LeNet-5
converted with one call, given a posterior without training (dnn2bnn.fit_posterior), then
fine-tuned with the KL-aware loss. It ends with the DNN, the post-hoc BNN and the fine-tuned
BNN side by side (accuracy, NLL, ECE, OOD AUROC) and writes a reliability diagram and an
uncertainty histogram to --out (default: a new temporary folder).

    python examples/bayesian_lenet.py                 # scikit-learn's bundled digits
    python examples/bayesian_lenet.py --mnist PATH    # the MNIST gzip pickle (mnist.pkl.gz)
    python examples/bayesian_lenet.py --quick         # a few seconds: 1 epoch on 512 images (CI)
"""

from __future__ import annotations

import argparse
import gzip
import pickle
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dnn2bnn
from dnn2bnn import BayesConv2d, BayesLinear, WithBNNLoss


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BayesianLeNet5(nn.Module):
    """(a) The same network written by hand from Bayesian layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = BayesConv2d(1, 6, 5, padding=2)
        self.conv2 = BayesConv2d(6, 16, 5)
        self.fc1 = BayesLinear(16 * 5 * 5, 120)
        self.fc2 = BayesLinear(120, 84)
        self.fc3 = BayesLinear(84, num_classes)

    forward = LeNet5.forward


def load_data(mnist: str | None) -> tuple[TensorDataset, TensorDataset]:
    if mnist:
        with gzip.open(mnist, "rb") as f:
            (xtr, ytr), (xva, yva), _ = pickle.load(f, encoding="latin1")
        to = lambda x, y: TensorDataset(torch.as_tensor(x).view(-1, 1, 28, 28), torch.as_tensor(y))  # noqa: E731
        return to(xtr, ytr), to(xva, yva)
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    split = int(0.8 * len(y))
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, samples: int = 1) -> float:
    """Accuracy of the Monte Carlo predictive (mean of ``samples`` softmax outputs)."""
    model.eval()
    x, y = data.tensors
    probs = torch.stack([model(x).softmax(-1) for _ in range(samples)]).mean(0)
    return (probs.argmax(-1) == y).float().mean().item()


def train(model: nn.Module, criterion: nn.Module, train_set, val_set, epochs: int, lr: float, samples: int) -> None:
    if any(dnn2bnn.is_bayesian_layer(m) for m in model.modules()):
        # rho (sigma = exp(rho)) at 10x the means' rate, or the posterior cannot widen
        optimizer = torch.optim.Adam(dnn2bnn.bayes_param_groups(model, lr=lr))
    else:
        optimizer = torch.optim.Adam(criterion.parameters(), lr=lr)
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    for epoch in range(1, epochs + 1):
        model.train()
        total, nll, seen = 0.0, 0.0, 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(x, y)
            loss.backward()
            optimizer.step()
            data_loss = getattr(criterion, "last_data_loss", None)  # WithBNNLoss keeps its terms
            nll += (loss if data_loss is None else data_loss).item() * len(y)
            total, seen = total + loss.item() * len(y), seen + len(y)
        print(
            f"  epoch {epoch:2d}  loss {total / seen:8.4f} (cross-entropy {nll / seen:.4f})  "
            f"train acc {accuracy(model, train_set, samples):.4f}  val acc {accuracy(model, val_set, samples):.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", metavar="PATH", help="MNIST gzip pickle instead of scikit-learn digits")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per stage (default 10 digits, 2 MNIST)")
    parser.add_argument("--samples", type=int, default=8, help="Monte Carlo samples for accuracy")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, 512 training images, 2 samples")
    parser.add_argument("--out", type=Path, default=None, help="folder for the plots (default: a temporary one)")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    train_set, val_set = load_data(args.mnist)
    if args.quick:
        train_set, val_set = _head(train_set, 512), _head(val_set, 256)
        args.epochs, args.samples = 1, 2
    epochs = args.epochs or (2 if args.mnist else 10)
    n = len(train_set)
    print(f"data: {n} training / {len(val_set)} validation images ({'MNIST' if args.mnist else 'sklearn digits'})")

    print("\n(a) Bayesian LeNet-5 built by hand from BayesConv2d / BayesLinear")
    hand = BayesianLeNet5()
    train(hand, WithBNNLoss.elbo(hand, nn.CrossEntropyLoss(), num_train_examples=n), train_set, val_set, epochs, 3e-3, args.samples)

    print("\n(b) a deterministic LeNet-5, trained, then converted with one call")
    dnn = LeNet5()
    train(dnn, _PlainLoss(dnn), train_set, val_set, epochs, 3e-3, 1)
    bnn = dnn2bnn.transform_to_bnn_model(dnn)
    print(bnn.conversion_report)
    with dnn2bnn.set_mode(bnn, "mean"):
        mean_acc = accuracy(bnn, val_set)
    print(
        f"right after conversion: DNN val acc {accuracy(dnn, val_set):.4f}, BNN mean-mode {mean_acc:.4f}, "
        f"BNN {args.samples}-sample {accuracy(bnn, val_set, args.samples):.4f}"
    )
    print("\n(c) a posterior from the trained weights' curvature, no training (dnn2bnn.fit_posterior)")
    fit = dnn2bnn.fit_posterior(bnn, train_set.tensors, progress=False)
    print(fit)
    results = {"DNN": evaluate(dnn, val_set, 1), "post-hoc BNN (no training)": evaluate(bnn, val_set, args.samples)}
    print("fine-tuning the post-hoc BNN with WithBNNLoss (bnn_factor = 1/N):")
    train(bnn, WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=n), train_set, val_set, max(1, epochs // 2), 1e-3, args.samples)
    results["fine-tuned BNN"] = evaluate(bnn, val_set, args.samples)
    print("\nvalidation images; OOD: the same images flipped left-right and inverted (AUROC by predictive entropy)")
    print(f"{'model':28s} {'acc':>7s} {'NLL':>7s} {'ECE':>7s} {'AUROC':>7s}")
    for name, row in results.items():
        print(f"{name:28s} {row['acc']:7.4f} {row['nll']:7.4f} {row['ece']:7.4f} {row['auroc']:7.4f}")
    out = args.out or Path(tempfile.mkdtemp(prefix="dnn2bnn_demo_"))
    print("plots: " + ", ".join(str(p) for p in save_plots(results, out)))
    print(f"\ndone in {time.perf_counter() - start:.1f}s")


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, samples: int) -> dict:
    """Accuracy, NLL, ECE and OOD AUROC (flipped + inverted images, predictive entropy)."""
    x, y = data.tensors
    ood = 1.0 - x.flip(-1)
    if any(dnn2bnn.is_bayesian_layer(m) for m in model.modules()):
        inside = dnn2bnn.predict(model, x, num_samples=samples)
        outside = dnn2bnn.predict(model, ood, num_samples=samples)
        probs, h_in, h_out = inside.probs, inside.predictive_entropy, outside.predictive_entropy
    else:
        model.eval()
        probs, p_out = model(x).softmax(-1), model(ood).softmax(-1)
        h_in = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        h_out = -(p_out * p_out.clamp_min(1e-12).log()).sum(-1)
    m = dnn2bnn.metrics
    return {
        "acc": m.accuracy(probs, y), "nll": m.nll(probs, y), "ece": m.ece(probs, y),
        "auroc": m.ood_auroc(h_in, h_out), "probs": probs, "labels": y, "h_in": h_in, "h_out": h_out,
    }


def save_plots(results: dict, folder: Path) -> list[Path]:
    """A reliability diagram of the fine-tuned BNN and entropy histograms of each model."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "reliability_diagram.png"]
    final = results["fine-tuned BNN"]
    dnn2bnn.plots.reliability_diagram(final["probs"], final["labels"], title="fine-tuned BNN", path=paths[0])
    for i, (name, row) in enumerate(results.items()):
        paths.append(folder / f"uncertainty_histogram_{i}.png")
        dnn2bnn.plots.uncertainty_histogram(
            row["h_in"], {"flipped+inverted": row["h_out"]}, xlabel="predictive entropy",
            in_label="validation", title=name, path=paths[-1],
        )
    return paths


def _head(data: TensorDataset, n: int) -> TensorDataset:
    return TensorDataset(*(t[:n] for t in data.tensors))


class _PlainLoss(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


if __name__ == "__main__":
    main()
