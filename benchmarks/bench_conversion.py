"""Time transform_to_bnn_model on torchvision models (weights=None, no downloads).

    python benchmarks/bench_conversion.py                 # ResNet-50, 7 runs
    python benchmarks/bench_conversion.py --quick         # 3 runs
    python benchmarks/bench_conversion.py --models resnet50 vit_b_16 --profile

Prints a table (median, min, max seconds per conversion; the default copy and
``inplace=True``) and writes JSON to benchmarks/results/conversion.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
import torchvision

import dnn2bnn


def _time(fn, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench(name: str, runs: int) -> dict:
    model = torchvision.models.get_model(name, weights=None)
    params = sum(p.numel() for p in model.parameters())
    dnn2bnn.transform_to_bnn_model(model)  # warm-up (imports, caches)
    copy_times = _time(lambda: dnn2bnn.transform_to_bnn_model(model), runs)
    inplace_times = []
    for _ in range(runs):
        fresh = torchvision.models.get_model(name, weights=None)
        inplace_times += _time(lambda: dnn2bnn.transform_to_bnn_model(fresh, inplace=True), 1)
    return {
        "model": name,
        "params": params,
        "runs": runs,
        "median_s": statistics.median(copy_times),
        "min_s": min(copy_times),
        "max_s": max(copy_times),
        "inplace_median_s": statistics.median(inplace_times),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--profile", action="store_true", help="profile one conversion")
    default_out = Path(__file__).parent / "results" / "conversion.json"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = 3 if args.quick else args.runs
    rows = [bench(name, runs) for name in args.models]
    header = ["model", "params", "median s", "min s", "max s", "inplace s"]
    widths = [-14, 12, 9, 7, 7, 10]
    print(" ".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(header, widths)))
    for r in rows:
        print(
            f"{r['model']:<14} {r['params']:>12,} {r['median_s']:>9.3f} {r['min_s']:>7.3f} "
            f"{r['max_s']:>7.3f} {r['inplace_median_s']:>10.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "runs": runs}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")
    if args.profile:
        model = torchvision.models.get_model(args.models[0], weights=None)
        profiler = cProfile.Profile()
        profiler.enable()
        dnn2bnn.transform_to_bnn_model(model)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumtime").print_stats(20)


if __name__ == "__main__":
    main()
