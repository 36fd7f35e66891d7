"""Data for ``quality_mnist.py``: MNIST, its two out-of-distribution sets, and a synthetic stand-in.

* MNIST: the gzip pickle (``mnist.pkl.gz``: 50k train / 10k valid / 10k test, float32 in
  [0, 1]); the benchmark trains on the 50k training images and reports on the 10k test images.
* Out-of-distribution sets: the MNIST test images flipped left-right and inverted
  (``1 - x``), and scikit-learn's 1,797 8x8 digits scaled to [0, 1] and upscaled to 28x28
  (bilinear).
* ``synthetic``: random class prototypes plus noise, for the smoke test (no file needed).
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Data", "load_mnist", "ood_sets", "synthetic"]


@dataclass
class Data:
    """Training and test images ``[N, 1, 28, 28]`` with integer labels ``[N]``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    name: str


def load_mnist(path: str | Path) -> Data:
    """The 50k training and 10k test images of the MNIST gzip pickle at ``path``."""
    with gzip.open(path, "rb") as f:
        train, _valid, test = pickle.load(f, encoding="latin1")

    def images(a: object) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float32).view(-1, 1, 28, 28)

    return Data(
        images(train[0]),
        torch.as_tensor(train[1], dtype=torch.long),
        images(test[0]),
        torch.as_tensor(test[1], dtype=torch.long),
        "MNIST",
    )


def ood_sets(x_test: Tensor, *, digits: bool = True) -> dict[str, Tensor]:
    """Out-of-distribution inputs, keyed by a short name used in the tables."""
    sets = {"flip+inv": 1.0 - x_test.flip(-1)}
    if digits:
        from sklearn.datasets import load_digits

        images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
        sets["digits"] = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    return sets


def synthetic(*, n_train: int = 512, n_test: int = 256, seed: int = 0) -> Data:
    """Ten random 28x28 prototypes plus Gaussian noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    prototypes = (torch.rand(10, 1, 28, 28, generator=g) > 0.7).float()

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        x = (prototypes[y] + 0.3 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 1)
        return x, y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Data(x_train, y_train, x_test, y_test, "synthetic")
