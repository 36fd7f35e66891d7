"""fit_posterior at scale: a torchvision ResNet-18 (3x32x32, 10 classes) on synthetic data.

    python benchmarks/bench_posterior_scale.py --examples 10000 --threads 2
    python benchmarks/bench_posterior_scale.py --examples 512     # a sample; the time scales linearly

Each measurement runs in its own process so that peak memory (ru_maxrss, minus the process's
size after building the model and the data) belongs to it alone:

* ``train``: one SGD training step of the deterministic ResNet-18 at ``--batch`` (forward,
  backward, step), the reference for memory;
* ``fit``: ``dnn2bnn.fit_posterior`` on ``--examples`` images (Fisher curvature, fixed
  temperature: the curvature pass alone), with its default memory budget.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def measure(kind: str, examples: int, batch: int, budget: int | None = None) -> dict[str, float]:
    import dnn2bnn

    model = _model()
    g = torch.Generator().manual_seed(0)
    n = examples if kind == "fit" else batch
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    if kind == "fit":
        model = dnn2bnn.transform_to_bnn_model(model).eval()
    base = _rss_mb()
    start = time.perf_counter()
    if kind == "train":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        seconds = (time.perf_counter() - start) / 2
    else:
        options = {} if budget is None else {"memory_budget": budget}
        dnn2bnn.fit_posterior(model, (x, y), temperature=1.0, batch_size=batch, progress=False, **options)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb_above_base": _rss_mb() - base, "base_mb": base}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-budget", type=int, default=None,
                        help="fit_posterior's memory_budget in bytes (default: its own, 256 MiB)")
    parser.add_argument("--_measure", choices=["train", "fit"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._measure:
        print(json.dumps(measure(args._measure, args.examples, args.batch, args.memory_budget)))
        return {}
    results: dict[str, object] = {"examples": args.examples, "batch": args.batch, "threads": args.threads}
    for kind in ("train", "fit"):
        command = [sys.executable, __file__, "--_measure", kind, "--examples", str(args.examples),
                   "--batch", str(args.batch), "--threads", str(args.threads)]
        if args.memory_budget is not None:
            command += ["--memory-budget", str(args.memory_budget)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        print(kind, results[kind], flush=True)
    fit, train = results["fit"], results["train"]
    per_example = fit["seconds"] / args.examples  # type: ignore[index]
    results["fit_s_per_10k"] = per_example * 10_000
    results["memory_ratio"] = fit["peak_mb_above_base"] / max(train["peak_mb_above_base"], 1.0)  # type: ignore[index]
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
