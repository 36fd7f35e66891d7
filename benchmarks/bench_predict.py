"""Time of dnn2bnn.predict (S Monte Carlo samples) against deterministic forward passes.

For each model: one deterministic pass of the plain network (``dnn2bnn.to_dnn``), S such
passes, ``predict(method="loop")`` (S ordinary forward passes of the BNN) and the default
vectorized ``predict`` (fx split + batched weight draws). Prints a table and writes JSON to
benchmarks/results/bench_predict.json.

    python benchmarks/bench_predict.py            # full run
    python benchmarks/bench_predict.py --quick    # smaller batches, one repeat
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dnn2bnn  # noqa: E402


class LeNet5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU(), nn.Linear(1200, 10))


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def _timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, build: Callable[[], nn.Module], shape: tuple[int, ...], include: str | None,
          samples: int, repeats: int, device: torch.device) -> dict[str, object]:
    torch.manual_seed(0)
    options = {"include": include} if include else {}
    bnn = dnn2bnn.transform_to_bnn_model(build(), posterior_sigma_init=0.01, **options).to(device).eval()
    dnn = dnn2bnn.to_dnn(bnn).eval()
    x = torch.randn(shape, device=device)

    def deterministic(passes: int) -> Callable[[], object]:
        def run() -> None:
            with torch.no_grad():
                for _ in range(passes):
                    dnn(x)
        return run

    one = _timed(deterministic(1), repeats, device)
    many = _timed(deterministic(samples), repeats, device)
    loop = _timed(lambda: dnn2bnn.predict(bnn, x, samples, method="loop"), repeats, device)
    fast = _timed(lambda: dnn2bnn.predict(bnn, x, samples, method="vectorized"), repeats, device)
    row = {
        "model": name, "batch": shape[0], "samples": samples, "det_1_pass_s": one,
        f"det_{samples}_passes_s": many, "predict_loop_s": loop, "predict_vectorized_s": fast,
        "vectorized_over_det_S": fast / many, "vectorized_over_det_1": fast / one,
        "loop_over_vectorized": loop / fast,
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 8, one repeat")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median; default 3, quick 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_predict.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (1 if args.quick else 3)
    b = 8 if args.quick else 64
    cases = [
        ("MLP 784-1200-1200-10", mlp, (b, 784), None),
        ("LeNet-5", LeNet5, (b, 1, 28, 28), None),
        ("ResNet-18 3x32x32", resnet18, (b, 3, 32, 32), None),
        ("ResNet-18 last-layer", resnet18, (b, 3, 32, 32), "fc"),
    ]
    rows = [bench(*case, args.samples, repeats, device) for case in cases]
    s = args.samples
    print(f"device {device}, {torch.get_num_threads()} threads, S={s}, batch {b}, median of {repeats}")
    print(f"{'model':<24}{'1 pass':>9}{f'{s} passes':>11}{'loop':>9}{'vectorized':>11}"
          f"{f'vec/{s}pass':>10}{'vec/1pass':>10}{'loop/vec':>9}")
    for r in rows:
        print(f"{r['model']:<24}{r['det_1_pass_s']:9.4f}{r[f'det_{s}_passes_s']:11.4f}{r['predict_loop_s']:9.4f}"
              f"{r['predict_vectorized_s']:11.4f}{r['vectorized_over_det_S']:10.2f}"
              f"{r['vectorized_over_det_1']:10.2f}{r['loop_over_vectorized']:9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "samples": s, "batch": b, "repeats": repeats}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
