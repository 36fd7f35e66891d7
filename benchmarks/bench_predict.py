"""Time of dnn2bnn.predict (S Monte Carlo samples) against deterministic forward passes.

For each workload of ``_common.WORKLOADS`` (fully Bayesian) and a last-layer-Bayesian
ResNet-18, in eval mode without gradients, interleaved (``_common.interleaved``):

* ``1 pass``: one forward pass of the plain network (``dnn2bnn.to_dnn``, posterior means);
* ``S passes``: S such passes, the floor of a naive Monte Carlo predictive;
* ``loop``: ``predict(bnn, x, S, method="loop")``, S forward passes of the BNN;
* ``vectorized``: ``predict(bnn, x, S)``, the default (fx split + batched weight draws);
* ``torchbnn loop``: S forward passes of the same network built with torchbnn 1.2 (when
  installed; fully Bayesian workloads only), the simplest peer.

Denormals are flushed (``torch.set_flush_denormal(True)``) unless ``--no-flush-denormal``.

Ratios are medians over rounds of per-round ratios. Prints a Markdown table and writes
benchmarks/results/bench_predict.json.

    python benchmarks/bench_predict.py            # 5 rounds (CPU: several minutes)
    python benchmarks/bench_predict.py --quick    # 2 rounds, batch 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dnn2bnn  # noqa: E402
from _common import (  # noqa: E402
    WORKLOADS, Workload, interleaved, median_ratio, table, torchbnn_model, write_json,
)


def bench(workload: Workload, include: str | None, batch: int, samples: int, rounds: int,
          device: torch.device) -> dict[str, object]:
    torch.manual_seed(0)
    options = {"include": include} if include else {}
    bnn = dnn2bnn.transform_to_bnn_model(workload.make(), posterior_sigma_init=0.01, **options)
    bnn = bnn.to(device).eval()
    dnn = dnn2bnn.to_dnn(bnn).eval()
    x = torch.randn(batch, *workload.input_shape, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def passes(n: int):
        def run() -> None:
            with torch.no_grad():
                for _ in range(n):
                    dnn(x)
            sync()
        return run

    def predict(method: str):
        def run() -> None:
            dnn2bnn.predict(bnn, x, samples, method=method)
            sync()
        return run

    variants = {"1 pass": passes(1), "S passes": passes(samples),
                "loop": predict("loop"), "vectorized": predict("vectorized")}
    peer = None if include else torchbnn_model(dnn, sigma=0.01)
    if peer is not None:
        peer = peer.to(device).eval()

        def peer_loop() -> None:
            with torch.no_grad():
                for _ in range(samples):
                    peer(x)
            sync()

        variants["torchbnn loop"] = peer_loop
    times = interleaved(variants, rounds=rounds, reps=1, warmup=1)
    name = workload.name + (", last layer Bayesian" if include else "")
    return {
        "model": name,
        "batch": batch,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "vectorized_over_S_passes": median_ratio(times, "vectorized", "S passes"),
        "vectorized_over_1_pass": median_ratio(times, "vectorized", "1 pass"),
        "loop_over_vectorized": median_ratio(times, "loop", "vectorized"),
        "torchbnn_loop_over_S_passes": (
            median_ratio(times, "torchbnn loop", "S passes") if peer is not None else None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds, batch 8")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 2)")
    parser.add_argument("--device", default="cpu", help="cpu (one thread) or cuda")
    parser.add_argument("--no-flush-denormal", dest="flush", action="store_false",
                        help="keep denormal arithmetic (slower deterministic baseline)")
    args = parser.parse_args()
    torch.set_flush_denormal(args.flush)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    rounds = args.rounds or (2 if args.quick else 5)
    resnet = next(w for w in WORKLOADS if w.name.startswith("ResNet-18"))
    cases = [(w, None) for w in WORKLOADS] + [(resnet, "fc")]
    rows = [bench(w, inc, 8 if args.quick else w.batch, args.samples, rounds, device) for w, inc in cases]
    s = args.samples
    print(f"device {device}, {torch.get_num_threads()} thread(s), S={s}, {rounds} rounds\n")
    header = ["model", "batch", "1 pass", f"{s} passes", "loop", "vectorized",
              f"vectorized / {s} passes", "vectorized / 1 pass", "loop / vectorized",
              f"torchbnn loop / {s} passes"]
    body = [[r["model"], str(r["batch"]), *(f"{r['seconds'][k]:.4f} s" for k in
             ("1 pass", "S passes", "loop", "vectorized")),
             f"{r['vectorized_over_S_passes']:.2f}x", f"{r['vectorized_over_1_pass']:.2f}x",
             f"{r['loop_over_vectorized']:.2f}x",
             "n/a" if r["torchbnn_loop_over_S_passes"] is None else f"{r['torchbnn_loop_over_S_passes']:.2f}x"]
            for r in rows]
    print(table(header, body))
    path = write_json("bench_predict", {"device": str(device), "samples": s, "rounds": rounds, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
