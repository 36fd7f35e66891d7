"""Train-step time of each dnn2bnn estimator relative to the deterministic model.

    python benchmarks/bench_estimators.py            # full run
    python benchmarks/bench_estimators.py --quick    # fewer rounds

Workloads: MLP 784-1200-1200-10 (batch 128), LeNet-5 (batch 64), ResNet-18 on 3x32x32
(batch 32). One step = forward, cross-entropy + KL/N, backward, Adam. CPU, one thread,
interleaved rounds, median of per-round ratios. Prints a Markdown table and writes
benchmarks/results/bench_estimators.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dnn2bnn  # noqa: E402
from _common import WORKLOADS, batch, interleaved, median_ratio, table, train_step, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 10")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    estimators = [e.value for e in dnn2bnn.Estimator]
    rows, results = [], {}
    for workload in WORKLOADS:
        x, y = batch(workload)
        dnn = workload.make()
        variants = {"deterministic": train_step(dnn, x, y, None)}
        for estimator in estimators:
            bnn = dnn2bnn.transform_to_bnn_model(dnn, estimator=estimator)
            variants[estimator] = train_step(bnn, x, y, 1.0 / 60_000)
        times = interleaved(variants, rounds=rounds, reps=3)
        ratios = {e: median_ratio(times, e, "deterministic") for e in estimators}
        det_ms = 1e3 * sorted(times["deterministic"])[len(times["deterministic"]) // 2]
        rows.append([workload.name, f"{det_ms:.1f} ms"] + [f"{ratios[e]:.2f}x" for e in estimators])
        results[workload.name] = {"deterministic_ms": det_ms, "ratios": ratios, "times": times}
        print(f"done: {workload.name}", file=sys.stderr)
    print(table(["workload (train step)", "deterministic"] + estimators, rows))
    path = write_json("bench_estimators", {"rounds": rounds, "results": results})
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
