"""Networks of ``quality_mnist.py``: LeNet-5 and Blundell et al. (2015)'s Bayesian MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import dnn2bnn
from dnn2bnn import BayesLinear

__all__ = ["LeNet5", "blundell_mlp", "mlp_prior", "mlp_prior_name"]


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling, for 1x28x28 inputs."""

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
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def mlp_prior() -> dnn2bnn.ScaleMixturePrior:
    """Blundell et al.'s scale mixture: pi=0.5, sigma1=1, sigma2=e^-6."""
    return dnn2bnn.ScaleMixturePrior(pi=0.5, sigma1=1.0, sigma2=math.exp(-6.0))


def mlp_prior_name(estimator: str = "reparam") -> str:
    prior = mlp_prior()
    return (
        f"scale mixture pi={prior.pi:g}, sigma1={prior.sigma1:g}, sigma2={prior.sigma2:.4g}; "
        f"estimator {estimator}"
    )


def blundell_mlp(
    *, hidden: int = 1200, estimator: str = "reparam", bayesian: bool = True,
    parametrization: str = "exp",
) -> nn.Module:
    """784-hidden-hidden-10 MLP (Blundell et al. 2015), of Bayesian linear layers built from
    scratch, or of plain ``nn.Linear`` layers with ``bayesian=False``."""
    def linear(i: int, o: int) -> nn.Module:
        if not bayesian:
            return nn.Linear(i, o)
        return BayesLinear(i, o, prior=mlp_prior(), estimator=estimator, parametrization=parametrization)

    return nn.Sequential(
        nn.Flatten(), linear(784, hidden), nn.ReLU(), linear(hidden, hidden), nn.ReLU(),
        linear(hidden, 10),
    )
