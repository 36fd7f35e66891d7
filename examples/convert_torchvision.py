"""Tutorial 2: convert a torchvision model in one call, and make only its last block Bayesian.

A ResNet-18 from torchvision (weights=None: nothing is downloaded) is trained briefly on
scikit-learn's digits, upscaled to 3x32x32. It is then converted twice with one call each:
every Conv/Linear layer Bayesian ("full BNN"), and only ``layer4`` and ``fc`` Bayesian
("last block"). Both are fine-tuned with the ELBO, and their uncertainty is compared by
Monte Carlo sampling with a plain loop: accuracy, NLL, predictive entropy and mutual
information on the test digits, and on out-of-distribution inputs (inverted digits and
uniform noise), with the AUROC of telling the two apart by each score.

    python examples/convert_torchvision.py            # a few minutes on a laptop CPU
    python examples/convert_torchvision.py --quick    # a few seconds (CI)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dnn2bnn


def load_digits_32() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits as 3x32x32 images in [0, 1]; 80/20 split with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm].contiguous(), y[perm]
    split = int(0.8 * len(y))
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


def train(model: nn.Module, loss_fn: nn.Module, data: TensorDataset, *, epochs: int, lr: float) -> None:
    """A plain training loop; ``loss_fn(x, y)`` returns the loss to minimise."""
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=lr)
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(x, y).backward()
            optimizer.step()


class CrossEntropy(nn.Module):
    """``model(x)`` -> cross-entropy: the deterministic counterpart of ``WithBNNLoss``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


@torch.no_grad()
def mc_predict(model: nn.Module, x: torch.Tensor, samples: int) -> dict[str, torch.Tensor]:
    """Monte Carlo predictive by a plain loop: ``samples`` forward passes, fresh weights each.

    Returns the predictive mean ``p = mean_s softmax(f_s(x))``, its entropy ``H[p]`` (total
    uncertainty), and the mutual information ``H[p] - mean_s H[softmax(f_s(x))]`` between the
    prediction and the weights (epistemic uncertainty; 0 for a deterministic network).
    """
    model.eval()  # BatchNorm uses its running statistics; the Bayesian layers still sample
    probs = torch.stack([model(x).softmax(-1) for _ in range(samples)])  # [S, N, C]
    mean = probs.mean(0)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
    expected_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(0)
    return {"probs": mean, "entropy": entropy, "mi": (entropy - expected_entropy).clamp_min(0)}


def auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """P(score of an OOD input > score of an in-distribution input) (Mann-Whitney U; ties count 1/2)."""
    greater = (score_out[:, None] > score_in[None, :]).float().mean()
    ties = (score_out[:, None] == score_in[None, :]).float().mean()
    return (greater + 0.5 * ties).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="deterministic training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="ELBO fine-tuning epochs of each BNN")
    parser.add_argument("--samples", type=int, default=16, help="Monte Carlo samples per prediction")
    parser.add_argument("--posterior-sigma-init", type=float, default=1e-2, help="initial posterior sigma")
    parser.add_argument("--quick", action="store_true", help="smoke test: one training step per model, 32 test images, 2 samples")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()

    train_set, test_set = load_digits_32()
    if args.quick:
        train_set = TensorDataset(*(t[:64] for t in train_set.tensors))
        test_set = TensorDataset(*(t[:32] for t in test_set.tensors))
        args.epochs, args.finetune_epochs, args.samples = 1, 1, 2
    x_test, y_test = test_set.tensors
    ood = {
        "inverted digits": 1.0 - x_test,
        "uniform noise": torch.rand(x_test.shape, generator=torch.Generator().manual_seed(2)),
    }
    n = len(train_set)
    print(f"data: {n} training / {len(test_set)} test digits at 3x32x32")

    dnn = torchvision.models.resnet18(weights=None, num_classes=10)
    train(dnn, CrossEntropy(dnn), train_set, epochs=args.epochs, lr=1e-3)

    # One call each. The DNN is not modified: every conversion works on a copy.
    options = {"posterior_sigma_init": args.posterior_sigma_init}
    models: dict[str, nn.Module] = {
        "DNN": dnn,
        "full BNN": dnn2bnn.transform_to_bnn_model(dnn, **options),
        "last block": dnn2bnn.transform_to_bnn_model(dnn, include=["layer4", "fc"], **options),
    }
    for name in ("full BNN", "last block"):
        bnn = models[name]
        report = bnn.conversion_report
        bayes = sum(p.numel() for n_, p in bnn.named_parameters() if n_.endswith("_rho"))
        print(
            f"{name:>10}: {len(report.converted):2d} Bayesian layers "
            f"({report.converted[0].name} ... {report.converted[-1].name}), "
            f"{bayes:,} of {report.params_before:,} weights Bayesian"
        )
        criterion = dnn2bnn.WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=n)
        train(bnn, criterion, train_set, epochs=args.finetune_epochs, lr=1e-3)

    names = list(ood)
    print(f"\n{args.samples} Monte Carlo samples; entropy and mutual information (MI) in nats, averaged")
    header = f"{'model':>10} {'acc':>6} {'NLL':>6} {'H test':>7} {'MI test':>8}"
    header += "".join(f" {'H ' + k[:5]:>8} {'MI ' + k[:5]:>9}" for k in names)
    header += "".join(f" {'AUROC(H) ' + k[:5]:>15} {'AUROC(MI) ' + k[:5]:>16}" for k in names)
    print(header)
    for name, model in models.items():
        samples = 1 if name == "DNN" else args.samples
        test = mc_predict(model, x_test, samples)
        acc = (test["probs"].argmax(-1) == y_test).float().mean().item()
        nll = F.nll_loss(test["probs"].clamp_min(1e-12).log(), y_test).item()
        row = f"{name:>10} {acc:6.3f} {nll:6.3f} {test['entropy'].mean():7.3f} {test['mi'].mean():8.4f}"
        scores = {k: mc_predict(model, x, samples) for k, x in ood.items()}
        row += "".join(f" {scores[k]['entropy'].mean():8.3f} {scores[k]['mi'].mean():9.4f}" for k in names)
        for k in names:
            mi = "n/a" if name == "DNN" else f"{auroc(test['mi'], scores[k]['mi']):.3f}"
            row += f" {auroc(test['entropy'], scores[k]['entropy']):15.3f} {mi:>16}"
        print(row)
    print(f"\ndone in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
