"""Eager vs torch.compile train step of converted (Bayesian) LeNet-5 and ResNet-18.

    python benchmarks/bench_compile.py            # LeNet-5 and ResNet-18 (compiling: minutes)
    python benchmarks/bench_compile.py --quick    # LeNet-5 only, fewer steps
    python benchmarks/bench_compile.py --device cuda

A train step is ``zero_grad; loss = WithBNNLoss.elbo(...)(x, y); loss.backward(); step`` with
SGD. The compiled variant compiles the loss module (model forward + KL, and through AOT
autograd their backward) with the default backend (Inductor); the optimizer step stays eager.
Eager and compiled steps are timed alternately (medians), so that a change of machine load
hits both. Prints a table and writes benchmarks/results/bench_compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import dnn2bnn  # noqa: E402
from bayesian_lenet import LeNet5  # noqa: E402

MODELS = {
    "lenet5": (lambda: LeNet5(), (1, 28, 28), 10),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32), 10),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(name: str, *, compiled: bool, batch: int, device: torch.device) -> Callable[[], None]:
    make, shape, classes = MODELS[name]
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(make()).to(device)
    criterion: nn.Module = dnn2bnn.WithBNNLoss.elbo(
        bnn, nn.CrossEntropyLoss(), num_train_examples=50_000
    )
    if compiled:
        criterion = torch.compile(criterion)
    optimizer = torch.optim.SGD(bnn.parameters(), lr=1e-3)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(x, y)
        loss.backward()
        optimizer.step()

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def bench(name: str, *, batch: int, steps: int, device: torch.device) -> dict:
    """Time eager and compiled steps alternately, so that load changes hit both alike."""
    eager = make_step(name, compiled=False, batch=batch, device=device)
    compiled = make_step(name, compiled=True, batch=batch, device=device)
    first = {"eager": timed(eager, device), "compiled": timed(compiled, device)}  # compiles
    for _ in range(2):  # warm-up
        eager(), compiled()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):
        times["eager"].append(timed(eager, device))
        times["compiled"].append(timed(compiled, device))
    result = {
        kind: {"first_step_s": first[kind], "median_step_ms": 1e3 * statistics.median(ts)}
        for kind, ts in times.items()
    }
    result["speedup"] = result["eager"]["median_step_ms"] / result["compiled"]["median_step_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="LeNet-5 only, 10 timed steps")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, help="timed steps (default 30, --quick 10)")
    parser.add_argument("--device", default="cpu")
    default_out = Path(__file__).parent / "results" / "bench_compile.json"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    models = args.models or (["lenet5"] if args.quick else ["lenet5", "resnet18"])
    steps = args.steps or (10 if args.quick else 30)
    device = torch.device(args.device)

    rows = []
    for name in models:
        result = bench(name, batch=args.batch_size, steps=steps, device=device)
        rows.append({"model": name, **result})
        torch.compiler.reset()

    print(
        f"train step, batch {args.batch_size}, {steps} timed steps, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'model':10s} {'eager ms':>10s} {'compiled ms':>12s} {'speedup':>8s} {'compile s':>9s}")
    for r in rows:
        eager, compiled = r["eager"], r["compiled"]
        print(
            f"{r['model']:10s} {eager['median_step_ms']:10.2f} {compiled['median_step_ms']:12.2f} "
            f"{r['speedup']:7.2f}x {compiled['first_step_s']:9.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "batch_size": args.batch_size,
        "steps": steps,
    }
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
