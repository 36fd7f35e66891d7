"""Shared pieces of the dnn2bnn benchmarks: the three workloads and interleaved timing.

Timing protocol (all benchmarks): one thread (``torch.set_num_threads(1)``), warm-up, then
``rounds`` rounds in which every variant runs ``reps`` times back to back, variants
interleaved within each round; the reported ratio is the median over rounds of
``time(variant) / time(baseline)`` measured in the same round, which cancels slow drifts in
machine load.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


class LeNet5(nn.Module):
    """LeNet-5 for 1x28x28 inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU(), nn.Linear(1200, 10)
    )


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


@dataclass(frozen=True)
class Workload:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int


WORKLOADS = [
    Workload("MLP 784-1200-1200-10", mlp, (784,), 128),
    Workload("LeNet-5", LeNet5, (1, 28, 28), 64),
    Workload("ResNet-18 3x32x32", resnet18, (3, 32, 32), 32),
]


def batch(workload: Workload, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(workload.batch, *workload.input_shape, generator=g)
    y = torch.randint(0, 10, (workload.batch,), generator=g)
    return x.to(device), y.to(device)


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kl_scale: float | None, *, fused: bool = False
) -> Callable[[], None]:
    """A closure doing one step: forward, cross-entropy (+ KL/N), backward, Adam (torch's
    default implementation, which is per tensor on the CPU and multi-tensor on CUDA, or
    ``fused=True``: the single-kernel one)."""
    import dnn2bnn

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, **({"fused": True} if fused else {}))
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if kl_scale is not None:
            loss = loss + kl_scale * dnn2bnn.kl_divergence(model)
        loss.backward()
        optimizer.step()

    return step


def synchronize() -> None:
    """Wait for queued GPU work (timings on CUDA); nothing on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(
    variants: dict[str, Callable[[], Any]], *, rounds: int, reps: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one entry per round, variants interleaved."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            synchronize()
            times[name].append((time.perf_counter() - start) / reps)
    return times


def median_ratio(times: dict[str, list[float]], variant: str, baseline: str) -> float:
    return statistics.median(a / b for a, b in zip(times[variant], times[baseline]))


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def torchbnn_model(dnn: nn.Module, *, sigma: float = 1e-3, prior_sigma: float = 1.0) -> nn.Module | None:
    """A copy of ``dnn`` with every ``nn.Linear``/``nn.Conv2d`` swapped for torchbnn 1.2's
    ``BayesLinear``/``BayesConv2d`` (``sigma = exp(log_sigma)``), means = the trained weights,
    ``log_sigma = log(sigma)`` (dnn2bnn's default posterior width), prior N(0, ``prior_sigma``).
    ``None`` when torchbnn is not installed."""
    try:
        import torchbnn
    except ImportError:  # pragma: no cover - optional peer
        return None
    import math

    model = copy.deepcopy(dnn)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                new = torchbnn.BayesLinear(0.0, prior_sigma, child.in_features, child.out_features,
                                           bias=child.bias is not None)
            elif type(child) is nn.Conv2d:
                new = torchbnn.BayesConv2d(
                    0.0, prior_sigma, child.in_channels, child.out_channels, child.kernel_size,
                    stride=child.stride, padding=child.padding, dilation=child.dilation,
                    groups=child.groups, bias=child.bias is not None)
            else:
                swap(child)
                continue
            with torch.no_grad():
                new.weight_mu.copy_(child.weight)
                new.weight_log_sigma.fill_(math.log(sigma))
                if child.bias is not None:
                    new.bias_mu.copy_(child.bias)
                    new.bias_log_sigma.fill_(math.log(sigma))
            setattr(parent, name, new)

    swap(model)
    return model


def torchbnn_kl(model: nn.Module) -> torch.Tensor:
    """torchbnn's summed KL (``torchbnn.functional.bayesian_kl_loss(reduction="sum")``)."""
    from torchbnn.functional import bayesian_kl_loss

    return bayesian_kl_loss(model, reduction="sum")
