"""An importable model for the checkpoint and CLI tests (``--arch _models:TinyNet``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool -> Linear, for 1x8x8 inputs."""

    def __init__(self, width: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def trained_tiny(width: int = 4, seed: int = 0) -> TinyNet:
    """A TinyNet in eval mode with random (non-default) BatchNorm statistics."""
    torch.manual_seed(seed)
    model = TinyNet(width)
    bn = model.features[1]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
    return model.eval()
